"""Tile grids, Gaussian blending and the slab-streaming stitcher.

The decisive check: blending the tiles of a local (convolutional) predictor gives exactly the
single-pass result wherever every covering tile saw the voxel's whole neighbourhood.
"""

from __future__ import annotations

import numpy as np
import pytest
from DeepDosimetricsLib.deep.tiling import (
    ArraySink,
    NpyChannelSink,
    SlabStitcher,
    TileGrid,
    axis_starts,
    gaussian_weights,
    stride_for,
    tiled_apply,
    tiles_touching,
)
from DeepDosimetricsLib.runtime.errors import InputError


def box_filter(volume: np.ndarray) -> np.ndarray:
    """A 3x3x3 mean per channel with zero padding, plus a channel mixing: a local 'network'."""
    padded = np.pad(volume, ((0, 0), (1, 1), (1, 1), (1, 1)))
    out = np.zeros_like(volume)
    depth, height, width = volume.shape[1:]
    for dz in range(3):
        for dy in range(3):
            for dx in range(3):
                out += padded[:, dz : dz + depth, dy : dy + height, dx : dx + width]
    out /= 27.0
    return np.stack([out[0] + 0.5 * out[-1], out[-1] * out[0]]).astype(np.float32)


def reader(volume: np.ndarray):
    """read_tile over an in-memory (C, z, y, x) volume; outside reads 0."""

    def read(start, size):
        tile = np.zeros((volume.shape[0], *size), np.float32)
        src = tuple(slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, size, volume.shape[1:]))
        dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, start))
        tile[(slice(None), *dst)] = volume[(slice(None), *src)]
        return tile

    return read


def interior_mask(grid: TileGrid, positions, radius: int = 1) -> np.ndarray:
    """Voxels at least ``radius`` from every internal face of every tile covering them."""
    good = np.ones(grid.shape, bool)
    for start in positions:
        window = grid.window(start)
        bad = np.zeros(grid.shape, bool)
        for axis in range(3):
            lo, hi = window[axis].start, window[axis].stop
            index = [slice(w.start, w.stop) for w in window]
            if lo > 0:  # an internal face: the tile's padding differs from the volume's neighbours
                index[axis] = slice(lo, lo + radius)
                bad[tuple(index)] = True
            index = [slice(w.start, w.stop) for w in window]
            if hi < grid.shape[axis]:
                index[axis] = slice(hi - radius, hi)
                bad[tuple(index)] = True
        good &= ~bad
    return good


def test_axis_starts_follow_monai_rule():
    assert stride_for(16, 0.25) == 12
    assert stride_for(16, 0.5) == 8
    assert axis_starts(48, 16, 12) == [0, 12, 24, 32]  # the last tile moved back to end at the edge
    assert axis_starts(40, 16, 12) == [0, 12, 24]
    assert axis_starts(16, 16, 12) == [0]
    assert axis_starts(10, 16, 12) == [0]  # shorter than a tile: one tile, read past the end
    grid = TileGrid.create((40, 48, 16), 16, 0.25)
    assert len(grid) == 3 * 4 * 1 == len(grid.positions())
    assert grid.positions() == sorted(grid.positions())
    with pytest.raises(InputError, match="overlap"):
        stride_for(16, 1.0)


def test_gaussian_weights_shape_and_floor():
    weights = gaussian_weights(16)
    assert weights.shape == (16, 16, 16) and weights.dtype == np.float32
    assert np.allclose(weights, weights[::-1]) and np.allclose(weights, weights.transpose(2, 1, 0))
    assert weights.max() == pytest.approx(np.exp(-(0.5**2) * 3 / (2 * 2.0**2)), rel=1e-6)
    assert weights.min() == pytest.approx(1e-3)


def test_gaussian_weights_equal_monai_importance_map():
    monai_utils = pytest.importorskip("monai.data.utils", reason="MONAI (benchmark dependency) is not installed")
    expected = monai_utils.compute_importance_map((16, 12, 20), mode="gaussian", sigma_scale=0.125).numpy()
    np.testing.assert_allclose(gaussian_weights((16, 12, 20)), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape, overlap, batch", [((37, 41, 29), 0.25, 3), ((32, 48, 40), 0.5, 1), ((20, 33, 30), 0.5, 64)])
def test_tiled_equals_single_pass_in_the_interior(shape, overlap, batch):
    rng = np.random.default_rng(0)
    volume = rng.random((3, *shape), dtype=np.float32)
    grid = TileGrid.create(shape, 16, overlap)
    tiled = tiled_apply(reader(volume), lambda x: np.stack([box_filter(t) for t in x]), grid, 2, batch=batch)
    single = box_filter(volume)
    interior = interior_mask(grid, grid.positions())
    assert interior.mean() > 0.2  # the comparison covers a good part of the volume
    np.testing.assert_allclose(tiled[:, interior], single[:, interior], rtol=0, atol=2e-6)
    # near internal tile faces the blend mixes in tiles that saw zero padding: it differs there
    assert np.abs(tiled - single).max() > 1e-3


def test_blending_is_normalised_and_skipped_tiles_get_the_fill():
    shape = (30, 30, 30)
    grid = TileGrid.create(shape, 16, 0.25)
    body = np.zeros(shape, np.uint8)
    body[2:8, 3:9, 20:26] = 1
    kept = tiles_touching(grid, body)
    assert 0 < len(kept) < len(grid)
    out = tiled_apply(reader(np.zeros((1, *shape), np.float32)), lambda x: np.full((len(x), 2, *x.shape[2:]), 0.7, np.float32),
                      grid, 2, positions=kept, fill=(-1.0, -2.0))
    covered = np.zeros(shape, bool)
    for start in kept:
        covered[grid.window(start)] = True
    np.testing.assert_allclose(out[:, covered], 0.7, atol=1e-6)
    assert np.all(out[0][~covered] == -1.0) and np.all(out[1][~covered] == -2.0)


def test_tiles_touching_equals_brute_force():
    rng = np.random.default_rng(1)
    mask = (rng.random((25, 40, 37)) > 0.9995).astype(np.uint8)
    grid = TileGrid.create(mask.shape, 16, 0.25)
    brute = [start for start in grid.positions() if mask[grid.window(start)].any()]
    assert tiles_touching(grid, mask) == brute
    assert tiles_touching(grid, np.zeros(mask.shape, np.uint8)) == []
    with pytest.raises(InputError, match="shape"):
        tiles_touching(grid, mask[:-1])


def test_stitcher_refuses_tiles_out_of_z_order():
    sink = ArraySink((40, 16, 16), 1)
    stitcher = SlabStitcher((40, 16, 16), 1, 16, sink)
    stitcher.add((24, 0, 0), np.ones((1, 16, 16, 16), np.float32))
    with pytest.raises(ValueError, match="after planes"):
        stitcher.add((0, 0, 0), np.ones((1, 16, 16, 16), np.float32))


def test_npy_sink_streams_to_files(tmp_path):
    rng = np.random.default_rng(2)
    volume = rng.random((2, 35, 20, 18), dtype=np.float32)
    grid = TileGrid.create(volume.shape[1:], 16, 0.25)
    in_memory = tiled_apply(reader(volume), lambda x: x, grid, 2)
    sink = NpyChannelSink([tmp_path / "a.npy", tmp_path / "b.npy"], volume.shape[1:])
    tiled_apply(reader(volume), lambda x: x, grid, 2, sink=sink)
    sink.close()
    for channel in range(2):
        np.testing.assert_array_equal(sink.load(channel), in_memory[channel])
    np.testing.assert_allclose(in_memory, volume, atol=1e-6)  # identity predictor: blending changes nothing
    sink.remove()
    assert not (tmp_path / "a.npy").exists()
