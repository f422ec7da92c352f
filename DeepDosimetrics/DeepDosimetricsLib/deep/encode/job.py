"""The cohort encoding job (`deepdosimetrics encode`): every patient of a cohort through a trained model.

Writes ``<out>/<patient>/{features.csv, tiles.csv, metrics.csv, recon/*.nrrd, snapshots/*.png, scene.mrb,
done.json}`` patient by patient (each in a temporary folder renamed when complete, so ``--resume`` skips
finished patients) and the cohort tables at the end. The per-patient encoder is in ``encoder.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd

from DeepDosimetricsLib.deep.channels import ChannelSpec
from DeepDosimetricsLib.deep.encode.encoder import TileModel, encode_patient, feature_names
from DeepDosimetricsLib.deep.encode.outputs import DONE_FILE, JOB_FILE, TABLES
from DeepDosimetricsLib.deep.encode.settings import EncodeSettings
from DeepDosimetricsLib.runtime.devices import resolve_device

log = logging.getLogger(__name__)

__all__ = ["EncodeResult", "EncodeSettings", "PatientHook", "encode_cohort"]

PatientHook = Callable[[str, Path, Sequence[ChannelSpec]], None]
"""Called with (patient id, the patient's unfinished output folder holding ``recon/``, channel specs) to add
outputs built from the reconstruction (snapshots, a Slicer scene) before the folder is renamed into place.
The MRML layer provides one (``commands.encode.scene_outputs``): the deep stage never imports it."""


@dataclass
class EncodeResult:
    """What a cohort encoding produced."""

    out: Path
    done: list[str]
    skipped: dict[str, str]
    reused: list[str]
    tables: dict[str, Path]


def _file_digest(path) -> str:

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _job_description(model_dir, cohort_dir, cache_config, config, settings: EncodeSettings) -> dict:

    from DeepDosimetricsLib.deep.model import MODEL_WEIGHTS

    return {
        "model": str(Path(model_dir).resolve()),
        "model_weights": _file_digest(Path(model_dir) / MODEL_WEIGHTS),
        "channels": list(config.channels),
        "tile": config.tile,
        "features": config.features,
        "cohort": str(Path(cohort_dir).resolve()),
        "cache_config": cache_config.hash(),
        **settings.key_fields(),
    }


def _job_key(description: dict) -> str:

    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def prepare_output(out_dir, description: dict, resume: bool, overwrite: bool) -> None:
    """Check (and create) the output folder; refuse one holding other content, clearly."""

    from DeepDosimetricsLib.runtime.errors import InputError

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    content = [p for p in out.iterdir()] if out.is_dir() else []
    job_path = out / JOB_FILE
    if content:
        if not job_path.is_file():
            raise InputError(
                f"output folder {out} exists and holds other files (not an encode output: no {JOB_FILE}); "
                "choose a new --out"
            )
        try:
            previous = json.loads(job_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"{job_path} cannot be read ({error}); choose a new --out or --overwrite") from None
        same = previous.get("key") == _job_key(description)
        if overwrite:
            for pid in previous.get("patients", []):
                shutil.rmtree(out / pid, ignore_errors=True)
            for name in (*TABLES, JOB_FILE):
                (out / name).unlink(missing_ok=True)
            for partial in out.glob(".partial-*"):
                shutil.rmtree(partial, ignore_errors=True)
        elif not resume:
            raise InputError(
                f"output folder {out} already holds an encoding ({JOB_FILE}); use --resume to continue it "
                "(finished patients are kept) or --overwrite to start again"
            )
        elif not same:
            old = previous.get("description", {})
            changed = sorted(k for k in set(old) | set(description) if old.get(k) != description.get(k))
            raise InputError(
                f"output folder {out} holds an encoding made with other settings ({', '.join(changed)} "
                "differ); use --overwrite to replace it or choose a new --out"
            )
    out.mkdir(parents=True, exist_ok=True)


def _write_job(out, description: dict, patients: list[str]) -> None:
    from DeepDosimetricsLib.runtime.atomic import write_json_atomic

    write_json_atomic(out / JOB_FILE, {"key": _job_key(description), "description": description,
                                       "patients": patients})


def patient_done(patient_dir, key: str) -> bool:
    """Whether a patient folder holds finished outputs of the job with this key."""

    try:
        return json.loads((patient_dir / DONE_FILE).read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def check_model_channels(cache, specs: Sequence[ChannelSpec], model_dir, ids: Sequence[str]) -> dict[str, str]:
    """Patients that cannot provide the model's channels -> reason; InputError when no patient can give
    some channel (the model does not fit this cohort)."""
    from DeepDosimetricsLib.runtime.errors import InputError

    missing: dict[str, dict[str, str]] = {}
    for pid in ids:
        cp = cache[pid]
        for spec in specs:
            try:
                cp.check_channels([spec])
            except InputError as error:
                missing.setdefault(pid, {})[spec.label] = str(error)
    never = [spec.label for spec in specs if ids and all(spec.label in missing.get(pid, {}) for pid in ids)]
    if never:
        example = missing[ids[0]][never[0]]
        raise InputError(
            f"model {model_dir} needs channel(s) {', '.join(never)}, which no patient of the cohort provides "
            f"(e.g. {example})"
        )
    return {pid: "; ".join(reasons.values()) for pid, reasons in missing.items()}


def encode_cohort(
    model_dir,
    cohort_dir,
    out_dir,
    cache_dir=None,
    settings: Optional[EncodeSettings] = None,
    resume: bool = False,
    overwrite: bool = False,
    patient_hook: Optional[PatientHook] = None,
) -> EncodeResult:
    """Encode (and reconstruct) every patient of a cohort into ``out_dir``; see the module docstring.

    Each patient is written into a temporary folder that is renamed to ``<out>/<patient>`` once complete
    (with ``done.json``), so an interrupted run resumes (``resume=True``) without redoing finished
    patients. A patient that lacks a channel the model needs (e.g. no dose) is skipped with its reason.

    Args:
        model_dir: a trained model folder (``model.json`` + ``model.pt``).
        cohort_dir: the cohort folder (one sub-folder per patient).
        out_dir: the output folder; per patient ``features.csv`` (one row per structure, features z00...),
            ``tiles.csv`` (one row per tile: position in voxels and mm, features), with ``reconstruct``
            ``recon/*.nrrd`` on the CT grid and ``metrics.csv``; cohort tables at the top.
        cache_dir: the preprocessing cache (built or completed when needed; an existing one keeps its
            configuration); default the cohort's default cache folder.
        settings: overlap, batch, device, what to write, which patients (:class:`EncodeSettings`).
        resume: continue an earlier run with the same settings in ``out_dir``.
        overwrite: replace an earlier encoding in ``out_dir``.
        patient_hook: writes the extra per-patient outputs ``settings.snapshots``/``settings.scene`` ask
            for (e.g. ``scene_outputs`` of ``commands/encode.py``); required when they are set.

    Returns:
        The output folder, patients done, skipped (id -> reason) and reused, and the cohort tables' paths.

    Raises:
        InputError: bad settings, a folder that is not a model, a foreign or non-empty ``out_dir``
            without ``resume``/``overwrite``, unknown patients, or no readable patient.
    """

    from DeepDosimetricsLib.deep.cache.build import ensure_cache
    from DeepDosimetricsLib.deep.cache.store import COHORT_MANIFEST, CacheConfig, open_cache
    from DeepDosimetricsLib.deep.channels import parse_channels
    from DeepDosimetricsLib.deep.model import load_model, read_model_json
    from DeepDosimetricsLib.runtime.atomic import write_csv_atomic, write_json_atomic
    from DeepDosimetricsLib.runtime.errors import InputError
    from DeepDosimetricsLib.runtime.progress import emit_progress

    settings = settings or EncodeSettings()
    out = Path(out_dir)
    if not 0.0 <= settings.overlap < 1.0:
        raise InputError(f"--overlap must be in [0, 1), got {settings.overlap:g}")
    if settings.batch < 1:
        raise InputError(f"--batch must be at least 1, got {settings.batch}")
    if (settings.snapshots or settings.scene or settings.traverse) and not settings.reconstruct:
        raise InputError("--snapshots, --scene and --traverse need --reconstruct")
    if (settings.snapshots or settings.scene) and patient_hook is None:
        raise InputError("snapshots and scenes need a patient_hook that writes them "
                         "(DeepDosimetricsLib.commands.encode.scene_outputs)")
    read_model_json(model_dir)  # a clear error for a folder that is not a model, before the cache work
    device = resolve_device(settings.device)
    model, config = load_model(model_dir, device=device)
    specs = parse_channels(config.channels)
    if settings.traverse:
        names = feature_names(config.features)
        unknown = [f for f in settings.traverse if f not in names]
        if unknown:
            raise InputError(f"--traverse: unknown feature(s) {', '.join(unknown)}; the model has {names[0]}..{names[-1]}")

    cache_path = Path(cache_dir) if cache_dir else None
    cache_config = CacheConfig()
    if cache_path is not None and (cache_path / COHORT_MANIFEST).is_file():
        cache_config = open_cache(cache_path).config  # an existing cache keeps its configuration
    description = _job_description(model_dir, cohort_dir, cache_config, config, settings)
    key = _job_key(description)
    prepare_output(out, description, resume, overwrite)  # refuse a wrong --out before any long work
    cache = ensure_cache(cohort_dir, cache_config, cache_dir=cache_path, jobs=settings.jobs,
                         quiet=settings.quiet, ids=settings.patients)
    ids = [pid for pid in cache.ids if settings.patients is None or pid in settings.patients]
    skipped: dict[str, str] = {pid: f"not cached: {reason}" for pid, reason in cache.failed.items()
                               if settings.patients is None or pid in settings.patients}
    if settings.patients:
        absent = [pid for pid in settings.patients if pid not in ids and pid not in skipped]
        if absent:
            raise InputError(f"patient(s) {', '.join(absent)} not found in cohort {cohort_dir}")
    if not ids:
        raise InputError(f"no patient of cohort {cohort_dir} could be read: "
                         + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    skipped.update(check_model_channels(cache, specs, model_dir, ids))
    todo_ids = [pid for pid in ids if pid not in skipped]
    previous_patients = []
    try:
        previous_patients = json.loads((out / JOB_FILE).read_text()).get("patients", [])
    except (OSError, ValueError):
        pass
    _write_job(out, description, sorted(set(previous_patients) | set(todo_ids)))

    runner = TileModel(model, device)
    done, reused = [], []
    total = len(todo_ids)
    for number, pid in enumerate(todo_ids):
        final = out / pid
        if patient_done(final, key):
            reused.append(pid)
        else:
            if settings.progress_json:
                emit_progress("encode", number, total, patient=pid)
            try:
                _encode_one(runner, cache[pid], specs, settings, out, key, patient_hook)
            except InputError as error:
                skipped[pid] = str(error)
                continue
        done.append(pid)
    if settings.progress_json:
        emit_progress("encode", total, total)
    for pid, reason in skipped.items():
        log.warning("patient %s skipped: %s", pid, reason)

    tables = _write_tables(out, done, skipped, write_csv_atomic)
    if settings.traverse and done:
        from DeepDosimetricsLib.deep.encode.traversal import traverse_cohort

        tables["traverse_std"] = traverse_cohort(runner, cache, specs, out, done, settings)
    write_json_atomic(out / JOB_FILE, {"key": key, "description": description,
                                       "patients": sorted(set(previous_patients) | set(done)),
                                       "skipped": skipped})
    for partial in out.glob(".partial-*"):
        shutil.rmtree(partial, ignore_errors=True)
    return EncodeResult(out, done, skipped, reused, tables)


def _encode_one(runner: TileModel, cp, specs, settings: EncodeSettings, out, key: str,
                patient_hook: Optional[PatientHook]) -> None:
    """All outputs of one patient, built in ``.partial-<id>`` and renamed to ``<id>`` when complete."""

    from DeepDosimetricsLib.deep.encode.reconstruction import (
        ReconstructionOptions,
        air_values,
        write_reconstruction,
    )
    from DeepDosimetricsLib.deep.tiling import NpyChannelSink
    from DeepDosimetricsLib.runtime.atomic import replace_folder, write_csv_atomic, write_json_atomic

    final = out / cp.id
    partial = out / f".partial-{cp.id}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    sink = None
    if settings.reconstruct:
        sink = NpyChannelSink([partial / ".stitch" / f"channel{c}.npy" for c in range(len(specs))], cp.shape)
    fill = air_values(cp, specs)
    encoded = encode_patient(runner, cp, specs, settings.overlap, settings.batch, sink, fill, settings.quiet)
    write_csv_atomic(encoded.tile_table(cp.geometry), partial / "tiles.csv")
    write_csv_atomic(encoded.feature_table(), partial / "features.csv")
    if sink is not None:
        sink.close()
        options = ReconstructionOptions(residuals=settings.residuals, compress=settings.compress)
        rows = write_reconstruction(cp, specs, sink.read, partial / "recon", options)
        sink.remove()
        shutil.rmtree(partial / ".stitch", ignore_errors=True)
        write_csv_atomic(pd.DataFrame(rows, columns=["patient", "channel", "metric", "value"]),
                         partial / "metrics.csv")
        if patient_hook is not None:
            patient_hook(cp.id, partial, specs)
    write_json_atomic(partial / DONE_FILE, {"key": key, "patient": cp.id, "tiles": len(encoded.positions)})
    replace_folder(partial, final)


def _write_tables(out, done: Sequence[str], skipped: dict[str, str], write_csv_atomic) -> dict:
    """Concatenate the finished patients' tables into the top-level tables."""
    tables = {}
    for name in ("features.csv", "tiles.csv", "metrics.csv"):
        parts = [out / pid / name for pid in done if (out / pid / name).is_file()]
        path = out / name
        if parts:
            frames = [pd.read_csv(p) for p in parts]
            tables[name.split(".")[0]] = write_csv_atomic(pd.concat(frames, ignore_index=True), path)
        elif path.exists():
            path.unlink()
    skipped_path = out / "skipped.csv"
    if skipped:
        frame = pd.DataFrame(sorted(skipped.items()), columns=["patient", "reason"])
        tables["skipped"] = write_csv_atomic(frame, skipped_path)
    elif skipped_path.exists():
        skipped_path.unlink()
    return tables
