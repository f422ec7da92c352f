"""From stitched [0, 1] channels on the cache grid to NRRD volumes on the patient's original CT grid.

Per channel, one at a time (so memory holds a few single-channel volumes, never all channels):
the reconstruction in physical units (CT windows -> HU within the window, dose -> Gy, masks ->
probability, plus a labelmap thresholded at 0.5), the residual (reconstruction minus original, same
units) and the reconstruction metrics of :mod:`metrics`. Files in ``<patient>/recon/``:
``<channel>.nrrd``, ``<channel>_residual.nrrd`` and, for masks, ``<channel>_label.nrrd``, where
``<channel>`` is the label with ``:`` and ``/`` replaced (``window_lung``, ``mask_PTV``, ``dose``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from DeepDosimetricsLib.deep.channels import ChannelSpec, to_units
from DeepDosimetricsLib.deep.encode import metrics

PathLike = Union[str, os.PathLike]
#: probability at and above which a reconstructed mask voxel is inside
MASK_THRESHOLD = 0.5
#: voxels per slab when converting volumes slab by slab
_SLAB_VOXELS = 4_000_000


def channel_stem(label: str) -> str:
    """A file-name stem for a channel label: ``window:lung`` -> ``window_lung``, ``window:-200/600`` ->
    ``window_-200_600``."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("_")


def air_values(cached_patient, specs: Sequence[ChannelSpec]) -> np.ndarray:
    """Each channel's value (in [0, 1]) outside the body: what a tile of pure air reads."""
    outside = tuple(-2 for _ in range(3))
    return cached_patient.read_tile(list(specs), outside, (1, 1, 1))[:, 0, 0, 0].astype(np.float32)


def _slab_planes(shape: Sequence[int]) -> int:
    return max(1, _SLAB_VOXELS // max(1, int(shape[1]) * int(shape[2])))


def read_channel(cached_patient, spec: ChannelSpec) -> np.ndarray:
    """One channel of the whole cached volume, float32 (z, y, x) in [0, 1], read slab by slab."""
    shape = cached_patient.shape
    volume = np.empty(shape, np.float32)
    step = _slab_planes(shape)
    for z0 in range(0, shape[0], step):
        z1 = min(z0 + step, shape[0])
        cached_patient.read_tile([spec], (z0, 0, 0), (z1 - z0, shape[1], shape[2]), out=volume[None, z0:z1])
    return volume


def read_mask(cached_patient, name: str) -> np.ndarray:
    """A structure (or ``BODY``) of the cached volume as uint8 (z, y, x), read slab by slab through
    ``read_tile`` (no memory map of the whole mask is kept)."""
    from DeepDosimetricsLib.deep.channels import mask

    shape = cached_patient.shape
    volume = np.empty(shape, np.uint8)
    step = _slab_planes(shape)
    for z0 in range(0, shape[0], step):
        z1 = min(z0 + step, shape[0])
        volume[z0:z1] = cached_patient.read_tile([mask(name)], (z0, 0, 0), (z1 - z0, shape[1], shape[2]))[0] > 0
    return volume


def to_units_inplace(spec: ChannelSpec, volume: np.ndarray, prescription_gy: Optional[float] = None) -> np.ndarray:
    """``channels.to_units`` applied slab by slab into ``volume`` itself (float32)."""
    step = _slab_planes(volume.shape)
    for z0 in range(0, volume.shape[0], step):
        volume[z0 : z0 + step] = to_units(spec, volume[z0 : z0 + step], prescription_gy)
    return volume


@dataclass(frozen=True)
class ReconstructionOptions:
    """What :func:`write_reconstruction` writes and measures."""

    residuals: bool = True
    metrics: bool = True
    threshold: float = MASK_THRESHOLD
    compress: bool = False  # zlib-compress the float volumes (labelmaps always are)


def _write_image(image, path: Path, compress: bool) -> Path:
    """Write a SimpleITK image atomically (temporary name in the same folder, then rename)."""
    import SimpleITK as sitk

    from DeepDosimetricsLib.runtime.atomic import atomic_path

    with atomic_path(path, suffix=".nrrd") as partial:
        sitk.WriteImage(image, str(partial), compress)
    return path


def write_reconstruction(
    cached_patient,
    specs: Sequence[ChannelSpec],
    load_channel: Callable[[int], np.ndarray],
    out_dir: PathLike,
    options: ReconstructionOptions = ReconstructionOptions(),
    original: bool = True,
) -> list[dict]:
    """Write every channel's reconstruction (and residual) on the original CT grid; return metric rows.

    load_channel(c): the stitched channel ``c`` on the cache grid, (z, y, x) in [0, 1].
    With ``original=False`` (e.g. a latent traversal) only the reconstructions are written.
    Rows: ``{"patient", "channel", "metric", "value"}``.
    """
    out = Path(out_dir)
    cp = cached_patient
    rows: list[dict] = []
    air = air_values(cp, specs)
    prescription = cp.prescription_gy
    regions = None
    if original and options.metrics:
        regions = {"BODY": read_mask(cp, "BODY"),
                   "PTV": read_mask(cp, "PTV") if cp.has_structure("PTV") else None}
    for index, spec in enumerate(specs):
        stem = channel_stem(spec.label)
        recon = np.array(load_channel(index), dtype=np.float32)  # a private, writable copy
        if original:
            truth = read_channel(cp, spec)
            if options.metrics:
                rows += _unit_free_metrics(spec, recon, truth, options.threshold, regions)
        if spec.kind == "mask":
            label = (recon >= np.float32(options.threshold)).astype(np.uint8)
            _write_image(cp.to_original_grid(label, "nearest", 0), out / f"{stem}_label.nrrd", True)
            del label
        to_units_inplace(spec, recon, prescription)
        fill = float(to_units(spec, air[index : index + 1], prescription)[0])
        _write_image(cp.to_original_grid(recon, "linear", fill), out / f"{stem}.nrrd", options.compress)
        if not original:
            continue
        to_units_inplace(spec, truth, prescription)
        residual = np.subtract(recon, truth, out=truth)  # truth's memory now holds the residual
        if options.metrics:
            rows += _unit_metrics(spec, recon, residual, regions)
        if options.residuals:
            _write_image(cp.to_original_grid(residual, "linear", 0.0), out / f"{stem}_residual.nrrd",
                         options.compress)
        del recon, truth, residual
    return [{"patient": cp.id, **row} for row in rows]


def _unit_free_metrics(spec: ChannelSpec, recon: np.ndarray, truth: np.ndarray, threshold: float,
                       regions: dict) -> list[dict]:
    """Metrics on the [0, 1] scale: PSNR (whole volume and body), SSIM; Dice for masks."""
    label = spec.label
    rows = [
        {"channel": label, "metric": "psnr", "value": metrics.psnr(truth, recon)},
        {"channel": label, "metric": "psnr_body", "value": metrics.psnr(truth, recon, where=regions["BODY"])},
    ]
    if min(recon.shape) >= metrics.SSIM_WINDOW:
        rows.append({"channel": label, "metric": "ssim", "value": metrics.ssim(truth, recon)})
    if spec.kind == "mask":
        step = _slab_planes(recon.shape)
        both = sizes = 0
        for z0 in range(0, recon.shape[0], step):
            a = truth[z0 : z0 + step] >= np.float32(0.5)
            b = recon[z0 : z0 + step] >= np.float32(threshold)
            both += int(np.count_nonzero(a & b))
            sizes += int(np.count_nonzero(a)) + int(np.count_nonzero(b))
        rows.append({"channel": label, "metric": "dice", "value": 1.0 if sizes == 0 else 2.0 * both / sizes})
    return rows


def _unit_metrics(spec: ChannelSpec, recon: np.ndarray, residual: np.ndarray, regions: dict) -> list[dict]:
    """Metrics in physical units: HU MAE in body and PTV (windows); Gy MAE, D95 and Dmean errors (dose)."""
    label = spec.label
    zeros = np.broadcast_to(np.float32(0.0), residual.shape)  # no allocation
    rows: list[dict] = []
    target = regions["PTV"]
    if spec.kind == "window":
        rows.append({"channel": label, "metric": "mae_hu_body",
                     "value": metrics.mean_absolute_error(zeros, residual, regions["BODY"])})
        if target is not None:
            rows.append({"channel": label, "metric": "mae_hu_ptv",
                         "value": metrics.mean_absolute_error(zeros, residual, target)})
    elif spec.kind == "dose" and target is not None:
        rows.append({"channel": label, "metric": "mae_gy_ptv",
                     "value": metrics.mean_absolute_error(zeros, residual, target)})
        reconstructed_doses, residuals = [], []
        for z0 in range(0, recon.shape[0], _slab_planes(recon.shape)):  # the voxels in C order, slab by slab
            z1 = min(z0 + _slab_planes(recon.shape), recon.shape[0])
            inside = np.asarray(target[z0:z1]) != 0
            reconstructed_doses.append(np.asarray(recon[z0:z1])[inside])
            residuals.append(np.asarray(residual[z0:z1])[inside])
        reconstructed_doses = np.concatenate(reconstructed_doses)
        reconstructed = metrics.dose_statistics(reconstructed_doses)
        truth = metrics.dose_statistics(reconstructed_doses - np.concatenate(residuals))
        for name in ("D95", "Dmean"):
            error = reconstructed[name] - truth[name]
            rows.append({"channel": label, "metric": f"{name}_gy", "value": truth[name]})
            rows.append({"channel": label, "metric": f"{name}_error_gy", "value": error})
            rows.append({"channel": label, "metric": f"{name}_abs_error_gy",
                         "value": abs(error) if not math.isnan(error) else math.nan})
    return rows


# ---------------------------------------------------------------------------------------------------
# Streamed: plane blocks from the stitched files to the NRRDs, never a whole volume in memory
# ---------------------------------------------------------------------------------------------------
class SlabVolume:
    """A (z, y, x) volume read a block of planes at a time (``volume[z0:z1]``), as the metrics index it."""

    ndim = 3

    def __init__(self, shape: Sequence[int], read: Callable[[int, int], np.ndarray]):
        self.shape = tuple(int(v) for v in shape)
        self._read = read

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("a SlabVolume is read by plane ranges (volume[z0:z1])")
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            raise TypeError("a SlabVolume is read by contiguous plane ranges")
        return self._read(start, max(start, stop))


def npy_planes(path: PathLike) -> SlabVolume:
    """A C-ordered 3D ``.npy`` file as a :class:`SlabVolume`: each block read through small temporary maps
    (``cache.store.read_region``), so no page of the file stays resident."""
    from DeepDosimetricsLib.deep.cache.store import NpyLayout, read_region

    layout = NpyLayout.read(Path(path))
    _, height, width = layout.shape

    def read(z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0, height, width), layout.dtype)
        return read_region(layout, (z0, 0, 0), (z1, height, width), out) if z1 > z0 else out

    return SlabVolume(layout.shape, read)


def _unit_volumes(spec: ChannelSpec, recon: SlabVolume, truth: SlabVolume,
                  prescription: Optional[float]) -> tuple[SlabVolume, SlabVolume]:
    """The reconstruction and the residual (reconstruction minus original) in physical units, block by block."""
    units = SlabVolume(recon.shape, lambda z0, z1: to_units(spec, recon[z0:z1], prescription))
    residual = SlabVolume(recon.shape, lambda z0, z1: to_units(spec, recon[z0:z1], prescription)
                          - to_units(spec, truth[z0:z1], prescription))
    return units, residual


def _cropped_offset(cached_patient) -> Optional[np.ndarray]:
    """(z, y, x) of the cache grid's first voxel on the original grid when the cache only crops it, else None."""
    from DeepDosimetricsLib.deep.cache.store import grid_offset

    offset = grid_offset(cached_patient.original_geometry, cached_patient.geometry)
    return None if offset is None else np.asarray(offset[::-1], dtype=int)


def can_stream(cached_patient) -> bool:
    """Whether :func:`write_reconstruction_streamed` applies: the cache grid is the original grid, cropped
    (the default cache keeps the CT's spacing); a resampled cache needs the whole-volume resampling."""
    return _cropped_offset(cached_patient) is not None


def write_reconstruction_streamed(
    cached_patient,
    specs: Sequence[ChannelSpec],
    channel_files: Sequence[PathLike],
    out_dir: PathLike,
    options: ReconstructionOptions = ReconstructionOptions(),
    work_dir: Optional[PathLike] = None,
) -> list[dict]:
    """:func:`write_reconstruction` (``original=True``) from the stitched ``.npy`` files, block by block.

    The same files and metric rows as the in-memory path (tested equal), for a cache grid that crops the
    original grid (:func:`can_stream`): each channel's truth is computed once into a temporary ``.npy`` in
    ``work_dir`` (default: beside the first channel file), the metrics read both files by slabs, and the
    reconstruction, label and residual NRRDs are written plane block by plane block on the original grid.
    Memory: a few blocks of planes and the metrics' slabs, whatever the volume's size.
    """
    from DeepDosimetricsLib.deep.channels import mask as mask_spec
    from DeepDosimetricsLib.deep.tiling import NpyChannelSink
    from DeepDosimetricsLib.runtime.nrrd_stream import open_writer

    cp = cached_patient
    offset = _cropped_offset(cp)
    if offset is None:
        raise ValueError(f"patient {cp.id}: the cache grid is resampled; use write_reconstruction")
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else Path(channel_files[0]).parent
    shape = cp.shape
    depth, height, width = shape
    step = _slab_planes(shape)
    original = cp.original_geometry
    full_depth, full_height, full_width = original.shape_zyx
    air = air_values(cp, specs)
    prescription = cp.prescription_gy

    def mask_volume(name: str) -> SlabVolume:
        return SlabVolume(shape, lambda z0, z1: (cp.read_tile([mask_spec(name)], (z0, 0, 0), (z1 - z0, height, width))[0]
                                                 > 0).astype(np.uint8))

    regions = None
    if options.metrics:
        regions = {"BODY": mask_volume("BODY"), "PTV": mask_volume("PTV") if cp.has_structure("PTV") else None}
    # the cache grid's planes and rows on the original grid (clipped)
    lo = np.clip(offset, 0, original.shape_zyx)
    hi = np.clip(offset + np.asarray(shape), 0, original.shape_zyx)
    rows: list[dict] = []
    for index, spec in enumerate(specs):
        stem = channel_stem(spec.label)
        recon = npy_planes(channel_files[index])
        truth_sink = NpyChannelSink([work / f"truth{index}.npy"], shape)
        for z0 in range(0, depth, step):
            z1 = min(z0 + step, depth)
            truth_sink(z0, cp.read_tile([spec], (z0, 0, 0), (z1 - z0, height, width)))
        truth_sink.close()
        truth = npy_planes(truth_sink.paths[0])
        if options.metrics:
            rows += _unit_free_metrics(spec, recon, truth, options.threshold, regions)
        fill = float(to_units(spec, air[index : index + 1], prescription)[0])
        writers = {"recon": (open_writer(out / f"{stem}.nrrd", original, np.float32, options.compress), fill)}
        if spec.kind == "mask":
            writers["label"] = (open_writer(out / f"{stem}_label.nrrd", original, np.uint8, True), 0)
        if options.residuals:
            writers["residual"] = (open_writer(out / f"{stem}_residual.nrrd", original, np.float32, options.compress),
                                   0.0)
        try:
            for k0 in range(0, full_depth, step):  # planes of the original grid
                k1 = min(k0 + step, full_depth)
                blocks = {key: np.full((k1 - k0, full_height, full_width), value, writer.dtype)
                          for key, (writer, value) in writers.items()}
                a, b = max(k0, lo[0]), min(k1, hi[0])  # original planes the cache covers
                if a < b:
                    values = recon[a - offset[0] : b - offset[0]][:, lo[1] - offset[1] : hi[1] - offset[1],
                                                                   lo[2] - offset[2] : hi[2] - offset[2]]
                    target = (slice(a - k0, b - k0), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
                    if "label" in blocks:
                        blocks["label"][target] = values >= np.float32(options.threshold)
                    units = to_units(spec, values, prescription)
                    blocks["recon"][target] = units
                    if "residual" in blocks:
                        original_values = truth[a - offset[0] : b - offset[0]][:, lo[1] - offset[1] : hi[1] - offset[1],
                                                                               lo[2] - offset[2] : hi[2] - offset[2]]
                        blocks["residual"][target] = units - to_units(spec, original_values, prescription)
                for key, (writer, _) in writers.items():
                    writer.write(blocks[key])
            for writer, _ in writers.values():
                writer.close()
        except BaseException:
            for writer, _ in writers.values():
                writer.abandon()
            raise
        if options.metrics:
            units_recon, residual = _unit_volumes(spec, recon, truth, prescription)
            rows += _unit_metrics(spec, units_recon, residual, regions)
        truth_sink.remove()
    return [{"patient": cp.id, **row} for row in rows]
