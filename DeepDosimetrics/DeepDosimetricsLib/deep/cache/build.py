"""Building the preprocessing cache: resample, crop to the body, write memory-mapped arrays.

Memory stays bounded by about the patient's CT plus one full-size input image (the dose, as float32)
at a time: volumes are resampled slab by slab straight into the ``.npy`` memmaps, structures one at a
time, and no whole-volume float copy of the output is made. Each patient is written into a temporary
folder that is renamed last, so an interrupted build leaves no half patient under its final name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from DeepDosimetricsLib.data.geometry import Geometry
from DeepDosimetricsLib.data.modality import CT
from DeepDosimetricsLib.deep.cache.store import (
    COHORT_MANIFEST,
    FORMAT_VERSION,
    PATIENT_MANIFEST,
    TARGET_NAME,
    CacheConfig,
    CachedCohort,
    PathLike,
    default_cache_dir,
    grid_offset,
    open_cache,
    patient_is_complete,
)
from DeepDosimetricsLib.deep.channels import AIR_HU
from DeepDosimetricsLib.runtime.atomic import write_json_atomic
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError, InputError
from DeepDosimetricsLib.runtime.locks import LOCK_FOLDER, file_lock
from DeepDosimetricsLib.runtime.pools import PoolSpec, as_pool, run_tasks

if TYPE_CHECKING:  # SimpleITK is imported where a patient is built (data.patient still imports it when
    # ensure_cache opens the cohort: a training run loads it today)
    import SimpleITK as sitk

log = logging.getLogger(__name__)

#: where patients are built before being renamed into place (one sub-folder per patient)
TEMPORARY_FOLDER = ".tmp"

#: voxels resampled per slab (bounds the temporary output image of sitk.Resample)
SLAB_VOXELS = 4_000_000


# ---------------------------------------------------------------------- geometry
def resampled_geometry(geometry: Geometry, spacing: Optional[Sequence[float]]) -> Geometry:
    """The grid covering the same extent as ``geometry`` with a new spacing (same grid when None)."""
    if spacing is None:
        return geometry
    old = np.asarray(geometry.spacing, dtype=float)
    new = np.asarray(spacing, dtype=float)
    if np.allclose(old, new, rtol=0, atol=1e-6):
        return geometry
    size = np.maximum(1, np.round(np.asarray(geometry.size) * old / new)).astype(int)
    origin = np.asarray(geometry.origin) + geometry.direction_matrix @ ((new - old) / 2.0)
    return Geometry(
        size=tuple(int(v) for v in size),
        spacing=tuple(float(v) for v in new),
        origin=tuple(float(v) for v in origin),
        direction=geometry.direction,
    )


def sub_geometry(geometry: Geometry, start_xyz: Sequence[int], size_xyz: Sequence[int]) -> Geometry:
    """The part of a grid starting at index ``start_xyz`` with ``size_xyz`` voxels."""
    origin = geometry.index_to_physical([float(v) for v in start_xyz])
    return Geometry(
        size=tuple(int(v) for v in size_xyz),
        spacing=geometry.spacing,
        origin=tuple(float(v) for v in origin),
        direction=geometry.direction,
    )


def body_crop(
    body_zyx: np.ndarray, original: Geometry, resampled: Geometry, margin_mm: float
) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    """Start and size (x, y, z) in the resampled grid of the body's bounding box plus a margin.

    An empty body keeps the whole grid.
    """
    size = np.asarray(resampled.size, dtype=int)
    axes_any = [np.flatnonzero(body_zyx.any(axis=axes)) for axes in ((0, 1), (0, 2), (1, 2))]  # x, y, z
    if any(indices.size == 0 for indices in axes_any):
        return (0, 0, 0), tuple(int(v) for v in size)
    lo = np.array([indices[0] for indices in axes_any], dtype=float) - 0.5
    hi = np.array([indices[-1] for indices in axes_any], dtype=float) + 0.5
    corners = [original.index_to_physical([x, y, z]) for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
               for z in (lo[2], hi[2])]
    indices = np.array([resampled.physical_to_index(c) for c in corners])
    margin = margin_mm / np.asarray(resampled.spacing)
    start = np.floor(indices.min(axis=0) + 0.5 - margin).astype(int)
    stop = np.ceil(indices.max(axis=0) - 0.5 + margin).astype(int) + 1
    start = np.clip(start, 0, size - 1)
    stop = np.clip(stop, start + 1, size)
    return tuple(int(v) for v in start), tuple(int(v) for v in stop - start)


# ---------------------------------------------------------------------- writing volumes
def resample_into(
    image: sitk.Image, target: Geometry, out: np.ndarray, interpolator: int, default: float
) -> None:
    """Resample ``image`` onto ``target`` into the (z, y, x) array ``out``, slab by slab.

    Aligned grids (same spacing and direction, integer offset) are copied without interpolation.
    """
    import SimpleITK as sitk

    source = Geometry.from_image(image)
    offset = grid_offset(source, target)
    depth = max(1, SLAB_VOXELS // max(1, target.size[0] * target.size[1]))
    if offset is not None:
        view = sitk.GetArrayViewFromImage(image)
        shape = np.asarray(view.shape)  # z, y, x
        start = offset[::-1]
        lo = np.clip(start, 0, shape)
        hi = np.clip(start + np.asarray(out.shape), 0, shape)
        if np.any(hi <= lo) or np.any(lo != start) or np.any(hi != start + np.asarray(out.shape)):
            out[...] = default
        if np.all(hi > lo):
            for z in range(lo[0], hi[0], depth):
                z_end = min(z + depth, hi[0])
                out[z - start[0]:z_end - start[0], lo[1] - start[1]:hi[1] - start[1],
                    lo[2] - start[2]:hi[2] - start[2]] = view[z:z_end, lo[1]:hi[1], lo[2]:hi[2]]
        return
    # integers interpolated linearly are computed in float32 and rounded (ITK would truncate)
    rounding = out.dtype.kind in "iu" and interpolator != sitk.sitkNearestNeighbor
    pixel = sitk.sitkFloat32 if rounding else image.GetPixelID()
    for z in range(0, target.size[2], depth):
        z_end = min(z + depth, target.size[2])
        slab = sub_geometry(target, (0, 0, z), (target.size[0], target.size[1], z_end - z))
        resampled = sitk.Resample(image, slab.reference_image(pixel), sitk.Transform(), interpolator,
                                  float(default), pixel)
        values = sitk.GetArrayViewFromImage(resampled)
        out[z:z_end] = np.rint(values) if rounding else values
        del values, resampled


def write_volume(
    folder: Path, file_name: str, image: sitk.Image, target: Geometry, dtype, interpolator: int, default: float
) -> None:
    """Resample ``image`` onto ``target`` into a new memory-mapped ``.npy`` file."""
    out = np.lib.format.open_memmap(folder / file_name, mode="w+", dtype=dtype, shape=target.shape_zyx)
    resample_into(image, target, out, interpolator, default)
    out.flush()
    del out


def stored_structures(
    names: Sequence[str], config: CacheConfig, body_name: Optional[str], patient_id: str = "?"
) -> Tuple[Optional[str], Dict[str, str]]:
    """The target's original name and stored name -> original name of the structures to cache."""
    from DeepDosimetricsLib.data.synonyms import choose_target, normalize_name, safe_name

    candidates = [name for name in names if name != body_name]
    target = choose_target(candidates, preferred=config.target)
    if config.target is not None and target is None:
        raise InputError(
            f"patient {patient_id}: no structure matches the target {config.target!r} "
            f"(structures: {', '.join(names) or 'none'})"
        )
    wanted = None
    if config.structures is not None:
        wanted = {normalize_name(name) for name in config.structures} | set(config.structures)
    stored: Dict[str, str] = {}
    if target is not None:
        stored[TARGET_NAME] = target
    for name in candidates:
        if name == target:
            continue
        canonical = normalize_name(name)
        if wanted is not None and canonical not in wanted and name not in wanted:
            continue
        key = safe_name(canonical)
        if key in stored or key.upper() in ("BODY", TARGET_NAME):
            key = safe_name(name)
        if key in stored:
            log.warning("structure %r has the same name as %r once normalised; kept the first", name, stored[key])
            continue
        stored[key] = name
    return target, stored


#: clinical.csv columns that may hold the prescription in Gy
PRESCRIPTION_COLUMNS = ("prescription_gy", "prescription", "rx_gy")


def clinical_prescriptions(clinical) -> Dict[str, float]:
    """Patient id -> prescription (Gy) from a clinical table's prescription column, if it has one."""
    if clinical is None:
        return {}
    column = next((c for c in clinical.columns if str(c).lower() in PRESCRIPTION_COLUMNS), None)
    if column is None:
        return {}
    values = {}
    for pid, value in zip(clinical["patient"], clinical[column]):
        try:
            if float(value) > 0:
                values[str(pid)] = float(value)
        except (TypeError, ValueError):
            continue
    return values


def prescription_of(
    patient, target: Optional[str], clinical_gy: Optional[float] = None
) -> Tuple[Optional[float], Optional[str]]:
    """The prescription in Gy and where it comes from: the patient object, the cohort's clinical table,
    the phantom's ``phantom.json`` plan, or the dose level in the target's name (PTV70 -> 70)."""
    value = getattr(patient, "prescription_gy", None)
    if value:
        return float(value), "patient"
    if clinical_gy:
        return float(clinical_gy), "clinical.csv"
    folder = getattr(patient, "folder", None)
    if folder is not None and (Path(folder) / "phantom.json").is_file():
        try:
            plan = json.loads((Path(folder) / "phantom.json").read_text()).get("plan", {})
            if float(plan.get("prescription_gy", 0)) > 0:
                return float(plan["prescription_gy"]), "phantom.json"
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    if target is not None:
        from DeepDosimetricsLib.data.synonyms import dose_level

        level = dose_level(target)
        if level:
            return float(level), f"target name {target}"
    return None, None


def build_patient(
    patient, folder: PathLike, config: CacheConfig, prescription_gy: Optional[float] = None
) -> dict:
    """Write one patient's cache entry into ``folder`` (created fresh) and return its manifest.

    ``prescription_gy`` comes from the cohort's clinical table when it has a prescription column.
    """
    import SimpleITK as sitk

    started = time.perf_counter()
    modality = getattr(patient, "modality", CT)
    if modality != CT:  # the channels are HU windows and the body comes from HU
        raise InputError(f"patient {patient.id}: its image is {modality}, not a CT; the cache (train, encode) "
                         "reads CT values in HU")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=False)
    ct = patient.ct_image()
    original = Geometry.from_image(ct)
    resampled = resampled_geometry(original, config.spacing)
    body_name = patient.body_structure_name() if hasattr(patient, "body_structure_name") else None

    body = patient.body()
    start, size = body_crop(body, original, resampled, config.margin_mm)
    cropped = sub_geometry(resampled, start, size)
    body_image = original.image_from_array(body)
    del body
    files = {"hu": "hu.npy", "body": "body.npy"}
    write_volume(folder, files["body"], body_image, cropped, np.uint8, sitk.sitkNearestNeighbor, 0)
    del body_image
    write_volume(folder, files["hu"], ct, cropped, np.int16, sitk.sitkLinear, AIR_HU)

    target, stored = stored_structures(patient.structure_names, config, body_name, patient.id)
    structures, skipped = {}, {}
    for key, original_name in stored.items():
        file_name = f"mask_{key}.npy"
        try:
            mask = patient.structure_image(original_name)
        except InputError as error:  # an empty or unreadable structure: the rest of the patient is kept
            log.warning("%s; left out of the cache", error)
            skipped[original_name] = str(error)
            continue
        write_volume(folder, file_name, mask, cropped, np.uint8, sitk.sitkNearestNeighbor, 0)
        del mask
        structures[key] = {"original": original_name, "file": file_name}

    if patient.has_dose:
        files["dose"] = "dose.npy"
        dose = patient.dose_image()
        write_volume(folder, files["dose"], dose, cropped, np.float16, sitk.sitkLinear, 0.0)
        del dose
    prescription, prescription_source = prescription_of(patient, target, prescription_gy)
    manifest = {
        "format_version": FORMAT_VERSION,
        "config_hash": config.hash(),
        "config": config.to_dict(),
        "patient": patient.id,
        "source": str(patient.folder) if getattr(patient, "folder", None) is not None else patient.source,
        "original_geometry": original.to_dict(),
        "resampled_geometry": resampled.to_dict(),
        "cropped_geometry": cropped.to_dict(),
        "crop": {"start": list(start), "size": list(size), "margin_mm": config.margin_mm},
        "shape_zyx": list(cropped.shape_zyx),
        "files": files,
        "structures": structures,
        "skipped_structures": skipped,
        "target": target if TARGET_NAME in structures else None,
        "body_structure": body_name,
        "has_dose": bool(patient.has_dose),
        "prescription_gy": prescription,
        "prescription_source": prescription_source,
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(folder / PATIENT_MANIFEST, manifest)
    return manifest


def _build_one(
    cohort_dir: str, patient_id: str, cache_dir: str, config: CacheConfig, prescription_gy: Optional[float] = None
) -> Tuple[str, Optional[str]]:
    """Build one patient into ``cache_dir`` (in a worker process); returns (id, failure reason or None).

    The patient's lock is held meanwhile: a second job building the same cache waits for it, then finds
    the patient complete and reuses it (no duplicated work, no half-replaced folder).
    """
    from DeepDosimetricsLib.data.patient import Patient
    from DeepDosimetricsLib.runtime.locks import patient_lock

    final = Path(cache_dir) / patient_id
    with patient_lock(cache_dir, patient_id, job="cache"):
        if patient_is_complete(final, config):  # another job built it meanwhile
            return patient_id, None
        # <cache>/.tmp/<patient>/<host>-<pid>: what a killed build of this patient left is removed here
        # (its lock is ours, so nobody is writing there)
        temporaries = Path(cache_dir) / TEMPORARY_FOLDER / patient_id
        shutil.rmtree(temporaries, ignore_errors=True)
        temporary = temporaries / f"{socket.gethostname()}-{os.getpid()}"
        temporaries.mkdir(parents=True, exist_ok=True)
        try:
            patient = Patient.from_folder(Path(cohort_dir) / patient_id)
            build_patient(patient, temporary, config, prescription_gy)
            if final.exists():
                shutil.rmtree(final)
            os.rename(temporary, final)
            shutil.rmtree(temporaries, ignore_errors=True)
            return patient_id, None
        except DeepDosimetricsError as error:
            shutil.rmtree(temporary, ignore_errors=True)
            return patient_id, str(error)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise


def ensure_cache(
    cohort_dir: PathLike,
    config: Optional[CacheConfig] = None,
    cache_dir: Optional[PathLike] = None,
    jobs: Union[int, PoolSpec] = 1,
    quiet: bool = True,
    ids: Optional[Sequence[str]] = None,
    progress_json: bool = False,
) -> CachedCohort:
    """Build the cache entries a cohort is missing (in ``jobs`` processes or on a Dask cluster) and return
    the cache.

    Patients already built with the same configuration are reused; a patient that cannot be read is
    skipped, its reason kept in ``CachedCohort.failed`` (and logged). Several jobs may build one cache at
    the same time: each patient is built under its lock (a job waits for a patient another one is
    building, then reuses it) and the cohort manifest is merged under the cache's lock.

    Args:
        cohort_dir: the cohort folder.
        config: resampling spacing and crop margin (default ``CacheConfig()``).
        cache_dir: where the cache lives (default: ``default_cache_dir(cohort_dir, config)``).
        jobs: worker processes building patients in parallel, or a PoolSpec (``--scheduler``); local
            workers are spawned (the caller may hold torch threads or file locks).
        quiet: no progress bar.
        ids: limit the cohort to these patients.
        progress_json: print one ``@progress`` line per patient built.
    """
    config = config or CacheConfig()
    from DeepDosimetricsLib.data.cohort import Cohort
    from DeepDosimetricsLib.runtime.progress import emit_progress, progress_bar

    cohort = Cohort.open(cohort_dir, patient_ids=list(ids) if ids is not None else None)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(cohort_dir, config)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the cache folder {folder}: {error.strerror or error}") from None
    todo = [pid for pid in cohort.ids if not patient_is_complete(folder / pid, config)]
    failed: Dict[str, str] = dict(getattr(cohort, "unreadable", None) or {})  # reported, not skipped silently
    prescriptions = clinical_prescriptions(cohort.clinical)
    if todo:
        log.debug("cache %s: building %d of %d patients", folder, len(todo), len(cohort))
    bar = progress_bar(range(len(todo)), total=len(todo), desc="cache", quiet=quiet)

    def finished(pid: str, reason: Optional[str]) -> None:
        if reason:
            failed[pid] = reason
        bar.update(1)
        if progress_json:
            emit_progress("cache", bar.n, len(todo), patient=pid, failed=bool(reason))
    spec = as_pool(jobs)
    if spec.start_method is None:
        spec = replace(spec, start_method="spawn")
    run_tasks(_build_one, [(str(cohort.folder), pid, str(folder), config, prescriptions.get(pid)) for pid in todo],
              spec, on_result=lambda index, result: finished(*result))
    bar.close()
    for pid, reason in failed.items():
        log.warning("patient %s not cached: %s", pid, reason)
    with _cohort_lock(folder):  # read, merge and write the manifest: one job at a time
        _write_cohort_manifest(folder, cohort, config, failed, ids)
    return open_cache(folder)


def _cohort_lock(folder: Path):
    """The cache's manifest lock; none for a complete cache in a read-only folder (nothing is written)."""
    import contextlib

    try:
        (folder / LOCK_FOLDER).mkdir(exist_ok=True)
    except OSError:
        return contextlib.nullcontext()
    return file_lock(folder / LOCK_FOLDER / "cohort.lock", job="cache")


def _write_cohort_manifest(folder: Path, cohort, config: CacheConfig, failed: Dict[str, str],
                           ids: Optional[Sequence[str]]) -> None:
    """The cohort manifest: the patients cached and those that failed (a partial run keeps the patients
    an earlier run cached with this configuration)."""
    patients: List[str] = [pid for pid in cohort.ids if pid not in failed]
    if ids is not None:  # a partial run keeps the patients an earlier run cached with this configuration
        from DeepDosimetricsLib.data.patient import natural_key

        try:
            earlier = json.loads((folder / COHORT_MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            earlier = {}
        if earlier.get("config_hash") == config.hash():
            patients += [pid for pid in earlier.get("patients", [])
                         if pid not in patients and pid not in failed and patient_is_complete(folder / pid, config)]
            failed.update({pid: reason for pid, reason in earlier.get("failed", {}).items()
                           if pid not in cohort.ids and pid not in patients})
            patients.sort(key=natural_key)
    manifest = {
        "format_version": FORMAT_VERSION,
        "config_hash": config.hash(),
        "config": config.to_dict(),
        "source": str(Path(cohort.folder).resolve()),
        "patients": patients,
        "failed": failed,
    }
    try:
        unchanged = json.loads((folder / COHORT_MANIFEST).read_text()) == manifest
    except (OSError, json.JSONDecodeError):
        unchanged = False
    if not unchanged:  # a complete cache may lie in a read-only folder
        write_json_atomic(folder / COHORT_MANIFEST, manifest)
