"""Tile grids over a volume and Gaussian overlap blending, streamed slab by slab along z.

The grid follows MONAI's ``sliding_window_inference`` exactly (stride ``int(tile * (1 - overlap))``,
the last tile of an axis shifted back to end at the volume's edge), and the blending weights are
MONAI's Gaussian importance map (sigma = 0.125 * tile, clamped at 1e-3), so that a reconstruction
made here agrees with MONAI's wherever both ran the same tiles.

Unlike MONAI, :class:`SlabStitcher` never holds the whole output: it accumulates weighted tiles in a
buffer one tile deep along z and hands finished z-planes to a sink as soon as no later tile can
touch them (tiles must arrive sorted by their z start, as :meth:`TileGrid.positions` gives them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np

from DeepDosimetricsLib.runtime.errors import InputError

Triple = tuple[int, int, int]
#: MONAI's default sigma of the Gaussian blending weights, as a fraction of the tile size
SIGMA_SCALE = 0.125
#: smallest blending weight (MONAI clamps its importance map at this value)
MIN_WEIGHT = 1e-3


def as_triple(value: Union[int, Sequence[int]]) -> Triple:
    """An int or 3 ints as a (z, y, x) triple."""
    if isinstance(value, (int, np.integer)):
        return (int(value),) * 3
    values = tuple(int(v) for v in value)
    if len(values) != 3:
        raise InputError(f"expected 1 or 3 sizes, got {list(value)}")
    return values  # type: ignore[return-value]


def stride_for(tile: int, overlap: float) -> int:
    """Step between tile starts for an overlap fraction in [0, 1) (MONAI's rule, at least 1)."""
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap:g}")
    return max(int(tile * (1.0 - overlap)), 1)


def axis_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: every ``stride``, the last one moved back to end at ``size``.

    A volume shorter than the tile gets one tile at 0 (reading past the end gives padding).
    """
    if size <= tile:
        return [0]
    starts = []
    index = 0
    while True:
        start = index * stride
        if start + tile >= size:
            starts.append(size - tile)
            break
        starts.append(start)
        index += 1
    return starts


@dataclass(frozen=True)
class TileGrid:
    """The tiles covering a (z, y, x) volume."""

    shape: Triple
    tile: Triple
    stride: Triple

    @classmethod
    def create(cls, shape: Sequence[int], tile: Union[int, Sequence[int]], overlap: float = 0.25) -> TileGrid:
        """A grid of ``tile``-sized tiles overlapping by the fraction ``overlap``."""
        tiles = as_triple(tile)
        if min(tiles) < 1:
            raise InputError(f"tile size must be positive, got {list(tiles)}")
        size = as_triple(shape)
        stride = tuple(size[a] if size[a] == tiles[a] else stride_for(tiles[a], overlap) for a in range(3))
        return cls(size, tiles, stride)  # type: ignore[arg-type]

    @property
    def axes(self) -> list[list[int]]:
        """The starts along z, y and x."""
        return [axis_starts(self.shape[a], self.tile[a], self.stride[a]) for a in range(3)]

    def positions(self) -> list[Triple]:
        """All tile starts, sorted by z, then y, then x."""
        zs, ys, xs = self.axes
        return [(z, y, x) for z in zs for y in ys for x in xs]

    def __len__(self) -> int:
        zs, ys, xs = self.axes
        return len(zs) * len(ys) * len(xs)

    def window(self, start: Sequence[int]) -> tuple[slice, slice, slice]:
        """The part of the volume a tile at ``start`` covers (clipped to the volume)."""
        return tuple(slice(start[a], min(start[a] + self.tile[a], self.shape[a])) for a in range(3))  # type: ignore[return-value]


def tiles_touching(grid: TileGrid, mask: Union[np.ndarray, Callable[[int, int], np.ndarray]]) -> list[Triple]:
    """The tile starts whose window holds at least one non-zero voxel of ``mask`` (e.g. the body).

    ``mask`` is a (z, y, x) array, or a function ``(z0, z1) -> mask[z0:z1]`` (to read a large mask in slabs).
    """
    if callable(mask):
        read = mask
    else:
        if tuple(mask.shape) != grid.shape:
            raise InputError(f"mask shape {mask.shape} differs from the grid's volume {grid.shape}")
        read = lambda z0, z1: mask[z0:z1]  # noqa: E731
    # any() over each axis' windows in turn: 3 cheap reductions instead of one pass per tile
    zs, ys, xs = grid.axes
    tz, ty, tx = grid.tile
    keep = []
    for z in zs:
        slab = np.asarray(read(z, min(z + tz, grid.shape[0]))).any(axis=0)  # (y, x)
        if not slab.any():
            continue
        for y in ys:
            row = slab[y : y + ty].any(axis=0)  # (x,)
            if not row.any():
                continue
            for x in xs:
                if row[x : x + tx].any():
                    keep.append((z, y, x))
    return keep


def gaussian_weights(tile: Union[int, Sequence[int]], sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """Blending weights of one tile (float32, peak 1 at the centre), as MONAI's Gaussian importance map."""
    weights: Optional[np.ndarray] = None
    for size in as_triple(tile):
        sigma = np.float32(size * sigma_scale)
        x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
        profile = np.exp(x**2 / (np.float32(-2.0) * sigma**2)).astype(np.float32)
        weights = profile if weights is None else weights[..., None] * profile
    assert weights is not None
    floor = max(float(weights.min()), MIN_WEIGHT)
    return np.maximum(weights, np.float32(floor)).astype(np.float32)


#: receives finished planes: (first z index, block (C, n, y, x) float32)
Sink = Callable[[int, np.ndarray], None]


class SlabStitcher:
    """Blends tiles into a (C, z, y, x) volume with Gaussian weights, streaming finished z-planes to a sink.

    Memory: one (tile_z, y, x, C) float32 buffer (channels last, the layout a channels_last_3d network
    gives) plus one (tile_z, y, x) weight buffer. Voxels no tile covered (skipped air) get ``fill``
    (one value per channel, e.g. the channel value of air). The sink receives (C, n, y, x) blocks.
    """

    def __init__(
        self,
        shape: Sequence[int],
        channels: int,
        tile: Union[int, Sequence[int]],
        sink: Sink,
        fill: Optional[Sequence[float]] = None,
        weights: Optional[np.ndarray] = None,
        observer: Optional[Callable[[int, np.ndarray, np.ndarray], None]] = None,
        extent: Optional[Sequence[int]] = None,
    ):
        self.shape = as_triple(shape)
        _, height, width = self.shape
        #: (y0, y1, x0, x1): the rows and columns tiles can reach (the buffer's extent); outside is ``fill``
        self.extent = (0, height, 0, width) if extent is None else tuple(int(v) for v in extent)
        #: also sees each finished block, with its (n, y, x) coverage mask (False: no tile, ``fill``)
        self.observer = observer
        self.channels = int(channels)
        self.tile = as_triple(tile)
        self.sink = sink
        self.fill = np.zeros(self.channels, np.float32) if fill is None else np.asarray(fill, np.float32)
        if self.fill.shape != (self.channels,):
            raise ValueError(f"fill needs {self.channels} values, got {self.fill.shape}")
        self.weights = gaussian_weights(self.tile) if weights is None else weights.astype(np.float32)
        self._weights_last = np.ascontiguousarray(self.weights[..., None])
        depth = min(self.tile[0], self.shape[0])
        y0, y1, x0, x1 = self.extent
        self._values = np.zeros((depth, y1 - y0, x1 - x0, self.channels), np.float32)
        self._sums = np.zeros((depth, y1 - y0, x1 - x0), np.float32)
        self._base = 0  # z of the buffer's first plane; planes below it went to the sink
        #: planes per block handed to the sink (about 16 MB per channel)
        self.flush_planes = max(1, (4 << 20) // max(1, height * width))

    def add(self, start: Sequence[int], values: np.ndarray) -> None:
        """Add one tile's (C, tz, ty, tx) values at ``start``; starts must not decrease in z."""
        self.add_channels_last(start, np.moveaxis(np.asarray(values, np.float32), 0, -1))

    def add_channels_last(self, start: Sequence[int], values: np.ndarray) -> None:
        """Add one tile's (tz, ty, tx, C) values at ``start`` (the fast path for channels_last output)."""
        z, y, x = (int(s) for s in start)
        if z < self._base:
            raise ValueError(f"tile at z={z} arrives after planes up to z={self._base} were finished")
        depth = self._values.shape[0]
        if z + min(self.tile[0], self.shape[0] - z) > self._base + depth:
            self.flush_until(z)
        z1, y1, x1 = (min(s + t, n) for s, t, n in zip((z, y, x), self.tile, self.shape))
        top, _, left, _ = self.extent
        if y < top or x < left or y1 > self.extent[1] or x1 > self.extent[3]:
            raise ValueError(f"tile at {tuple(start)} reaches outside the stitcher's extent {self.extent}")
        crop = (slice(0, z1 - z), slice(0, y1 - y), slice(0, x1 - x))
        target = (slice(z - self._base, z1 - self._base), slice(y - top, y1 - top), slice(x - left, x1 - left))
        weighted = np.multiply(values[crop], self._weights_last[crop])
        self._values[target] += weighted
        self._sums[target] += self.weights[crop]

    def flush_until(self, z: int) -> None:
        """Send planes below ``z`` to the sink (no tile added later may touch them)."""
        count = min(z, self.shape[0]) - self._base
        if count <= 0:
            return
        depth = self._values.shape[0]
        count = min(count, depth)
        for first in range(0, count, self.flush_planes):  # small blocks: no buffer-sized temporary
            last = min(first + self.flush_planes, count)
            block, covered = self._finish(first, last)
            if self.observer is not None:
                self.observer(self._base + first, block, covered)
            self.sink(self._base + first, block)
        rest = depth - count
        if rest > 0:
            self._values[:rest] = self._values[count:]
            self._sums[:rest] = self._sums[count:]
        self._values[rest:] = 0.0
        self._sums[rest:] = 0.0
        self._base += count
        if self._base < z:  # a gap with no tile at all
            self.flush_until(z)

    def finish(self) -> None:
        """Send every remaining plane to the sink."""
        self.flush_until(self.shape[0])

    def _finish(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        sums = self._sums[first:last]
        inside = sums > 0
        normalised = np.divide(self._values[first:last], np.where(inside, sums, 1.0)[..., None])
        _, height, width = self.shape
        y0, y1, x0, x1 = self.extent
        if (y0, y1, x0, x1) == (0, height, 0, width):
            block, covered = np.ascontiguousarray(np.moveaxis(normalised, -1, 0)), inside  # (C, n, y, x)
        else:
            block = np.empty((self.channels, last - first, height, width), np.float32)
            block[:] = self.fill[:, None, None, None]
            block[:, :, y0:y1, x0:x1] = np.moveaxis(normalised, -1, 0)
            covered = np.zeros((last - first, height, width), bool)
            covered[:, y0:y1, x0:x1] = inside
        if not covered.all():
            for channel in range(self.channels):
                block[channel][~covered] = self.fill[channel]
        return block, covered


class ArraySink:
    """Collects the stitched planes in memory as one (C, z, y, x) float32 array (small volumes, tests)."""

    def __init__(self, shape: Sequence[int], channels: int):
        self.array = np.zeros((channels, *as_triple(shape)), np.float32)

    def __call__(self, z: int, block: np.ndarray) -> None:
        self.array[:, z : z + block.shape[1]] = block


class NpyChannelSink:
    """Writes the stitched planes straight to one ``.npy`` file per channel (nothing held in memory).

    Call :meth:`close` when done; :meth:`load` then memory-maps a channel.
    """

    def __init__(self, paths: Sequence[Union[str, Path]], shape: Sequence[int]):
        self.paths = [Path(p) for p in paths]
        self.shape = as_triple(shape)
        self._files = []
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "wb")
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": self.shape}
            np.lib.format.write_array_header_1_0(handle, header)
            self._files.append(handle)
        self._written = 0

    def __call__(self, z: int, block: np.ndarray) -> None:
        if z != self._written:
            raise ValueError(f"planes must arrive in order: expected z={self._written}, got {z}")
        for channel, handle in enumerate(self._files):
            np.ascontiguousarray(block[channel]).tofile(handle)
        self._written += block.shape[1]

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        self._files = []
        if self._written != self.shape[0]:
            raise ValueError(f"only {self._written} of {self.shape[0]} planes were written")

    def load(self, channel: int) -> np.ndarray:
        """Channel ``channel`` memory-mapped read-only, (z, y, x) float32."""
        return np.load(self.paths[channel], mmap_mode="r")

    def read(self, channel: int) -> np.ndarray:
        """Channel ``channel`` read into memory (no file mapping left behind), (z, y, x) float32."""
        return np.load(self.paths[channel])

    def remove(self) -> None:
        """Delete the files."""
        for path in self.paths:
            if path.exists():
                os.remove(path)


def batched(items: Sequence, size: int) -> Iterable[Sequence]:
    """Consecutive chunks of at most ``size`` items."""
    if size < 1:
        raise InputError(f"batch size must be at least 1, got {size}")
    for first in range(0, len(items), size):
        yield items[first : first + size]


def tiled_apply(
    read_tile: Callable[[Triple, Triple], np.ndarray],
    predict: Callable[[np.ndarray], np.ndarray],
    grid: TileGrid,
    out_channels: int,
    positions: Optional[Sequence[Triple]] = None,
    batch: int = 4,
    sink: Optional[Sink] = None,
    fill: Optional[Sequence[float]] = None,
) -> Optional[np.ndarray]:
    """Run ``predict`` ((B, C, *tile) -> (B, C', *tile)) over the grid and blend the tiles.

    ``read_tile(start, size)`` gives one (C, *tile) input. Without a sink the result is returned as a
    (C', z, y, x) array (small volumes); with one, planes stream to it and None is returned.
    """
    memory = ArraySink(grid.shape, out_channels) if sink is None else None
    stitcher = SlabStitcher(grid.shape, out_channels, grid.tile, memory or sink, fill=fill)
    chosen = grid.positions() if positions is None else sorted(positions)
    for group in batched(chosen, batch):
        inputs = np.stack([read_tile(start, grid.tile) for start in group])
        outputs = predict(inputs)
        for start, values in zip(group, outputs):
            stitcher.add(start, values)
    stitcher.finish()
    return memory.array if memory is not None else None
