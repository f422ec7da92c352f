"""Latent traversal in the review station: shift features z00..z09 of a patient by -3..+3 standard deviations
and decode it again, fast enough to follow a slider.

Nothing is encoded again: the patient's tile features and positions come from ``ENC_DIR/<id>/tiles.csv`` (the
encoder's own output), the standard deviation of each feature over every tile of the cohort from
``ENC_DIR/tiles.csv``.

Fast by design, in two stages (:class:`Updates` runs them for the station, a newer request superseding):

1. the preview, :meth:`Traverser.planes`: only the tiles that cross the three displayed planes, and of each
   only the output slices on those planes (``review.decode.decode_slices``: the full-resolution last layer,
   two thirds of a tile's decoding, runs for one channel on three upsampled slices), blended on the planes
   alone (batches of BATCH tiles, ``torch.inference_mode``, a channels_last_3d network). Every tile that
   covers a voxel of a plane crosses that plane, so the planes are exactly what the full decode gives there;
   the rest of the volume is still the previous request's until stage 2 (the state says "preview"). Where
   the CPU runs bfloat16 natively (AVX512-BF16, AMX) the preview is decoded in bfloat16 (about 1.5x faster;
   within about 1e-3 of the channel's range of the exact values).
2. the exact volume, :meth:`Traverser.full`: every body tile, the shown channel only
   (``review.decode.decode_channel``), in the background, cancellable between batches; the station puts it
   in place when it is done and still wanted (the state says "exact").

Only the channel on show is blended and kept (one (z, y, x) float32 per shift vector, a few of them, within a
memory budget), and the original's planes for the residual are read from the cache as thin slabs, never the
whole volume. The result lives on the cache grid, which MRML places in physical space itself: no resampling.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)
SIGMA_RANGE = (-3.0, 3.0)
#: decoded volumes kept (one channel each), at most this many and at most KEEP_BYTES together
KEEP = 4
KEEP_BYTES = 256 << 20
#: tiles per decoder call (8: the decoder's activations for a batch stay near 50 MB; 32 needed ~200 MB)
BATCH = 8
#: what a traversal on show is: the displayed planes decoded (the rest of the volume still the previous
#: request's), then the whole volume decoded exactly
PREVIEW, EXACT = "preview", "exact"
#: (z index, y index, x index) of the displayed planes on the cache grid; None = that plane is not shown
Planes = Tuple[Optional[int], Optional[int], Optional[int]]


@dataclass
class TraversalResult:
    volume: np.ndarray  # (z, y, x) float32 in physical units on the cache grid
    geometry: object  # DeepDosimetricsLib.data.geometry.Geometry of the cache grid
    seconds: float
    cached: bool


@dataclass
class PlaneResult:
    """The three displayed planes of a traversal, in physical units: axis (0 z, 1 y, 2 x) -> (index, 2-D)."""

    planes: Dict[int, Tuple[int, np.ndarray]]
    geometry: object
    seconds: float
    tiles: int  # tiles decoded for the planes (0 when a kept full volume answered)
    full: Optional[np.ndarray] = None  # the whole volume when it was already decoded
    precision: str = "float32"  # of the planes' decoding ("bfloat16": the preview differs from the exact by ~1e-3)

    @property
    def stage(self) -> str:
        """:data:`EXACT` when the whole volume answered, else :data:`PREVIEW` (only the planes are new)."""
        return EXACT if self.full is not None else PREVIEW


def find_cache(catalog, cache_dir: Optional[Union[str, Path]]):
    """The encoding's preprocessing cache (``--cache`` or the cohort's default), or InputError saying why not."""
    from DeepDosimetricsLib.deep.cache.store import (
        COHORT_MANIFEST,
        CacheConfig,
        default_cache_dir,
        open_cache,
    )

    folder = Path(cache_dir) if cache_dir else default_cache_dir(catalog.cohort_dir, CacheConfig())
    if not (folder / COHORT_MANIFEST).is_file():
        raise InputError(f"no preprocessing cache at {folder} (give --cache DIR, the one `encode` used)")
    cache = open_cache(folder)
    wanted = catalog.job.get("description", {}).get("cache_config")
    if wanted and cache.config.hash() != wanted:
        raise InputError(f"the cache {folder} has another configuration than the encoding's")
    return cache


# ---------------------------------------------------------------------------------------------------
# Planes first: pure functions (tested against the full stitcher)
# ---------------------------------------------------------------------------------------------------
def plane_tiles(positions: Sequence[Sequence[int]], tile: Sequence[int], planes: Planes) -> List[int]:
    """Indices of the tiles (starts ``positions``, size ``tile``) whose window crosses one of ``planes``."""
    keep = []
    for index, start in enumerate(positions):
        for axis, plane in enumerate(planes):
            if plane is not None and start[axis] <= plane < start[axis] + tile[axis]:
                keep.append(index)
                break
    return keep


def plane_slices(positions: Sequence[Sequence[int]], tile: Sequence[int], planes: Planes,
                 chosen: Sequence[int]) -> List[Tuple[int, int, int]]:
    """(tile index, axis, offset in the tile) of each displayed plane crossing each tile of ``chosen``."""
    rows = []
    for index in chosen:
        start = positions[index]
        for axis, plane in enumerate(planes):
            if plane is not None and start[axis] <= plane < start[axis] + tile[axis]:
                rows.append((index, axis, int(plane - start[axis])))
    return rows


def blend_slices(shape: Sequence[int], weights: np.ndarray, starts: Sequence[Sequence[int]],
                 axes: Sequence[int], slices: Sequence[np.ndarray], planes: Planes,
                 fill: float) -> Dict[int, Tuple[int, np.ndarray]]:
    """The planes of the Gaussian blend of tile slices: ``slices[r]`` (2-D, one channel) is the tile at
    ``starts[r]`` cut by the plane of axis ``axes[r]``.

    Equal, on the planes, to what ``SlabStitcher`` gives for the whole volume when the slices of every tile
    crossing them are given. Voxels of a plane no tile covers get ``fill``. Returns axis -> (index, 2-D array).
    """
    shape = tuple(int(s) for s in shape)
    tile = weights.shape
    sums, totals = {}, {}
    for axis, plane in enumerate(planes):
        if plane is not None and 0 <= plane < shape[axis]:
            rest = tuple(s for a, s in enumerate(shape) if a != axis)
            sums[axis] = np.zeros(rest, np.float32)
            totals[axis] = np.zeros(rest, np.float32)
    for start, axis, value in zip(starts, axes, slices):
        if axis not in sums:
            continue
        start = tuple(int(s) for s in start)
        ends = tuple(min(s + t, n) for s, t, n in zip(start, tile, shape))
        offset = planes[axis] - start[axis]
        if not 0 <= offset < ends[axis] - start[axis]:
            continue
        crop = [slice(0, e - s) for s, e in zip(start, ends)]
        crop[axis] = offset
        target = tuple(slice(s, e) for a, (s, e) in enumerate(zip(start, ends)) if a != axis)
        w = weights[tuple(crop)]
        in_plane = tuple(c for a, c in enumerate(crop) if a != axis)
        sums[axis][target] += np.asarray(value)[in_plane] * w
        totals[axis][target] += w
    out = {}
    for axis in sums:
        covered = totals[axis] > 0
        plane = np.divide(sums[axis], np.where(covered, totals[axis], 1.0))
        plane[~covered] = fill
        out[axis] = (int(planes[axis]), plane.astype(np.float32))
    return out


def blend_planes(shape: Sequence[int], weights: np.ndarray, starts: Sequence[Sequence[int]],
                 values: Sequence[np.ndarray], planes: Planes, fill: float) -> Dict[int, Tuple[int, np.ndarray]]:
    """The planes of the Gaussian blend of whole tiles ``values`` (each (tz, ty, tx)) at ``starts``
    (:func:`blend_slices` with each tile cut by the planes crossing it)."""
    tile = weights.shape
    rows = plane_slices(starts, tile, planes, range(len(starts)))
    return blend_slices(shape, weights, [starts[i] for i, _, _ in rows], [a for _, a, _ in rows],
                        [np.take(np.asarray(values[i]), o, axis=a) for i, a, o in rows], planes, fill)


class _ChannelSink:
    """Keeps one channel of the stitched planes."""

    def __init__(self, shape, channel: int):
        self.array = np.empty(tuple(shape), np.float32)
        self.channel = channel

    def __call__(self, z: int, block: np.ndarray) -> None:
        self.array[z : z + block.shape[1]] = block[self.channel]


class Cancelled(Exception):
    """A background decode that is no longer wanted."""


def default_threads() -> int:
    """Decoder threads: the cores this process may use, at most 4 (more do not help a small decoder)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class Traverser:
    """Decodes one patient at a time with shifted features: the displayed planes first, the volume after."""

    def __init__(self, model_dir: Union[str, Path], catalog, cache_dir=None, threads: Optional[int] = None,
                 preview_bfloat16: Optional[bool] = None):
        """``preview_bfloat16``: decode the preview's planes in bfloat16 (None: where the CPU runs it natively,
        about 1.5x faster; the exact volume is always float32)."""
        import torch

        from DeepDosimetricsLib.deep.channels import parse_channels
        from DeepDosimetricsLib.deep.encode.encoder import TileModel, feature_names
        from DeepDosimetricsLib.deep.model import load_model
        from DeepDosimetricsLib.review.decode import native_bfloat16

        torch.set_num_threads(int(threads) if threads else default_threads())
        self.catalog = catalog
        model, config = load_model(model_dir, device="cpu", channels=catalog.channels or None)
        self.runner = TileModel(model, "cpu")  # eval, channels_last_3d on CPU, decodes under inference_mode
        self.preview_bfloat16 = native_bfloat16() if preview_bfloat16 is None else bool(preview_bfloat16)
        self.specs = parse_channels(list(config.channels))
        self.labels = [s.label for s in self.specs]
        self.names = feature_names(config.features)
        self.overlap = float(catalog.job.get("description", {}).get("overlap", 0.25))
        self.cache = find_cache(catalog, cache_dir)
        tiles = catalog.encoding_dir / "tiles.csv"
        try:
            table = pd.read_csv(tiles, usecols=self.names)
        except (OSError, ValueError) as error:
            raise InputError(f"{tiles} cannot be read ({error})") from None
        self.std = table.std(ddof=0).to_dict()
        self._patient: Optional[str] = None
        self._kept: OrderedDict[Tuple, np.ndarray] = OrderedDict()  # (shift key, label) -> (z, y, x) in [0, 1]
        self._truth_planes: Dict[Tuple, np.ndarray] = {}
        self._truth: Dict[str, np.ndarray] = {}
        self._lock = threading.RLock()  # the background decode and the event loop share the patient state
        self.warm_up()

    def warm_up(self) -> None:
        """Decode a batch of zero features once as the preview and the exact volume do: the convolutions'
        kernels are prepared (oneDNN) and their working memory is in place before the first slider move, which
        took twice as long without it (the station calls it again after a patient's load releases memory)."""
        import torch

        from DeepDosimetricsLib.review.decode import ROWS, decode_channel, decode_slices

        z = torch.zeros((BATCH, len(self.names)))
        t = self.runner.config.tile
        with torch.inference_mode():
            with torch.autocast("cpu", torch.bfloat16, enabled=self.preview_bfloat16):
                for rows in range(ROWS, 2 * BATCH + 1, ROWS):
                    decode_slices(self.runner.model, z, 0, [i % BATCH for i in range(rows)], [0] * rows,
                                  [t // 2] * rows)
            decode_channel(self.runner.model, z, 0)

    # ------------------------------------------------------------------ patient
    def _load_patient(self, patient: str) -> None:
        from DeepDosimetricsLib.deep.encode.reconstruction import air_values
        from DeepDosimetricsLib.deep.tiling import TileGrid, gaussian_weights

        if self._patient == patient:
            return
        if patient not in self.cache:
            raise InputError(f"patient {patient} is not in the cache {self.cache.folder}")
        files = self.catalog.files(patient)
        table = pd.read_csv(files.tiles)
        self.cp = self.cache[patient]
        self.positions = [tuple(int(v) for v in row) for row in table[["z", "y", "x"]].to_numpy()]
        self.base = table[self.names].to_numpy(np.float32)
        self.grid = TileGrid.create(self.cp.shape, self.runner.config.tile, self.overlap)
        self.weights = gaussian_weights(self.grid.tile)
        self.fill = air_values(self.cp, self.specs)
        self._patient = patient
        self._kept.clear()
        self._truth_planes.clear()
        self._truth.clear()

    def patient_shape(self, patient: str) -> Tuple[int, int, int]:
        """The cache grid's (z, y, x) size of ``patient`` (loaded if needed)."""
        with self._lock:
            self._load_patient(patient)
            return self.shape

    def fill_units(self, label: str) -> float:
        """``label``'s value outside the body (air) in physical units."""
        return float(self._units(label, self.fill[self._index(label) : self._index(label) + 1])[0])

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.cp.shape)

    @property
    def geometry(self):
        return self.cp.geometry

    @staticmethod
    def key(shifts: Dict[str, float]) -> Tuple:
        return tuple(sorted((k, round(float(v), 3)) for k, v in shifts.items() if abs(float(v)) > 1e-9))

    def _features(self, key: Tuple) -> np.ndarray:
        features = self.base.copy()
        for name, sigma in key:
            if name not in self.names:
                raise InputError(f"unknown feature {name}")
            sigma = min(max(sigma, SIGMA_RANGE[0]), SIGMA_RANGE[1])
            features[:, self.names.index(name)] += np.float32(sigma * self.std.get(name, 0.0))
        return features

    def _index(self, label: str) -> int:
        if label not in self.labels:
            raise InputError(f"the model has no channel {label}")
        return self.labels.index(label)

    def _units(self, label: str, values: np.ndarray) -> np.ndarray:
        from DeepDosimetricsLib.deep.channels import to_units

        return to_units(self.specs[self._index(label)], values, self.cp.prescription_gy)

    # ------------------------------------------------------------------ stage 1: the displayed planes
    def planes(self, patient: str, shifts: Dict[str, float], label: str, planes: Planes,
               residual: bool = False) -> PlaneResult:
        """The displayed planes of ``label`` decoded with ``shifts`` (minus the original with ``residual``)."""
        start = time.perf_counter()
        with self._lock:
            self._load_patient(patient)
            key, channel = self.key(shifts), self._index(label)
            shape = self.shape
            planes = tuple(None if p is None else int(min(max(int(p), 0), shape[a] - 1))
                           for a, p in enumerate(planes))
            kept = self._kept.get((key, label))
            precision = "float32"
            if kept is not None:
                self._kept.move_to_end((key, label))
                values = {a: (p, np.take(kept, p, axis=a)) for a, p in enumerate(planes) if p is not None}
                count = 0
            else:
                chosen = plane_tiles(self.positions, self.grid.tile, planes)
                rows = plane_slices(self.positions, self.grid.tile, planes, chosen)
                slices = self._decode_slices(self._features(key), channel, chosen, rows)
                values = blend_slices(shape, self.weights, [self.positions[i] for i, _, _ in rows],
                                      [a for _, a, _ in rows], slices, planes, float(self.fill[channel]))
                count = len(chosen)
                precision = "bfloat16" if self.preview_bfloat16 else "float32"
            result = {}
            for axis, (index, plane) in values.items():
                plane = self._units(label, plane)
                if residual:
                    plane = plane - self._truth_plane(label, axis, index)
                result[axis] = (index, np.ascontiguousarray(plane, np.float32))
            full = None
            if kept is not None:
                full = self._units(label, kept)
                if residual:
                    full = full - self.truth(label)
        return PlaneResult(result, self.geometry, time.perf_counter() - start, count, full, precision)

    def _decode_slices(self, features: np.ndarray, channel: int, chosen: Sequence[int],
                       rows: Sequence[Tuple[int, int, int]]) -> List[np.ndarray]:
        """The 2-D slices ``rows`` ((tile, axis, offset)) of ``channel``, decoded BATCH tiles at a time (in
        bfloat16 with ``preview_bfloat16``)."""
        import torch

        from DeepDosimetricsLib.review.decode import decode_slices

        by_tile: Dict[int, List[int]] = {}
        for r, (index, _, _) in enumerate(rows):
            by_tile.setdefault(index, []).append(r)
        out: List[Optional[np.ndarray]] = [None] * len(rows)
        model = self.runner.model
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=self.preview_bfloat16):
            for group in _chunks(chosen, BATCH):
                mine = [r for i in group for r in by_tile.get(i, [])]
                local = {index: n for n, index in enumerate(group)}
                # the last group padded to BATCH tiles: one shape for the decoder's convolutions
                z = torch.from_numpy(np.ascontiguousarray(features[_padded(group)]))
                decoded = decode_slices(model, z, channel, [local[rows[r][0]] for r in mine],
                                        [rows[r][1] for r in mine], [rows[r][2] for r in mine]).numpy()
                for r, values in zip(mine, decoded):
                    out[r] = values
        return out

    def _truth_plane(self, label: str, axis: int, index: int) -> np.ndarray:
        """The original's plane in physical units, read from the cache as one thin slab (kept)."""
        kept = self._truth_planes.get((label, axis, index))
        if kept is None:
            if label in self._truth:
                kept = np.take(self._truth[label], index, axis=axis)
            else:
                start = [0, 0, 0]
                size = list(self.shape)
                start[axis], size[axis] = index, 1
                slab = self.cp.read_tile([self.specs[self._index(label)]], start, size)[0]
                kept = self._units(label, np.take(slab, 0, axis=axis))
            if len(self._truth_planes) > 48:
                self._truth_planes.clear()
            self._truth_planes[(label, axis, index)] = kept
        return kept

    def truth(self, label: str) -> np.ndarray:
        """The original channel in physical units on the cache grid (read once per patient and channel)."""
        from DeepDosimetricsLib.deep.encode.reconstruction import read_channel

        with self._lock:
            values = self._truth.get(label)
            if values is None:
                values = self._truth[label] = self._units(label, read_channel(self.cp, self.specs[self._index(label)]))
            return values

    # ------------------------------------------------------------------ stage 2: the whole volume
    def full(self, patient: str, shifts: Dict[str, float], label: str, residual: bool = False,
             cancelled: Callable[[], bool] = lambda: False) -> TraversalResult:
        """The whole channel decoded with ``shifts``; raises :class:`Cancelled` when ``cancelled()`` turns true."""
        from DeepDosimetricsLib.deep.tiling import SlabStitcher

        start = time.perf_counter()
        with self._lock:
            self._load_patient(patient)
            key, channel = self.key(shifts), self._index(label)
            kept = self._kept.get((key, label))
            features = self._features(key) if kept is None else None
            positions, grid, fill, cp = list(self.positions), self.grid, self.fill, self.cp
        cached = kept is not None
        if kept is None:
            import torch

            from DeepDosimetricsLib.review.decode import decode_channel

            sink = _ChannelSink(grid.shape, 0)
            stitcher = SlabStitcher(grid.shape, 1, grid.tile, sink, fill=fill[channel : channel + 1])
            ordered = sorted(range(len(positions)), key=lambda i: positions[i])
            for group in _chunks(ordered, BATCH):  # small groups: a newer request stops this one soon
                if cancelled():
                    raise Cancelled()
                with torch.inference_mode():
                    z = torch.from_numpy(np.ascontiguousarray(features[_padded(group)]))
                    decoded = decode_channel(self.runner.model, z, channel).numpy()
                for index, values in zip(group, decoded):  # (the padding's rows past the group are dropped)
                    stitcher.add_channels_last(positions[index], values[..., None])
            stitcher.finish()
            kept = sink.array
            with self._lock:
                if self._patient != patient or self.cp is not cp:
                    raise Cancelled()
                self._keep((key, label), kept)
        with self._lock:
            own = not any(v is kept for v in self._kept.values())  # not kept: converted in place, no copy
        values = kept if own else np.array(kept, np.float32)
        self._units_into(label, values)
        if residual:
            self._subtract_truth(label, values)
        return TraversalResult(values, cp.geometry, time.perf_counter() - start, cached)

    def _units_into(self, label: str, values: np.ndarray) -> None:
        """``values`` (z, y, x) float32 in [0, 1] to physical units in place, a few slices at a time."""
        step = max(1, (8 << 20) // max(1, values[0].size))
        for z in range(0, values.shape[0], step):
            values[z : z + step] = self._units(label, values[z : z + step])

    def _subtract_truth(self, label: str, values: np.ndarray) -> None:
        """``values -= original`` in place; the original is kept for the patient only when small."""
        from DeepDosimetricsLib.deep.encode.reconstruction import read_channel

        with self._lock:
            truth = self._truth.get(label)
        if truth is None:
            truth = read_channel(self.cp, self.specs[self._index(label)])
            self._units_into(label, truth)
            if truth.nbytes <= KEEP_BYTES // 2:
                with self._lock:
                    self._truth[label] = truth
        values -= truth

    def _keep(self, key: Tuple, volume: np.ndarray) -> None:
        if volume.nbytes > KEEP_BYTES // 2:  # a large volume: the node on show is its only copy
            return
        self._kept[key] = volume
        self._kept.move_to_end(key)
        while self._kept and (len(self._kept) > KEEP
                                       or sum(v.nbytes for v in self._kept.values()) > KEEP_BYTES):
            self._kept.popitem(last=False)

    def channel(self, patient: str, shifts: Dict[str, float], label: str, residual: bool = False) -> TraversalResult:
        """One channel of the traversed patient in physical units, whole (scripts; the station uses planes)."""
        return self.full(patient, shifts, label, residual)


class Updates:
    """Preview, then exact, for the station's traversal on show: each request supersedes the earlier ones.

    :meth:`preview` answers at once with the displayed planes (exact on them; the rest of the volume is still
    the previous request's, so the state says :data:`PREVIEW`); :meth:`exact` decodes the whole volume in a
    worker thread and returns it, or None when a later request (or :meth:`supersede`: a patient change, the
    traversal switched off) came first: that decode stops between two batches and its result is dropped.
    """

    def __init__(self, traverser: Traverser):
        self.traverser = traverser
        self.generation = 0
        self._executor = None

    def supersede(self) -> int:
        """Every earlier request is no longer wanted; returns the new request's ticket."""
        self.generation += 1
        return self.generation

    def wanted(self, ticket: int) -> bool:
        return ticket == self.generation

    def preview(self, patient: str, shifts: Dict[str, float], label: str, planes: Planes,
                residual: bool = False) -> Tuple[int, PlaneResult]:
        """(ticket, the displayed planes): supersedes every earlier request."""
        ticket = self.supersede()
        return ticket, self.traverser.planes(patient, shifts, label, planes, residual)

    async def exact(self, ticket: int, patient: str, shifts: Dict[str, float], label: str,
                    residual: bool = False, delay: float = 0.0) -> Optional[TraversalResult]:
        """The whole volume of request ``ticket`` (after ``delay`` s: the preview's frames go out first), or
        None when it was superseded before or while it was decoded."""
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        if delay:
            await asyncio.sleep(delay)
        if not self.wanted(ticket):
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="traversal")

        def work():
            return self.traverser.full(patient, shifts, label, residual, cancelled=lambda: not self.wanted(ticket))

        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, work)
        except Cancelled:
            return None
        return result if self.wanted(ticket) else None


def _padded(group: List[int]) -> List[int]:
    """``group`` filled up to BATCH indices with its last one (the decoder then sees one batch shape)."""
    return list(group) + [group[-1]] * (BATCH - len(group)) if 0 < len(group) < BATCH else list(group)


def _chunks(items: Sequence[int], size: int):
    items = list(items)
    for first in range(0, len(items), size):
        yield items[first : first + size]


def traversal_node(scene, name: str, shape: Sequence[int], geometry, fill: float = 0.0, existing=None):
    """A float32 volume node on the cache grid for traversal results (``existing`` reused when still there)."""
    import SimpleITK as sitk
    import slicer
    import vtk

    from DeepDosimetricsLib.mrml import volumes

    if existing is not None and existing.GetScene() is not None:
        return existing
    # the geometry from a one-voxel image, the voxels allocated once in the node (no sitk or numpy copy)
    seed = sitk.Image(1, 1, 1, sitk.sitkFloat32)
    seed.SetSpacing(tuple(geometry.spacing))
    seed.SetOrigin(tuple(geometry.origin))
    seed.SetDirection(tuple(geometry.direction))
    node = volumes.image_to_volume(seed, name, scene=scene)
    display = node.GetDisplayNode()
    if display is not None and hasattr(display, "AutoWindowLevelOff"):
        # the caller styles it (fixed window/level, dose wash, residual range): no automatic window/level,
        # whose histogram of the whole volume took seconds at every change of the voxels (92 M at full size)
        display.AutoWindowLevelOff()
    image = node.GetImageData()
    image.SetDimensions(*(int(v) for v in reversed(tuple(shape))))
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    slicer.util.arrayFromVolume(node)[...] = np.float32(fill)
    slicer.util.arrayFromVolumeModified(node)
    return node


def put_planes(node, result: PlaneResult) -> None:
    """Write the planes (or the whole volume) of a result into the node's voxels in place."""
    import slicer

    array = slicer.util.arrayFromVolume(node)
    if result.full is not None and result.full.shape == array.shape:
        array[...] = result.full
    else:
        for axis, (index, plane) in result.planes.items():
            if axis == 0:
                array[index] = plane
            elif axis == 1:
                array[:, index] = plane
            else:
                array[:, :, index] = plane
    slicer.util.arrayFromVolumeModified(node)


def put_volume(node, volume: np.ndarray) -> None:
    import slicer

    array = slicer.util.arrayFromVolume(node)
    array[...] = volume
    slicer.util.arrayFromVolumeModified(node)


def sigma_names(count: int) -> Sequence[str]:
    from DeepDosimetricsLib.deep.encode.encoder import feature_names

    return feature_names(count)
