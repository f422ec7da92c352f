"""Issue 20: the streamed paths of `encode --reconstruct` give the outputs of the in-memory ones.

- the NRRDs written plane block by plane block equal SimpleITK's whole-volume writes, and the metric rows
  computed from the files by slabs equal those of the in-memory volumes;
- the structures' decoded dose read off the stitched planes equals the dose decoded again tile by tile;
- per-tile voxel counts binned into tile cells equal the counts of the slab-by-slab mask reads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from DeepDosimetricsLib.data.geometry import Geometry
from DeepDosimetricsLib.deep.cache.build import ensure_cache
from DeepDosimetricsLib.deep.cache.store import open_cache
from DeepDosimetricsLib.deep.channels import parse_channels
from DeepDosimetricsLib.deep.encode import encoder
from DeepDosimetricsLib.deep.encode.reconstruction import (
    ReconstructionOptions,
    air_values,
    can_stream,
    write_reconstruction,
    write_reconstruction_streamed,
)
from DeepDosimetricsLib.deep.tiling import NpyChannelSink, TileGrid, tiles_touching
from DeepDosimetricsLib.runtime.nrrd_stream import open_writer

CHANNELS = ["window:soft_tissue", "mask:PTV", "dose"]


@pytest.fixture(scope="module")
def patient(phantom_cohort, tmp_path_factory):
    folder = tmp_path_factory.mktemp("one") / "cohort"
    folder.mkdir()
    first = sorted(p.name for p in phantom_cohort.iterdir() if p.is_dir())[0]
    shutil.copytree(phantom_cohort / first, folder / first)
    cache = ensure_cache(folder, cache_dir=folder.parent / "cache", quiet=True)
    return open_cache(cache.folder)[first]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    import torch
    from DeepDosimetricsLib.deep.model import ModelConfig, TileAutoencoder

    torch.manual_seed(1)
    config = ModelConfig(channels=CHANNELS, tile=16, features=6, widths=[4, 8], groups=2)
    return encoder.TileModel(TileAutoencoder(config))


@pytest.fixture(scope="module")
def stitched(patient, runner, tmp_path_factory):
    """The patient encoded with its reconstruction streamed to .npy files."""
    specs = parse_channels(CHANNELS)
    folder = tmp_path_factory.mktemp("stitch")
    sink = NpyChannelSink([folder / f"channel{c}.npy" for c in range(len(specs))], patient.shape)
    encoded = encoder.encode_patient(runner, patient, specs, 0.25, 5, sink, air_values(patient, specs))
    sink.close()
    return encoded, sink


def _images(folder: Path) -> dict:
    return {path.name: sitk.ReadImage(str(path)) for path in sorted(folder.glob("*.nrrd"))}


@pytest.mark.parametrize("compress", [False, True])
def test_streamed_reconstruction_equals_the_in_memory_one(patient, stitched, tmp_path, compress):
    _, sink = stitched
    specs = parse_channels(CHANNELS)
    assert can_stream(patient)
    options = ReconstructionOptions(compress=compress)
    memory_rows = write_reconstruction(patient, specs, sink.read, tmp_path / "memory", options)
    streamed_rows = write_reconstruction_streamed(patient, specs, sink.paths, tmp_path / "streamed", options,
                                                  work_dir=tmp_path)
    assert streamed_rows == memory_rows  # every metric, bit for bit
    memory, streamed = _images(tmp_path / "memory"), _images(tmp_path / "streamed")
    assert set(memory) == set(streamed) and len(memory) == 7  # 3 volumes, 3 residuals, 1 label
    for name, image in memory.items():
        other = streamed[name]
        assert other.GetPixelID() == image.GetPixelID(), name
        assert other.GetSize() == image.GetSize() and other.GetSpacing() == image.GetSpacing()
        assert np.allclose(other.GetOrigin(), image.GetOrigin()) and np.allclose(other.GetDirection(), image.GetDirection())
        np.testing.assert_array_equal(sitk.GetArrayFromImage(other), sitk.GetArrayFromImage(image), err_msg=name)
    assert not list(tmp_path.glob("truth*.npy")) and not list((tmp_path / "streamed").glob(".*"))


def test_decoded_dose_from_the_stitched_planes_equals_a_second_decode(patient, runner, stitched):
    """dose_rec_* read off the reconstruction's planes = the grid tiles decoded again (features only)."""
    encoded, _ = stitched
    specs = parse_channels(CHANNELS)
    again = encoder.encode_patient(runner, patient, specs, 0.25, 5, None, air_values(patient, specs))
    np.testing.assert_array_equal(again.features, encoded.features)
    assert set(again.decoded) == set(encoded.decoded) and encoded.decoded
    for name, values in encoded.decoded.items():
        for feature, value in values.items():
            assert again.decoded[name][feature] == pytest.approx(value, rel=1e-4, abs=1e-4), (name, feature)
    for name, parts in encoded.parts.items():
        for part, pooled in parts.items():
            np.testing.assert_allclose(again.parts[name][part], pooled, rtol=1e-12)


def test_tile_cell_counts_equal_slab_counts(patient):
    grid = TileGrid.create(patient.shape, 16, 0.25)
    positions = tiles_touching(grid, encoder.body_slab_reader(patient))
    slab_counts = encoder.structure_counts(patient, grid, positions)
    for name in patient.structure_names:
        voxels = encoder.structure_voxels(patient, name)
        np.testing.assert_array_equal(encoder.TileCells(voxels, grid, positions).sums(), slab_counts[name])
        weights = np.random.default_rng(0).random((len(voxels), 2))
        expected = np.array([weights[encoder.rows_in_box(voxels, start, grid.tile)].sum(axis=0) for start in positions])
        np.testing.assert_allclose(encoder.TileCells(voxels, grid, positions).sums(weights), expected, rtol=1e-10,
                                   atol=1e-9)


def test_nrrd_plane_writer(tmp_path):
    geometry = Geometry(size=(5, 4, 3), spacing=(0.9, 1.1, 2.5), origin=(-3.0, 4.5, 7.25),
                        direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    volume = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    for compress in (False, True):
        with open_writer(tmp_path / "v.nrrd", geometry, np.float32, compress) as writer:
            writer.write(volume[:2])
            writer.write(volume[2:])
        image = sitk.ReadImage(str(tmp_path / "v.nrrd"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume)
        assert Geometry.from_image(image).isclose(geometry)
    with pytest.raises(ValueError):
        with open_writer(tmp_path / "short.nrrd", geometry, np.uint8) as writer:
            writer.write(np.zeros((2, 4, 5), np.uint8))
    assert not (tmp_path / "short.nrrd").exists() and not list(tmp_path.glob(".*partial"))
