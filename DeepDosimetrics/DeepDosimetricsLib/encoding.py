"""Encode patients with a trained tile autoencoder: per-tile features, per-structure summaries, and
(optionally) the stitched reconstruction, in one pass over the tiles that touch the body.

For one cached patient, :func:`encode_patient` lays a :class:`~.tiling.TileGrid` over the volume
(stride ``tile * (1 - overlap)``), keeps the tiles holding at least one body voxel, and runs the model
on them in batches (``torch.inference_mode``; channels_last_3d on CPU, bfloat16 autocast on CUDA).
Each tile's K features are kept with its position and the voxel count of every structure inside it;
a structure's features are the mean and standard deviation of the tile features weighted by those
counts (``BODY``: the whole body). With a sink, the decoded tiles are blended into it slab by slab.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .channels import ChannelSpec
from .tiling import Sink, SlabStitcher, TileGrid, Triple, batched, tiles_touching

log = logging.getLogger(__name__)

#: name of the whole-body "structure" in the feature tables
BODY = "BODY"


def feature_names(count: int) -> list[str]:
    """``z00``, ``z01``, ... for ``count`` features."""
    return [f"z{index:02d}" for index in range(count)]


def resolve_device(name: str = "auto"):
    """A torch device: ``auto`` picks CUDA when available, else the CPU."""
    import torch

    from .errors import InputError

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InputError(f"unknown device {name!r} ({error}); use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for, but this torch build sees no CUDA GPU; use --device cpu")
    return device


class TileModel:
    """Runs a TileAutoencoder on numpy batches: encode (B, C, t, t, t) -> (B, K), decode back."""

    def __init__(self, model, device="cpu"):
        import torch

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self._channels_last = self.device.type == "cpu"
        if self._channels_last:
            self.model.to(memory_format=torch.channels_last_3d)

    def _autocast(self):
        import contextlib

        import torch

        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # bf16 on CPUs without native support is far slower

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """(B, C, t, t, t) float32 in [0, 1] -> (B, K) float32 features."""
        import torch

        with torch.inference_mode(), self._autocast():
            x = torch.from_numpy(np.ascontiguousarray(tiles, np.float32)).to(self.device, non_blocking=True)
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            return self.model.encode(x).float().cpu().numpy()

    def decode(self, features: np.ndarray) -> np.ndarray:
        """(B, K) features -> (B, C, t, t, t) float32 in [0, 1] (C-contiguous)."""
        return np.ascontiguousarray(np.moveaxis(self.decode_channels_last(features), -1, 1))

    def decode_channels_last(self, features: np.ndarray) -> np.ndarray:
        """(B, K) features -> (B, t, t, t, C) float32 in [0, 1]: no layout copy after a channels_last network."""
        import torch

        with torch.inference_mode(), self._autocast():
            z = torch.from_numpy(np.ascontiguousarray(features, np.float32)).to(self.device)
            values = self.model.decode(z).float().permute(0, 2, 3, 4, 1)
            return values.contiguous().cpu().numpy()  # a no-op copy for channels_last output


@dataclass
class PatientTiles:
    """The encoded tiles of one patient."""

    patient: str
    grid: TileGrid
    positions: list[Triple]
    features: np.ndarray  # (N, K) float32
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # structure -> voxels per tile (N,)

    def tile_table(self, geometry=None) -> pd.DataFrame:
        """One row per tile: index, start (z, y, x) on the cache grid, centre in LPS mm, voxel counts, features."""
        starts = np.asarray(self.positions, dtype=int).reshape(-1, 3)
        table = pd.DataFrame({"patient": self.patient, "tile": np.arange(len(starts))})
        table["z"], table["y"], table["x"] = starts[:, 0], starts[:, 1], starts[:, 2]
        if geometry is not None and len(starts):
            centre_zyx = starts + (np.asarray(self.grid.tile) - 1) / 2.0
            lps = np.array([geometry.index_to_physical(c[::-1]) for c in centre_zyx])
            table["center_x_mm"], table["center_y_mm"], table["center_z_mm"] = lps[:, 0], lps[:, 1], lps[:, 2]
        for name, counts in self.counts.items():
            table[f"voxels_{name}"] = counts
        for index, name in enumerate(feature_names(self.features.shape[1])):
            table[name] = self.features[:, index]
        return table

    def feature_table(self) -> pd.DataFrame:
        """Long table ``patient, structure, feature, value``: count-weighted mean and std per structure."""
        names = feature_names(self.features.shape[1])
        rows = []
        for structure, counts in self.counts.items():
            if counts.sum() <= 0:
                continue
            mean, std = weighted_mean_std(self.features, counts)
            for name, m, s in zip(names, mean, std):
                rows.append((self.patient, structure, f"{name}_mean", float(m)))
                rows.append((self.patient, structure, f"{name}_std", float(s)))
        return pd.DataFrame(rows, columns=["patient", "structure", "feature", "value"])


def weighted_mean_std(features: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) standard deviation of ``features`` (N, K) weighted by ``weights`` (N,)."""
    w = np.asarray(weights, np.float64)
    values = np.asarray(features, np.float64)
    total = w.sum()
    mean = (w[:, None] * values).sum(axis=0) / total
    variance = (w[:, None] * (values - mean) ** 2).sum(axis=0) / total
    return mean, np.sqrt(np.maximum(variance, 0.0))


def structure_counts(cached_patient, grid: TileGrid, positions: Sequence[Triple],
                     structures: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """Voxels of the body and of each structure inside each tile (inside the volume).

    Each mask is read once per row of tiles (a slab one tile deep) through ``read_tile``, so no whole
    mask stays resident and the reads stay few.
    """
    from .channels import mask

    names = [BODY] + [s for s in (cached_patient.structure_names if structures is None else structures)
                      if s != BODY]
    index = {tuple(start): number for number, start in enumerate(positions)}
    rows: dict[int, list[Triple]] = {}
    for start in positions:
        rows.setdefault(start[0], []).append(start)
    _, height, width = cached_patient.shape
    tz, ty, tx = grid.tile
    counts = {name: np.zeros(len(positions), np.int64) for name in names}
    for name in names:
        spec = [mask(name)]
        for z, starts in rows.items():
            slab = cached_patient.read_tile(spec, (z, 0, 0), (min(tz, grid.shape[0] - z), height, width))[0] > 0
            for start in starts:
                _, y, x = start
                counts[name][index[tuple(start)]] = np.count_nonzero(slab[:, y : y + ty, x : x + tx])
    return counts


def body_slab_reader(cached_patient):
    """``(z0, z1) -> body[z0:z1]`` (float32 0/1) read through ``read_tile``, for :func:`tiles_touching`."""
    from .channels import mask

    spec = [mask(BODY)]
    _, height, width = cached_patient.shape
    return lambda z0, z1: cached_patient.read_tile(spec, (z0, 0, 0), (z1 - z0, height, width))[0]


def encode_patient(
    runner: TileModel,
    cached_patient,
    specs: Sequence[ChannelSpec],
    overlap: float = 0.25,
    batch: int = 8,
    sink: Optional[Sink] = None,
    fill: Optional[Sequence[float]] = None,
    quiet: bool = True,
) -> PatientTiles:
    """Encode the body tiles of one cached patient; with ``sink``, also stream the stitched reconstruction."""
    from .progress import progress_bar

    cp = cached_patient
    tile = runner.config.tile
    grid = TileGrid.create(cp.shape, tile, overlap)
    positions = tiles_touching(grid, body_slab_reader(cp))
    channels = len(specs)
    features = np.zeros((len(positions), runner.config.features), np.float32)
    stitcher = SlabStitcher(grid.shape, channels, grid.tile, sink, fill=fill) if sink is not None else None
    buffer = np.empty((batch, channels, *grid.tile), np.float32)
    done = 0
    bar = progress_bar(range(len(positions)), total=len(positions), desc=f"encode {cp.id}", quiet=quiet)
    for group in batched(positions, batch):
        inputs = buffer[: len(group)]
        for slot, start in enumerate(group):
            cp.read_tile(list(specs), start, grid.tile, out=inputs[slot])
        codes = runner.encode(inputs)
        features[done : done + len(group)] = codes
        if stitcher is not None:
            for start, values in zip(group, runner.decode_channels_last(codes)):
                stitcher.add_channels_last(start, values)
        done += len(group)
        bar.update(len(group))
    bar.close()
    if stitcher is not None:
        stitcher.finish()
    counts = structure_counts(cp, grid, positions)
    return PatientTiles(cp.id, grid, positions, features, counts)


def decode_tiles(
    runner: TileModel,
    grid: TileGrid,
    positions: Sequence[Triple],
    features: np.ndarray,
    sink: Sink,
    fill: Optional[Sequence[float]] = None,
    batch: int = 8,
) -> None:
    """Decode given per-tile features (N, K) and blend the tiles into ``sink`` (e.g. a latent traversal)."""
    ordered = sorted(range(len(positions)), key=lambda i: tuple(positions[i]))
    stitcher = SlabStitcher(grid.shape, len(runner.config.channels), grid.tile, sink, fill=fill)
    for group in batched(ordered, batch):
        for index, values in zip(group, runner.decode_channels_last(features[list(group)])):
            stitcher.add_channels_last(positions[index], values)
    stitcher.finish()


# ---------------------------------------------------------------------------------------------------
# The cohort job: `deepdosimetrics encode`
# ---------------------------------------------------------------------------------------------------
JOB_FILE = "encode.json"
DONE_FILE = "done.json"
#: top-level tables the job writes (and --overwrite removes)
TABLES = ("features.csv", "tiles.csv", "metrics.csv", "skipped.csv", "traverse_std.csv")


@dataclass
class EncodeSettings:
    """Options of a cohort encoding (those in :meth:`key_fields` decide whether outputs can be reused)."""

    overlap: float = 0.25
    batch: int = 8
    device: str = "auto"
    reconstruct: bool = False
    residuals: bool = True
    snapshots: bool = False
    scene: bool = False
    compress: bool = False
    traverse: Optional[list[str]] = None  # feature names (z00, ...) to shift; None: no traversal
    sigmas: tuple[float, ...] = (-2.0, 2.0)
    patients: Optional[list[str]] = None  # a subset of the cohort; None: all
    jobs: int = 1  # processes building the cache
    quiet: bool = False
    progress_json: bool = True  # `@progress` lines on stdout

    def key_fields(self) -> dict:
        """What a finished patient's outputs depend on (batch size and device do not change them)."""
        return {"overlap": self.overlap, "reconstruct": self.reconstruct, "residuals": self.residuals,
                "snapshots": self.snapshots, "scene": self.scene, "compress": self.compress}


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

    from .model import MODEL_WEIGHTS

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

    from .errors import InputError

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
    from .cache import write_json_atomic

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
    from .errors import InputError

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
) -> EncodeResult:
    """Encode (and reconstruct) every patient of a cohort into ``out_dir``; see the module docstring.

    Each patient is written into a temporary folder that is renamed to ``<out>/<patient>`` once complete
    (with ``done.json``), so an interrupted run resumes (``resume=True``) without redoing finished
    patients. A patient that lacks a channel the model needs (e.g. no dose) is skipped with its reason.
    """

    from .cache import COHORT_MANIFEST, CacheConfig, ensure_cache, open_cache, write_json_atomic
    from .channels import parse_channels
    from .errors import InputError
    from .model import load_model, read_model_json
    from .progress import emit_progress
    from .tables import write_csv_atomic

    settings = settings or EncodeSettings()
    out = Path(out_dir)
    if not 0.0 <= settings.overlap < 1.0:
        raise InputError(f"--overlap must be in [0, 1), got {settings.overlap:g}")
    if settings.batch < 1:
        raise InputError(f"--batch must be at least 1, got {settings.batch}")
    if (settings.snapshots or settings.scene or settings.traverse) and not settings.reconstruct:
        raise InputError("--snapshots, --scene and --traverse need --reconstruct")
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
                _encode_one(runner, cache[pid], specs, settings, out, key, cohort_dir)
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
        from .traversal import traverse_cohort

        tables["traverse_std"] = traverse_cohort(runner, cache, specs, out, done, settings)
    write_json_atomic(out / JOB_FILE, {"key": key, "description": description,
                                       "patients": sorted(set(previous_patients) | set(done)),
                                       "skipped": skipped})
    for partial in out.glob(".partial-*"):
        shutil.rmtree(partial, ignore_errors=True)
    return EncodeResult(out, done, skipped, reused, tables)


def _encode_one(runner: TileModel, cp, specs, settings: EncodeSettings, out, key: str, cohort_dir) -> None:
    """All outputs of one patient, built in ``.partial-<id>`` and renamed to ``<id>`` when complete."""

    from .cache import write_json_atomic
    from .reconstruction import ReconstructionOptions, air_values, write_reconstruction
    from .tables import write_csv_atomic
    from .tiling import NpyChannelSink

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
        if settings.snapshots:
            from .snapshots import write_snapshots

            write_snapshots(partial / "recon", partial / "snapshots", specs)
        if settings.scene:
            from .snapshots import write_patient_scene

            write_patient_scene(cohort_dir, cp.id, partial / "recon", partial / "scene.mrb", specs,
                                snapshot_dir=partial / "snapshots" if settings.snapshots else None)
    write_json_atomic(partial / DONE_FILE, {"key": key, "patient": cp.id, "tiles": len(encoded.positions)})
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


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
