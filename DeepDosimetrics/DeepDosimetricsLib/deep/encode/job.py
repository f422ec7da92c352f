"""The cohort encoding job (`deepdosimetrics encode`): every patient of a cohort through a trained model.

Writes ``<out>/<patient>/{features.csv, tiles.csv, metrics.csv, recon/*.nrrd, snapshots/*.png, scene.mrb,
done.json}`` patient by patient (each in a temporary folder renamed when complete, so ``--resume`` skips
finished patients), then the cohort tables and ``summary.json`` (patients encoded, reused, and left out with
the reason: refused by the cache, lacking a channel the model needs, failed). The per-patient encoder is in
``encoder.py``.

One job owns the output folder: it holds ``<out>/.deepdosimetrics.lock`` while it runs, and a second job
on the same folder is refused at once, naming the holder (runtime/locks.py). The cache is shared: its
patients are built under per-patient locks (deep/cache/build.py).

Under ``torchrun`` (WORLD_SIZE > 1) the patients are split across the ranks: rank r builds the cache of
patients r, r+W, ... and encodes the same share; after a barrier rank 0 writes the cohort tables (and the
traversal) from the patients' folders in cohort order, so the outputs are those of one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd

from DeepDosimetricsLib.deep.channels import ChannelSpec
from DeepDosimetricsLib.deep.distributed import DistributedContext
from DeepDosimetricsLib.deep.encode.encoder import TileModel, encode_patient, feature_names
from DeepDosimetricsLib.deep.encode.outputs import DONE_FILE, JOB_FILE, SUMMARY_FILE, TABLES
from DeepDosimetricsLib.deep.encode.settings import EncodeSettings
from DeepDosimetricsLib.runtime.devices import resolve_device
from DeepDosimetricsLib.runtime.locks import JOB_LOCK, job_lock

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
    content = [p for p in out.iterdir() if p.name != JOB_LOCK] if out.is_dir() else []
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
            for name in (*TABLES, JOB_FILE, SUMMARY_FILE):
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
        model_dir: a trained model folder (``model.json`` + ``model.pt``), or a shipped model's name.
        cohort_dir: the cohort folder (one sub-folder per patient).
        out_dir: the output folder; per patient ``features.csv`` (one row per structure, features z00...),
            ``tiles.csv`` (one row per tile: position in voxels and mm, features), with ``reconstruct``
            ``recon/*.nrrd`` on the CT grid and ``metrics.csv``; cohort tables and ``summary.json`` at the top.
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

    from DeepDosimetricsLib.deep.cache.store import COHORT_MANIFEST, CacheConfig, open_cache
    from DeepDosimetricsLib.deep.channels import parse_channels
    from DeepDosimetricsLib.deep.model import load_model, read_model_json
    from DeepDosimetricsLib.deep.shipped import resolve_model
    from DeepDosimetricsLib.runtime.errors import InputError

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
    model_dir = resolve_model(model_dir)  # a shipped model's name stands for its folder
    read_model_json(model_dir)  # a clear error for a folder that is not a model, before the cache work
    ranks = DistributedContext.from_environment()
    device = resolve_device(settings.device)
    if ranks.world_size > 1 and device.type == "cuda":  # under torchrun: one GPU per rank
        import torch

        device = torch.device("cuda", ranks.local_rank)
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
    started_group = ranks.world_size > 1 and not _group_initialised()
    ranks.init(device.type)
    ranks.set_device(device)
    with contextlib.ExitStack() as stack:
        if started_group:
            stack.callback(ranks.close)
        # rank 0 takes the folder's lock and checks it; every rank stops on its refusal
        refusal = None
        if ranks.is_main:
            try:
                if out.exists() and not out.is_dir():
                    raise InputError(f"output {out} exists and is not a folder")
                stack.enter_context(job_lock(out, "encode", what="wait for it to finish or choose another --out"))
                prepare_output(out, description, resume, overwrite)  # refuse a wrong --out before long work
            except InputError as error:
                refusal = error
        refusals = [r for r in _all_ranks(ranks, None if refusal is None else str(refusal)) if r]
        if refusal is not None:
            raise refusal
        if refusals:
            raise InputError(refusals[0])
        return _encode_patients(model, config, specs, device, model_dir, cohort_dir, out, cache_path,
                                cache_config, settings, description, key, patient_hook, ranks)


def _group_initialised() -> bool:
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()
    except ImportError:  # pragma: no cover
        return False


def _all_ranks(ranks: DistributedContext, value) -> list:
    """[value of rank 0, value of rank 1, ...]; [value] in one process."""
    return ranks.gather_objects(value) if ranks.active else [value]


def _encode_patients(model, config, specs, device, model_dir, cohort_dir, out: Path, cache_path, cache_config,
                     settings: EncodeSettings, description: dict, key: str,
                     patient_hook: Optional[PatientHook], ranks: DistributedContext) -> EncodeResult:
    """The cache, then every patient of this rank's share, then (rank 0) the cohort tables."""
    from DeepDosimetricsLib.data.cohort import Cohort
    from DeepDosimetricsLib.deep.cache.build import ensure_cache
    from DeepDosimetricsLib.deep.cache.store import default_cache_dir, open_cache
    from DeepDosimetricsLib.runtime.atomic import write_csv_atomic, write_json_atomic
    from DeepDosimetricsLib.runtime.errors import InputError
    from DeepDosimetricsLib.runtime.pools import PoolSpec
    from DeepDosimetricsLib.runtime.progress import emit_progress

    pool = PoolSpec(jobs=settings.jobs, scheduler=getattr(settings, "scheduler", None))
    if ranks.active:  # each rank builds the cache of its share of the patients
        wanted = Cohort.open(cohort_dir, patient_ids=settings.patients).ids
        share = wanted[ranks.rank::ranks.world_size]
        folder = cache_path or default_cache_dir(cohort_dir, cache_config)
        if share:
            ensure_cache(cohort_dir, cache_config, cache_dir=folder, jobs=pool, quiet=settings.quiet, ids=share)
        ranks.barrier()
        cache = open_cache(folder)
    else:
        cache = ensure_cache(cohort_dir, cache_config, cache_dir=cache_path, jobs=pool,
                             quiet=settings.quiet, ids=settings.patients)
        wanted = settings.patients
    ids = [pid for pid in cache.ids if wanted is None or pid in wanted]
    skipped: dict[str, str] = {pid: f"not cached: {reason}" for pid, reason in cache.failed.items()
                               if wanted is None or pid in wanted}
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
    if ranks.is_main:
        _write_job(out, description, sorted(set(previous_patients) | set(todo_ids)))
    ranks.barrier()

    runner = TileModel(model, device)
    done, reused, failed = [], [], {}
    mine = todo_ids[ranks.rank::ranks.world_size]
    total = len(todo_ids)
    for number, pid in enumerate(mine):
        final = out / pid
        if patient_done(final, key):
            reused.append(pid)
        else:
            if settings.progress_json:
                emit_progress("encode", number * ranks.world_size + ranks.rank, total, patient=pid,
                              **({"rank": ranks.rank} if ranks.active else {}))
            try:
                _encode_one(runner, cache[pid], specs, settings, out, key, patient_hook)
            except InputError as error:
                failed[pid] = str(error)
                continue
        done.append(pid)
    if ranks.active:  # every rank learns what the others did; the cohort order is kept
        results = _all_ranks(ranks, (done, reused, failed))
        finished = {pid for rank_done, _, _ in results for pid in rank_done}
        done = [pid for pid in todo_ids if pid in finished]
        reused = [pid for pid in todo_ids if any(pid in rank_reused for _, rank_reused, _ in results)]
        for _, _, rank_failed in results:
            failed.update(rank_failed)
        failed = {pid: failed[pid] for pid in todo_ids if pid in failed}
    skipped.update(failed)
    if settings.progress_json and ranks.is_main:
        emit_progress("encode", total, total)
    tables: dict = {}
    if ranks.is_main:
        for pid, reason in skipped.items():
            log.warning("patient %s skipped: %s", pid, reason)
        tables = _write_tables(out, done, skipped, write_csv_atomic)
        if settings.traverse and done:
            from DeepDosimetricsLib.deep.encode.traversal import traverse_cohort

            tables["traverse_std"] = traverse_cohort(runner, cache, specs, out, done, settings)
        write_json_atomic(out / JOB_FILE, {"key": key, "description": description,
                                           "patients": sorted(set(previous_patients) | set(done)),
                                           "skipped": skipped})
        write_json_atomic(out / SUMMARY_FILE, {"patients_encoded": [p for p in done if p not in reused],
                                               "patients_reused": reused, "left_out_patients": skipped})
        for partial in out.glob(".partial-*"):
            shutil.rmtree(partial, ignore_errors=True)
    ranks.barrier()  # the other ranks return once the tables are written
    return EncodeResult(out, done, skipped, reused, tables)


def _encode_one(runner: TileModel, cp, specs, settings: EncodeSettings, out, key: str,
                patient_hook: Optional[PatientHook]) -> None:
    """All outputs of one patient, built in ``.partial-<id>`` and renamed to ``<id>`` when complete."""

    from DeepDosimetricsLib.deep.encode.reconstruction import (
        ReconstructionOptions,
        air_values,
        can_stream,
        write_reconstruction,
        write_reconstruction_streamed,
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
        if can_stream(cp):  # block by block from the stitched files: no whole volume in memory
            rows = write_reconstruction_streamed(cp, specs, sink.paths, partial / "recon", options)
        else:  # a resampled cache: whole channels through SimpleITK's resampling
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
