"""Encoding and reconstruction on the phantom cohort with a tiny untrained model (tile 16)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from DeepDosimetricsLib.cli import main as cli_main
from DeepDosimetricsLib.commands.encode import scene_outputs
from DeepDosimetricsLib.deep.cache.build import ensure_cache
from DeepDosimetricsLib.deep.channels import parse_channels
from DeepDosimetricsLib.deep.encode import encoder, job
from DeepDosimetricsLib.deep.encode.encoder import TileModel, encode_patient
from DeepDosimetricsLib.deep.encode.job import EncodeSettings, encode_cohort
from DeepDosimetricsLib.deep.tiling import ArraySink, TileGrid, tiles_touching
from DeepDosimetricsLib.runtime.errors import InputError

CHANNELS = ["window:soft_tissue", "mask:PTV", "dose"]


def make_model(folder: Path, channels=CHANNELS, seed: int = 0) -> Path:
    import torch
    from DeepDosimetricsLib.deep.model import ModelConfig, TileAutoencoder, save_model

    torch.manual_seed(seed)
    config = ModelConfig(channels=list(channels), tile=16, features=10, widths=[4, 8], groups=2)
    return save_model(folder, TileAutoencoder(config), config)


@pytest.fixture(scope="module")
def two_patients(phantom_cohort, tmp_path_factory) -> Path:
    """The first two phantom patients (the encoding tests need no more)."""
    folder = tmp_path_factory.mktemp("two") / "cohort"
    folder.mkdir()
    for pid in sorted(p.name for p in phantom_cohort.iterdir() if p.is_dir())[:2]:
        shutil.copytree(phantom_cohort / pid, folder / pid)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def cache_dir(two_patients, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache") / "cache"
    ensure_cache(two_patients, cache_dir=folder)
    return folder


@pytest.fixture(scope="module")
def encoded(two_patients, model_dir, cache_dir, tmp_path_factory) -> Path:
    """One full run: reconstruction, snapshots, a traversal of z00."""
    out = tmp_path_factory.mktemp("encoded") / "out"
    first = sorted(p.name for p in two_patients.iterdir())[0]
    settings = EncodeSettings(reconstruct=True, snapshots=True, traverse=["z00"], sigmas=(-2.0, 2.0),
                              quiet=True, progress_json=False, batch=5, patients=[first])
    hook = scene_outputs(two_patients, snapshots=True, scene=False)  # the MRML layer writes them
    result = encode_cohort(model_dir, two_patients, out, cache_dir, settings, patient_hook=hook)
    assert result.done == [first] and not result.skipped
    return out


def test_features_do_not_depend_on_the_batch_size(model_dir, cache_dir):
    from DeepDosimetricsLib.deep.cache.store import open_cache
    from DeepDosimetricsLib.deep.model import load_model

    cp = next(iter(open_cache(cache_dir)))
    model, config = load_model(model_dir)
    runner = TileModel(model, "cpu")
    specs = parse_channels(config.channels)
    one = encode_patient(runner, cp, specs, batch=1)
    many = encode_patient(runner, cp, specs, batch=7)
    assert one.positions == many.positions and len(one.positions) > 7
    np.testing.assert_allclose(one.features, many.features, rtol=0, atol=2e-5)
    a, b = one.feature_table(), many.feature_table()
    assert list(a["feature"]) == list(b["feature"])
    np.testing.assert_allclose(a["value"], b["value"], atol=2e-5)


def test_tiles_without_body_are_skipped(two_patients, model_dir, tmp_path):
    from DeepDosimetricsLib.deep.cache.store import CacheConfig
    from DeepDosimetricsLib.deep.model import load_model

    cache = ensure_cache(two_patients, CacheConfig(margin_mm=1e5), cache_dir=tmp_path / "cache",
                         ids=[sorted(p.name for p in two_patients.iterdir())[0]])
    cp = next(iter(cache))
    assert cp.shape == (32, 48, 48)
    # a patient whose body starts at slice 16: the tiles of the first tile row hold only air
    stored = np.load(cp.folder / cp.manifest["files"]["body"], mmap_mode="r+")
    stored[:16] = 0
    stored.flush()
    del stored
    model, config = load_model(model_dir)
    body = np.array(cp.body)
    grid = TileGrid.create(cp.shape, config.tile, 0.25)
    result = encode_patient(TileModel(model), cp, parse_channels(config.channels))
    expected = [s for s in grid.positions() if body[grid.window(s)].any()]
    assert result.positions == expected == tiles_touching(grid, body)
    assert 0 < len(result.positions) < len(grid)
    assert list(result.counts["BODY"]) == [np.count_nonzero(body[grid.window(s)]) for s in expected]
    assert result.counts["BODY"].min() > 0
    table = result.tile_table(cp.geometry)
    assert (table["voxels_BODY"] > 0).all() and len(table) == len(expected)


def test_structure_features_are_voxel_weighted_means_and_stds():
    features = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 0.0]], np.float32)
    tiles = encoder.PatientTiles("p", TileGrid.create((16, 16, 16), 16), [(0, 0, 0)] * 3, features,
                                  {"BODY": np.array([1, 1, 2]), "PTV": np.array([0, 3, 1]), "Empty": np.zeros(3, int)})
    table = tiles.feature_table().set_index(["structure", "feature"])["value"]
    assert table[("BODY", "z00_mean")] == pytest.approx((1 + 3 + 10) / 4)
    assert table[("PTV", "z00_mean")] == pytest.approx((9 + 5) / 4)
    assert table[("PTV", "z01_std")] == pytest.approx(np.sqrt((3 * 2.5**2 + 7.5**2) / 4))
    assert "Empty" not in table.index.get_level_values(0)


def test_encoding_outputs(encoded, two_patients, cache_dir):
    features = pd.read_csv(encoded / "features.csv")
    assert list(features.columns) == ["patient", "structure", "feature", "value"]
    from DeepDosimetricsLib.features.spatial import spatial_metric_names, subvolume_names

    pooled = {f"z{i:02d}_{s}" for i in range(10) for s in ("mean", "std", "ctr")}
    halves = {f"z{i:02d}_mean_{half}" for i in range(10) for half in subvolume_names((2,))}
    decoded = {"dose_rec_mean_gy", "dose_rec_max_gy"} | set(encoder.decoded_spatial(dict.fromkeys(spatial_metric_names())))
    assert set(features["feature"]) == pooled | halves | decoded
    assert not features.query("structure == 'BODY'")["feature"].str.endswith("_ctr").any()
    assert {"BODY", "PTV"} <= set(features["structure"])
    tiles = pd.read_csv(encoded / "tiles.csv")
    assert {"patient", "tile", "z", "y", "x", "center_x_mm", "voxels_BODY", "voxels_PTV", "z09"} <= set(tiles.columns)
    metrics = pd.read_csv(encoded / "metrics.csv")
    got = set(zip(metrics["channel"], metrics["metric"]))
    for expected in [("window:soft_tissue", "psnr"), ("window:soft_tissue", "ssim"), ("window:soft_tissue", "mae_hu_body"),
                     ("window:soft_tissue", "mae_hu_ptv"), ("mask:PTV", "dice"), ("dose", "mae_gy_ptv"),
                     ("dose", "D95_error_gy"), ("dose", "Dmean_error_gy")]:
        assert expected in got
    pid = sorted(features["patient"].unique())[0]
    recon = encoded / pid / "recon"
    ct = sitk.ReadImage(str(two_patients / pid / "ct.nrrd"))
    for name in ["window_soft_tissue", "window_soft_tissue_residual", "mask_PTV", "mask_PTV_label", "dose", "dose_residual"]:
        image = sitk.ReadImage(str(recon / f"{name}.nrrd"))
        assert image.GetSize() == ct.GetSize() and np.allclose(image.GetOrigin(), ct.GetOrigin())
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(recon / "mask_PTV_label.nrrd")))
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
    # reconstruction - residual = the original CT clipped to the window (inside the cached crop)
    window = sitk.GetArrayFromImage(sitk.ReadImage(str(recon / "window_soft_tissue.nrrd")))
    residual = sitk.GetArrayFromImage(sitk.ReadImage(str(recon / "window_soft_tissue_residual.nrrd")))
    assert window.min() >= -160 - 1e-3 and window.max() <= 240 + 1e-3  # HU within the soft-tissue window
    hu = np.clip(sitk.GetArrayFromImage(ct).astype(np.float32), -160, 240)
    inside = residual != 0
    assert inside.mean() > 0.3
    np.testing.assert_allclose((window - residual)[inside], hu[inside], atol=0.05)
    for plane in ("axial", "coronal", "sagittal"):
        assert (encoded / pid / "snapshots" / f"{plane}.png").stat().st_size > 1000
    plus = sitk.GetArrayFromImage(sitk.ReadImage(str(encoded / pid / "traverse" / "z00_+2sd" / "dose.nrrd")))
    minus = sitk.GetArrayFromImage(sitk.ReadImage(str(encoded / pid / "traverse" / "z00_-2sd" / "dose.nrrd")))
    assert np.abs(plus - minus).max() > 1e-3
    assert (encoded / "traverse_std.csv").is_file()


def test_stitched_reconstruction_uses_the_decoder_of_each_tile(model_dir, cache_dir):
    """The streamed stitch equals a plain in-memory blend of the decoded tiles."""
    from DeepDosimetricsLib.deep.cache.store import open_cache
    from DeepDosimetricsLib.deep.model import load_model
    from DeepDosimetricsLib.deep.tiling import gaussian_weights

    cp = next(iter(open_cache(cache_dir)))
    model, config = load_model(model_dir)
    runner = TileModel(model)
    specs = parse_channels(config.channels)
    sink = ArraySink(cp.shape, len(specs))
    result = encode_patient(runner, cp, specs, batch=4, sink=sink, fill=(0.0, 0.0, 0.0))
    decoded = runner.decode(result.features)
    weights = gaussian_weights(config.tile)
    total = np.zeros((len(specs), *cp.shape), np.float64)
    norm = np.zeros(cp.shape, np.float64)
    for start, values in zip(result.positions, decoded):
        window = result.grid.window(start)
        crop = tuple(slice(0, w.stop - w.start) for w in window)
        total[(slice(None), *window)] += values[(slice(None), *crop)] * weights[crop]
        norm[window] += weights[crop]
    expected = np.where(norm > 0, total / np.maximum(norm, 1e-30), 0.0)
    np.testing.assert_allclose(sink.array, expected, atol=1e-5)


def test_resume_skips_finished_patients(two_patients, model_dir, cache_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    settings = EncodeSettings(quiet=True, progress_json=False)
    calls = []
    original = job._encode_one

    def interrupted(runner, cp, *args, **kwargs):
        calls.append(cp.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(runner, cp, *args, **kwargs)

    monkeypatch.setattr(job, "_encode_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_cohort(model_dir, two_patients, out, cache_dir, settings)
    first, second = calls
    assert (out / first / "done.json").is_file() and not (out / second).exists()
    stamp = (out / first / "features.csv").stat().st_mtime_ns
    with pytest.raises(InputError, match="--resume"):
        encode_cohort(model_dir, two_patients, out, cache_dir, settings)
    calls.clear()
    result = encode_cohort(model_dir, two_patients, out, cache_dir, settings, resume=True)
    assert calls == [second] and result.reused == [first]
    assert (out / first / "features.csv").stat().st_mtime_ns == stamp
    assert set(pd.read_csv(out / "features.csv")["patient"]) == {first, second}
    assert not list(out.glob(".partial-*"))
    # other settings: resuming would mix outputs, so it is refused
    with pytest.raises(InputError, match="overlap"):
        encode_cohort(model_dir, two_patients, out, cache_dir, EncodeSettings(overlap=0.5, quiet=True), resume=True)


def test_refusals(two_patients, cache_dir, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    model = make_model(tmp_path / "model")
    with pytest.raises(InputError, match="other files"):
        encode_cohort(model, two_patients, foreign, cache_dir, EncodeSettings(quiet=True), overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    heart = make_model(tmp_path / "parotid", channels=["window:soft_tissue", "mask:Parotid_L"])
    code = cli_main(["encode", "--model", str(heart), "--cohort", str(two_patients), "--cache", str(cache_dir),
                     "--out", str(tmp_path / "out"), "--quiet"])
    message = capsys.readouterr().err
    assert code == 2 and "mask:Parotid_L" in message and "no patient" in message
    code = cli_main(["encode", "--model", str(model), "--cohort", str(two_patients), "--out", str(tmp_path / "o2"),
                     "--snapshots", "--quiet"])
    assert code == 2 and "--reconstruct" in capsys.readouterr().err


def test_patient_without_dose_is_skipped_with_its_reason(two_patients, model_dir, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    shutil.copytree(two_patients, cohort)
    no_dose = sorted(p.name for p in cohort.iterdir() if p.is_dir())[1]
    (cohort / no_dose / "dose.nrrd").unlink()
    out = tmp_path / "out"
    code = cli_main(["encode", "--model", str(model_dir), "--cohort", str(cohort), "--cache", str(tmp_path / "cache"),
                     "--out", str(out), "--quiet"])
    last = capsys.readouterr().out.strip().splitlines()[-2:]  # the left-out patients close the output
    assert code == 1 and last[0].startswith("left out 1 patient(s)")
    assert last[1].startswith(f"  {no_dose}: ") and "no dose" in last[1]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["left_out_patients"]) == [no_dose] and no_dose not in summary["patients_encoded"]
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped["patient"]) == [no_dose]
    assert no_dose not in set(pd.read_csv(out / "features.csv")["patient"])
    assert json.loads((out / "encode.json").read_text())["skipped"][no_dose].startswith("patient")


@pytest.mark.slicer
def test_scene_bundle(encoded, two_patients, tmp_path):
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    from DeepDosimetricsLib.mrml.snapshots import write_patient_scene

    pid = sorted(pd.read_csv(encoded / "features.csv")["patient"].unique())[0]
    path = write_patient_scene(two_patients, pid, encoded / pid / "recon", tmp_path / "scene.mrb",
                               parse_channels(CHANNELS), snapshot_dir=tmp_path / "snapshots")
    assert path.stat().st_size > 10_000
    for view in ("axial", "coronal", "sagittal"):
        assert (tmp_path / "snapshots" / f"mrml_{view}.png").stat().st_size > 500


def test_cli_parses_negative_traversal_shifts():
    from DeepDosimetricsLib.cli import build_parser

    parser = build_parser()
    base = ["encode", "--model", "m", "--cohort", "c", "--out", "o"]
    for extra, expected in [(["--sigmas", "-2", "2"], (-2.0, 2.0)), (["--sigmas=-2,2"], (-2.0, 2.0)),
                            (["--sigmas", "-1.5", "0", "1.5"], (-1.5, 0.0, 1.5)), ([], (-2.0, 2.0))]:
        args = parser.parse_args(base + extra)
        assert tuple(v for group in args.sigmas for v in group) == expected
