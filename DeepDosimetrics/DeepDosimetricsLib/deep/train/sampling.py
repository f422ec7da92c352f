"""Random training tiles from the preprocessing cache, biased towards the body and the target.

Every tile is read with ``CachedPatient.read_tile`` (O(tile) memory: a patient is never loaded whole
into float). Where to put a tile is decided from coarse occupancy grids (one flag per block of
``tile // 2`` voxels: "holds body", "holds PTV"), computed once per patient slab by slab.

Sampling is a pure function of (seed, rank, step): the batch of step ``s`` on rank ``r`` is the same
whatever the number of DataLoader workers and whether training was resumed, so ``--resume`` continues
exactly and DDP ranks draw different tiles (``seed + rank``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from DeepDosimetricsLib.deep.cache.store import drop_mapped_pages
from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)


class TileSource(Protocol):
    """What sampling needs from a patient (``cache.CachedPatient`` provides it)."""

    id: str

    @property
    def shape(self) -> tuple[int, int, int]: ...

    @property
    def body(self) -> np.ndarray: ...

    def mask(self, name: str) -> np.ndarray: ...

    def has_structure(self, name: str) -> bool: ...

    def read_tile(self, specs: Any, start_zyx: Sequence[int], size_zyx: Sequence[int]) -> np.ndarray: ...


@dataclass
class SamplingConfig:
    """Where tiles are drawn and how they are augmented."""

    tile: int = 64
    batch: int = 2
    ptv_share: float = 0.3  # share of tiles centred near the target (PTV), when the patient has one
    body_share: float = 0.6  # share of tiles centred in the body; the rest anywhere in the volume
    edge_share: float = 0.0  # share of tiles (taken from ptv_share) centred on a voxel of the target's surface
    target: str = "PTV"
    flips: bool = True  # random flips along each axis
    jitter: float = 0.02  # window channels: value * (1 + a) + b, a and b uniform in [-jitter, jitter]
    # (how many fixed validation tiles are drawn is TrainConfig.val_tiles, passed to TileSampler.fixed_tiles)

    def __post_init__(self) -> None:
        if self.tile < 1 or self.batch < 1:
            raise InputError(f"tile ({self.tile}) and batch ({self.batch}) must be positive")
        if not (0 <= self.ptv_share <= 1 and 0 <= self.body_share <= 1 and self.ptv_share + self.body_share <= 1):
            raise InputError(
                f"ptv_share ({self.ptv_share}) and body_share ({self.body_share}) must lie in [0, 1] "
                "and add up to at most 1"
            )
        if not 0 <= self.edge_share <= self.ptv_share:
            raise InputError(f"edge_share ({self.edge_share}) must lie in [0, ptv_share ({self.ptv_share})]")
        if not 0 <= self.jitter < 0.5:
            raise InputError(f"jitter must lie in [0, 0.5), got {self.jitter}")


def release_pages(source: Any) -> None:
    """Unmap the pages a patient's memory maps have touched (they stay in the OS page cache).

    Reading tiles through ``np.memmap`` leaves the touched file pages counted in the process's
    resident memory; dropping them keeps the RSS bounded by the tile rather than by the patient.
    Uses the source's ``release()`` (``CachedPatient.release``); in-memory sources have none.
    """
    release = getattr(source, "release", None)
    if callable(release):
        release()


def occupancy_grid(volume: np.ndarray, block: int) -> np.ndarray:
    """Bool grid: which ``block``^3 blocks of a (z, y, x) mask hold a non-zero voxel (read slab by slab)."""
    z, y, x = volume.shape
    nz, ny, nx = -(-z // block), -(-y // block), -(-x // block)
    grid = np.zeros((nz, ny, nx), dtype=bool)
    for iz in range(nz):
        slab = np.asarray(volume[iz * block : (iz + 1) * block]).astype(bool, copy=False)
        flat = slab.any(axis=0)
        padded = np.zeros((ny * block, nx * block), dtype=bool)
        padded[:y, :x] = flat
        grid[iz] = padded.reshape(ny, block, nx, block).any(axis=(1, 3))
        drop_mapped_pages(volume)  # keep the resident memory at one slab
    return grid


@dataclass
class PatientIndex:
    """A patient's shape and the blocks holding body / target, used to place tiles."""

    shape: tuple[int, int, int]
    block: int
    body_blocks: np.ndarray  # (n, 3) block indices (z, y, x)
    target_blocks: np.ndarray  # (m, 3), m may be 0
    edge_points: Optional[np.ndarray] = None  # (e, 3) voxels of the target's surface (a subsample), or None


def surface_points(volume: np.ndarray, limit: int = 4096, slab: int = 32) -> np.ndarray:
    """(n, 3) voxels of a mask's surface (in the mask, with a 6-neighbour outside), at most ``limit``
    evenly spread; read slab by slab."""
    depth = volume.shape[0]
    points = []
    for z0 in range(0, depth, slab):
        lo, hi = max(0, z0 - 1), min(depth, z0 + slab + 1)
        block = np.asarray(volume[lo:hi]) != 0
        drop_mapped_pages(volume)
        inside = np.pad(block, 1)
        core = inside[1:-1, 1:-1, 1:-1]
        interior = core.copy()
        for axis in range(3):
            for shift in (-1, 1):
                interior &= np.roll(inside, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        edge = core & ~interior
        edge = edge[z0 - lo : z0 - lo + min(slab, depth - z0)]
        found = np.argwhere(edge)
        found[:, 0] += z0
        points.append(found)
    points = np.concatenate(points) if points else np.zeros((0, 3), np.int64)
    if len(points) > limit:
        points = points[np.linspace(0, len(points) - 1, limit).astype(int)]
    return points


def index_patient(source: TileSource, tile: int, target: str = "PTV", edges: bool = False) -> PatientIndex:
    """Occupancy of the body and the target in blocks of tile // 2 (a block voxel lies inside a tile centred
    in it); with ``edges``, also points of the target's surface."""
    block = max(1, tile // 2)
    body = np.argwhere(occupancy_grid(source.body, block))
    release_pages(source)
    has_target = source.has_structure(target) if hasattr(source, "has_structure") else True
    target_blocks = np.zeros((0, 3), dtype=np.int64)
    edge_points = None
    if has_target:
        try:
            target_blocks = np.argwhere(occupancy_grid(source.mask(target), block))
            if edges:
                edge_points = surface_points(source.mask(target))
        except InputError:
            pass
        release_pages(source)
    return PatientIndex(tuple(int(v) for v in source.shape), block, body, target_blocks, edge_points)


def tile_start(index: PatientIndex, config: SamplingConfig, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random tile corner: near the target, in the body or anywhere, by the configured shares."""
    shape = np.asarray(index.shape)
    u = rng.random()
    blocks: Optional[np.ndarray] = None
    if config.edge_share > 0 and u < config.edge_share and index.edge_points is not None and len(index.edge_points):
        centre = index.edge_points[rng.integers(len(index.edge_points))] + rng.integers(-2, 3, size=3)
        start = centre - config.tile // 2
        lo = np.minimum(0, shape - config.tile)
        hi = np.maximum(0, shape - config.tile)
        return tuple(int(v) for v in np.clip(start, lo, hi))
    if u < config.ptv_share and len(index.target_blocks):
        blocks = index.target_blocks
    elif u < config.ptv_share + config.body_share and len(index.body_blocks):
        blocks = index.body_blocks
    elif u < config.ptv_share + config.body_share and len(index.target_blocks):
        blocks = index.target_blocks
    if blocks is not None:
        block = blocks[rng.integers(len(blocks))]
        low = block * index.block
        high = np.minimum(low + index.block, shape)
        centre = low + (rng.random(3) * (high - low)).astype(int)
    else:
        centre = (rng.random(3) * shape).astype(int)
    start = centre - config.tile // 2
    # keep the tile inside the volume when it fits; otherwise let it cover the whole axis
    lo = np.minimum(0, shape - config.tile)
    hi = np.maximum(0, shape - config.tile)
    return tuple(int(v) for v in np.clip(start, lo, hi))


@dataclass(frozen=True)
class Augmentation:
    """The random augmentation of one tile: flipped spatial axes (0 = z, 1 = y, 2 = x), window gain and offset."""

    flip_axes: tuple[int, ...] = ()
    scale: float = 1.0
    shift: float = 0.0


def draw_augmentation(config: SamplingConfig, has_windows: bool, rng: np.random.Generator) -> Augmentation:
    """Draw one tile's augmentation (the draws, in this order, are part of the sampler's determinism)."""
    axes = tuple(a for a in range(3) if rng.random() < 0.5) if config.flips else ()
    if config.jitter > 0 and has_windows:
        scale = 1.0 + rng.uniform(-config.jitter, config.jitter)
        shift = rng.uniform(-config.jitter, config.jitter)
        return Augmentation(axes, scale, shift)
    return Augmentation(axes)


def augment(tile: np.ndarray, window_channels: Sequence[int], config: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """Random flips of a (C, z, y, x) tile and small intensity jitter of its window channels."""
    drawn = draw_augmentation(config, bool(len(window_channels)), rng)
    if drawn.flip_axes:
        tile = np.flip(tile, axis=tuple(1 + a for a in drawn.flip_axes))
    if drawn.scale != 1.0 or drawn.shift != 0.0:
        index = list(window_channels)
        tile = np.array(tile, copy=True)
        values = tile[index] * np.float32(drawn.scale) + np.float32(drawn.shift)
        tile[index] = np.clip(values, 0.0, 1.0)
    return np.ascontiguousarray(tile, dtype=np.float32)


def split_patients(ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train ids, validation ids), split by patient with a seeded shuffle; at least one of each when possible."""
    ids = sorted(ids)
    if not 0 <= val_fraction < 1:
        raise InputError(f"--val-fraction must lie in [0, 1), got {val_fraction}")
    if len(ids) < 2 or val_fraction == 0:
        return list(ids), []
    order = np.random.default_rng([seed, 7]).permutation(len(ids))
    n_val = min(len(ids) - 1, max(1, int(round(val_fraction * len(ids)))))
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


class TileSampler:
    """Draws the training batch of any step, and the fixed validation tiles, from indexed patients."""

    def __init__(
        self,
        sources: Sequence[TileSource],
        specs: Sequence[Any],
        config: SamplingConfig,
        seed: int = 0,
        rank: int = 0,
        indexes: Optional[Sequence[PatientIndex]] = None,
    ) -> None:
        if not sources:
            raise InputError("no patients to draw training tiles from")
        self.sources = list(sources)
        self.specs = list(specs)
        self.config = config
        self.seed = int(seed)
        self.rank = int(rank)
        if indexes is None:
            indexes = [index_patient(s, config.tile, config.target, edges=config.edge_share > 0) for s in sources]
        self.indexes = list(indexes)
        labels = [getattr(s, "label", str(s)) for s in self.specs]
        self.window_channels = [i for i, label in enumerate(labels) if label.startswith("window:")]

    def read(self, patient: int, start: Sequence[int], rng: Optional[np.random.Generator]) -> np.ndarray:
        size = (self.config.tile,) * 3
        tile = self.sources[patient].read_tile(self.specs, start, size)
        release_pages(self.sources[patient])
        if rng is None:
            return np.ascontiguousarray(tile, dtype=np.float32)
        return augment(tile, self.window_channels, self.config, rng)

    def batch(self, step: int, stream: int = 0) -> np.ndarray:
        """The (B, C, t, t, t) float32 batch of a training step on this rank (deterministic); another
        ``stream`` draws other tiles from the same distribution (e.g. those the PCA start is fitted on)."""
        rng = np.random.default_rng([self.seed, self.rank, int(step)] + ([int(stream)] if stream else []))
        tiles = []
        for _ in range(self.config.batch):
            patient = int(rng.integers(len(self.sources)))
            start = tile_start(self.indexes[patient], self.config, rng)
            tiles.append(self.read(patient, start, rng))
        return np.stack(tiles)

    def fixed_tiles(self, count: int, stream: int = 1) -> list[tuple[int, tuple[int, int, int]]]:
        """``count`` (patient, start) pairs, the same on every call and rank (no augmentation)."""
        rng = np.random.default_rng([self.seed, 1_000_003, stream])
        out = []
        for i in range(count):
            patient = i % len(self.sources)
            out.append((patient, tile_start(self.indexes[patient], self.config, rng)))
        return out


def _torch_iterable_base():
    from torch.utils.data import IterableDataset

    return IterableDataset


class TrainingBatches(_torch_iterable_base()):
    """IterableDataset of training batches for steps [start, stop): worker w makes steps w, w+W, ...

    Use with ``DataLoader(dataset, batch_size=None, num_workers=N)``: the loader alternates workers in
    order, so batches arrive in step order whatever N is.
    """

    def __init__(self, sampler: TileSampler, start_step: int, stop_step: int) -> None:
        super().__init__()
        self.sampler, self.start_step, self.stop_step = sampler, int(start_step), int(stop_step)

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step)

    def __iter__(self):
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start_step + worker, self.stop_step, workers):
            yield torch.from_numpy(self.sampler.batch(step))


def make_loader(sampler: TileSampler, start_step: int, stop_step: int, num_workers: int = 0, pin_memory: bool = False):
    """A DataLoader of training batches: ``num_workers`` processes, each prefetching batches ahead of the
    step; ``pin_memory`` (feeding a GPU) puts them in page-locked memory for asynchronous copies."""
    from torch.utils.data import DataLoader

    dataset = TrainingBatches(sampler, start_step, stop_step)
    workers = max(0, int(num_workers))
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers > 0 else None, persistent_workers=False)
