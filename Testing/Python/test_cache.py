"""The preprocessing cache: round trips against the original files, crop, resume, errors, original grid."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from DeepDosimetricsLib.data.patient import Patient
from DeepDosimetricsLib.deep.cache.build import ensure_cache
from DeepDosimetricsLib.deep.cache.store import CacheConfig, default_cache_dir, open_cache
from DeepDosimetricsLib.deep.channels import AIR_HU, compute_channels, parse_channels
from DeepDosimetricsLib.runtime.errors import InputError

SPACING = (1.2, 1.0, 2.5)
ORIGIN = (-20.0, 10.0, 5.0)
SIZE = (56, 44, 28)  # x, y, z


def write_patient(folder: Path, seed: int, with_dose: bool = True) -> None:
    """A small CT-like patient: an elliptic body in air, a PTV_70 sphere, a heart ('cuore'), dose."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in SIZE[::-1]), indexing="ij")
    cx, cy = 26 + seed, 21
    body = ((x - cx) / 12) ** 2 + ((y - cy) / 9) ** 2 <= 1
    body &= (z >= 6) & (z <= 20)
    hu = np.where(body, 40 + rng.normal(0, 30, body.shape), -1000).astype(np.int16)
    hu[body & ((x - cx) ** 2 + (y - cy + 4) ** 2 <= 4)] = 900  # a bone
    ptv = ((x - cx - 3) ** 2 + (y - cy) ** 2 + ((z - 13) * 2) ** 2 <= 25).astype(np.uint8)
    heart = ((x - cx + 5) ** 2 + (y - cy - 2) ** 2 + ((z - 12) * 2) ** 2 <= 16).astype(np.uint8)
    dose = (70 * np.exp(-((x - cx - 3) ** 2 + (y - cy) ** 2 + ((z - 13) * 2) ** 2) / 60)).astype(np.float32)

    def image(array):
        result = sitk.GetImageFromArray(array)
        result.SetSpacing(SPACING)
        result.SetOrigin(ORIGIN)
        return result

    (folder / "structures").mkdir(parents=True)
    sitk.WriteImage(image(hu), str(folder / "ct.nrrd"))
    sitk.WriteImage(image(ptv), str(folder / "structures" / "PTV_70.nrrd"))
    sitk.WriteImage(image(heart), str(folder / "structures" / "cuore.nrrd"))
    if with_dose:
        sitk.WriteImage(image(dose), str(folder / "dose.nrrd"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Three patients, the last without dose."""
    root = tmp_path_factory.mktemp("cache_cohort") / "cohort"
    for index in range(3):
        write_patient(root / f"pt_{index + 1}", seed=index, with_dose=index < 2)
    return root


@pytest.fixture(scope="module")
def kept(cohort, tmp_path_factory):
    return ensure_cache(cohort, CacheConfig(), cache_dir=tmp_path_factory.mktemp("kept"))


RESAMPLED_SPACING = (1.7, 1.3, 2.1)


@pytest.fixture(scope="module")
def resampled(cohort, tmp_path_factory):
    return ensure_cache(cohort, CacheConfig(spacing=RESAMPLED_SPACING, margin_mm=4),
                        cache_dir=tmp_path_factory.mktemp("resampled"), jobs=2)


def expected_grid(image: sitk.Image, spacing) -> sitk.Image:
    """A reference image covering the extent of ``image`` with another spacing (computed here, independently)."""
    old, new = np.array(image.GetSpacing()), np.array(spacing)
    size = [int(v) for v in np.round(np.array(image.GetSize()) * old / new)]
    reference = sitk.Image(size, sitk.sitkUInt8)
    reference.SetSpacing(tuple(new))
    reference.SetOrigin(tuple(np.array(image.GetOrigin()) - old / 2 + new / 2))
    return reference


def padded_region(array: np.ndarray, start_zyx, size_zyx, fill) -> np.ndarray:
    """``array[start:start+size]`` with ``fill`` where the region leaves the array."""
    pad = max(max(size_zyx), max(abs(s) for s in start_zyx)) + 1
    padded = np.pad(array, pad, constant_values=fill)
    region = tuple(slice(s + pad, s + pad + n) for s, n in zip(start_zyx, size_zyx))
    return padded[region]


def original_volumes(patient: Patient, spacing=None) -> dict:
    """HU, masks and dose of a patient from its files, resampled with SimpleITK onto the full grid."""
    ct = patient.ct_image()
    images = {"hu": ct, "PTV": patient.structure_image("PTV_70"), "Heart": patient.structure_image("cuore")}
    if patient.has_dose:
        images["dose"] = patient.dose_image()
    if spacing is None:
        return {name: sitk.GetArrayFromImage(image) for name, image in images.items()}
    reference = expected_grid(ct, spacing)
    volumes = {}
    for name, image in images.items():
        linear = name in ("hu", "dose")
        default = AIR_HU if name == "hu" else 0
        pixel = sitk.sitkFloat32 if linear else image.GetPixelID()
        out = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear if linear else sitk.sitkNearestNeighbor,
                            default, pixel)
        volumes[name] = sitk.GetArrayFromImage(out)
        if name == "hu":
            volumes[name] = np.rint(volumes[name]).astype(np.int16)
    return volumes


def region_of(cached):
    """The crop of a cached patient as slices of its original (z, y, x) array (keep-spacing caches)."""
    return tuple(slice(s, s + n) for s, n in zip(cached.manifest["crop"]["start"][::-1], cached.shape))


TILES = [((0, 0, 0), (8, 8, 8)), ((-3, 5, -4), (10, 12, 9)), ((5, 10, 20), (16, 16, 16))]


@pytest.mark.parametrize("which", ["kept", "resampled"])
def test_tile_equals_region_computed_from_the_original_files(which, cohort, request):
    cache = request.getfixturevalue(which)
    spacing = None if which == "kept" else RESAMPLED_SPACING
    specs = parse_channels("window:lung,window:soft_tissue,window:bone,window:brain,window:full,mask:PTV,mask:Heart,dose")
    assert cache.ids == ["pt_1", "pt_2", "pt_3"]
    for pid in ("pt_1", "pt_2"):
        cached = cache[pid]
        volumes = original_volumes(Patient.from_folder(cohort / pid), spacing)
        assert cached.manifest["resampled_geometry"]["size"] == list(volumes["hu"].shape[::-1])
        crop = tuple(slice(s, s + n) for s, n in zip(cached.manifest["crop"]["start"][::-1], cached.shape))
        volumes = {name: volume[crop] for name, volume in volumes.items()}  # outside the crop reads as air
        for start, size in TILES:
            tile = cached.read_tile(specs, start, size)
            assert tile.shape == (len(specs), *size) and tile.dtype == np.float32
            hu = padded_region(volumes["hu"], start, size, AIR_HU)
            masks = {name: padded_region(volumes[name], start, size, 0) for name in ("PTV", "Heart")}
            dose = padded_region(volumes["dose"], start, size, 0)
            expected = compute_channels(specs, hu, masks, dose)
            windows = slice(0, 5)
            if spacing is None:
                np.testing.assert_array_equal(tile[:7], expected[:7])
            else:  # one HU of rounding, a rare tie of nearest neighbour
                np.testing.assert_allclose(tile[windows], expected[windows], atol=1.01 / 80)  # 1 HU of brain window
                assert np.mean(tile[windows] != expected[windows]) < 1e-3
                assert np.mean(tile[5:7] != expected[5:7]) < 1e-3
            np.testing.assert_allclose(tile[7], expected[7], atol=2e-3)  # float16 dose over 80 Gy


def test_cached_arrays_are_compact_memmaps(kept, cohort):
    cached = kept["pt_1"]
    assert isinstance(cached.hu, np.memmap) and cached.hu.dtype == np.int16
    assert cached.body.dtype == np.uint8 and cached.mask("PTV").dtype == np.uint8
    assert cached.dose.dtype == np.float16
    assert cached.hu.shape == cached.body.shape == cached.dose.shape == cached.shape
    assert cached.structure_names == ["PTV", "Heart"]  # the target as PTV, 'cuore' normalised
    assert cached.original_structure_name("PTV") == "PTV_70"
    assert cached.original_structure_name("Heart") == "cuore"
    assert np.array_equal(cached.mask("cuore"), cached.mask("Heart"))
    assert cached.prescription_gy == 70.0
    manifest = cached.manifest
    assert manifest["target"] == "PTV_70" and manifest["has_dose"] and manifest["format_version"] == 1
    assert manifest["original_geometry"]["spacing"] == list(SPACING)


def test_cached_patient_pickles_without_its_arrays(kept):
    import pickle

    cached = kept["pt_1"]
    assert cached.hu.sum() != 0  # opens the memory map
    payload = pickle.dumps(cached)
    assert len(payload) < 20_000
    copy = pickle.loads(payload)
    np.testing.assert_array_equal(copy.read_tile("default", (2, 3, 4), (5, 6, 7)),
                                  cached.read_tile("default", (2, 3, 4), (5, 6, 7)))


def test_crop_holds_the_body_plus_margin(kept, cohort):
    for cached in kept:
        ct = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / cached.id / "ct.nrrd")))
        body = ct > -500
        start = cached.manifest["crop"]["start"][::-1]
        inside = np.zeros_like(body)
        inside[tuple(slice(s, s + n) for s, n in zip(start, cached.shape))] = True
        assert not np.any(body & ~inside), "the crop cuts the body"
        assert body.sum() == cached.body.sum()
        margins = np.ceil(10.0 / np.array(SPACING[::-1])).astype(int)
        lo = np.array([np.flatnonzero(body.any(axis=a))[0] for a in ((1, 2), (0, 2), (0, 1))])
        hi = np.array([np.flatnonzero(body.any(axis=a))[-1] for a in ((1, 2), (0, 2), (0, 1))])
        assert np.all(np.array(start) == np.maximum(lo - margins, 0))
        assert np.all(np.array(start) + cached.shape - 1 == np.minimum(hi + margins, np.array(ct.shape) - 1))
        assert all(a < b for a, b in zip(cached.shape, ct.shape))


def test_tile_outside_the_volume_is_air(kept):
    cached = kept["pt_1"]
    tile = cached.read_tile("window:soft_tissue,window:full,mask:PTV,dose", (-50, -50, -50), (6, 6, 6))
    np.testing.assert_array_equal(tile, 0.0)


def test_missing_dose_and_structure_errors(kept):
    patient = kept["pt_3"]
    assert not patient.has_dose and patient.dose is None
    with pytest.raises(InputError, match="patient pt_3 has no dose; channel 'dose' needs it"):
        patient.check_channels("default")
    with pytest.raises(InputError, match="patient pt_3 has no dose"):
        patient.read_tile("full", (0, 0, 0), (4, 4, 4))
    with pytest.raises(InputError, match="patient pt_3 has no dose"):
        kept.check_channels("default")
    assert patient.read_tile("window:lung,mask:PTV", (0, 0, 0), (4, 4, 4)).shape == (2, 4, 4, 4)
    with pytest.raises(InputError, match="patient pt_1 has no structure Lung_L; channel 'mask:Lung_L'"):
        kept["pt_1"].check_channels("mask:Lung_L")


def test_to_original_grid_round_trip(kept, resampled, cohort):
    for cache in (kept, resampled):
        cached = cache["pt_1"]
        patient = Patient.from_folder(cohort / "pt_1")
        hu = cached.to_original_grid(cached.hu, "linear", fill=AIR_HU)
        assert hu.GetSize() == patient.ct_image().GetSize()
        assert np.allclose(hu.GetOrigin(), patient.ct_image().GetOrigin())
        ptv = sitk.GetArrayFromImage(cached.to_original_grid(cached.mask("PTV"), "nearest"))
        assert ptv.dtype == np.uint8
        original_ptv = patient.structure("PTV_70")
        dice = 2 * np.sum(ptv & original_ptv) / (ptv.sum() + original_ptv.sum())
        back_hu = sitk.GetArrayFromImage(hu)
        if cache is kept:
            assert dice == 1.0
            crop = tuple(slice(s, s + n) for s, n in zip(cached.manifest["crop"]["start"][::-1], cached.shape))
            outside = np.ones(back_hu.shape, bool)
            outside[crop] = False
            np.testing.assert_array_equal(back_hu[crop], patient.ct_array()[crop])
            assert np.all(back_hu[outside] == AIR_HU)
        else:
            assert dice > 0.85
            body = patient.ct_array() > -500
            assert np.median(np.abs(back_hu[body] - patient.ct_array()[body])) < 40
    with pytest.raises(InputError, match="does not match the cache grid"):
        kept["pt_1"].to_original_grid(np.zeros((2, 2, 2)))


def test_rotated_patient(tmp_path):
    """A CT whose index axes are rotated in LPS: crop and resampling follow the direction cosines."""
    cohort = tmp_path / "cohort"
    write_patient(cohort / "pt_r", seed=0)
    direction = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    for path in (cohort / "pt_r").rglob("*.nrrd"):
        image = sitk.ReadImage(str(path))
        image.SetDirection(direction)
        sitk.WriteImage(image, str(path))
    patient = Patient.from_folder(cohort / "pt_r")
    kept = ensure_cache(cohort, CacheConfig(), cache_dir=tmp_path / "kept")["pt_r"]
    np.testing.assert_array_equal(kept.hu, patient.ct_array()[region_of(kept)])
    assert kept.geometry.direction == direction
    moved = ensure_cache(cohort, CacheConfig(spacing=(0.9, 1.4, 2.0)), cache_dir=tmp_path / "moved")["pt_r"]
    assert moved.geometry.direction == direction
    back = sitk.GetArrayFromImage(moved.to_original_grid(moved.hu, "linear", fill=AIR_HU))
    body = patient.ct_array() > -500
    assert body.sum() == pytest.approx(np.sum(back > -500), rel=0.05)
    assert np.median(np.abs(back[body].astype(int) - patient.ct_array()[body])) < 40
    ptv = sitk.GetArrayFromImage(moved.to_original_grid(moved.mask("PTV"), "nearest"))
    original = patient.structure("PTV_70")
    assert 2 * np.sum(ptv & original) / (ptv.sum() + original.sum()) > 0.85


def test_resume_skips_finished_patients(cohort, tmp_path):
    folder = tmp_path / "cache"
    ensure_cache(cohort, CacheConfig(), cache_dir=folder)
    stamps = {pid: (folder / pid / "manifest.json").stat().st_mtime_ns for pid in ("pt_1", "pt_2", "pt_3")}
    (folder / "pt_2" / "manifest.json").unlink()  # as if interrupted before its manifest
    (folder / ".tmp-pt_3-12345").mkdir()          # a stale temporary folder
    cache = ensure_cache(cohort, CacheConfig(), cache_dir=folder)
    assert cache.ids == ["pt_1", "pt_2", "pt_3"]
    assert (folder / "pt_1" / "manifest.json").stat().st_mtime_ns == stamps["pt_1"]
    assert (folder / "pt_3" / "manifest.json").stat().st_mtime_ns == stamps["pt_3"]
    assert (folder / "pt_2" / "manifest.json").is_file()
    # another configuration in the same folder rebuilds the patients
    cache = ensure_cache(cohort, CacheConfig(margin_mm=2), cache_dir=folder)
    assert cache.config.margin_mm == 2 and cache["pt_1"].manifest["crop"]["margin_mm"] == 2
    assert open_cache(folder).ids == cache.ids
    # a run limited to some patients keeps the others in the cohort manifest
    assert ensure_cache(cohort, CacheConfig(margin_mm=2), cache_dir=folder, ids=["pt_2"]).ids == ["pt_1", "pt_2", "pt_3"]


def test_default_folder_is_outside_the_cohort(cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPDOSIMETRICS_CACHE", str(tmp_path / "caches"))
    config = CacheConfig(structures=("Heart",), target="PTV_70")
    before = sorted(str(p) for p in cohort.rglob("*"))
    cache = ensure_cache(cohort, config, ids=["pt_1"])
    assert cache.folder == default_cache_dir(cohort, config)
    assert cache.folder.parent == tmp_path / "caches"
    assert sorted(str(p) for p in cohort.rglob("*")) == before
    assert default_cache_dir(cohort, CacheConfig()) != cache.folder
    assert cache.ids == ["pt_1"] and cache["pt_1"].structure_names == ["PTV", "Heart"]


def test_structure_selection_and_target_choice(cohort, tmp_path):
    cache = ensure_cache(cohort, CacheConfig(structures=(), target="cuore"), cache_dir=tmp_path / "c", ids=["pt_1"])
    cached = cache["pt_1"]
    assert cached.structure_names == ["PTV"] and cached.manifest["target"] == "cuore"
    assert cached.prescription_gy is None
    with pytest.raises(InputError, match="no known prescription"):
        cached.check_channels("dose:prescription")
    bad = ensure_cache(cohort, CacheConfig(target="Liver"), cache_dir=tmp_path / "d", ids=["pt_1"])
    assert bad.ids == [] and "patient pt_1: no structure matches the target 'Liver'" in bad.failed["pt_1"]


def test_empty_structure_is_left_out(tmp_path):
    cohort = tmp_path / "cohort"
    write_patient(cohort / "pt_e", seed=1)
    empty = sitk.ReadImage(str(cohort / "pt_e" / "structures" / "cuore.nrrd")) * 0
    sitk.WriteImage(empty, str(cohort / "pt_e" / "structures" / "Liver.nrrd"))
    cached = ensure_cache(cohort, CacheConfig(), cache_dir=tmp_path / "cache")["pt_e"]
    assert cached.structure_names == ["PTV", "Heart"]
    assert "empty" in cached.manifest["skipped_structures"]["Liver"]


def test_prescription_from_the_clinical_table(cohort, tmp_path):
    copy = tmp_path / "cohort"
    copy.mkdir()
    for pid in ("pt_1", "pt_2"):
        os.symlink(cohort / pid, copy / pid)
    (copy / "clinical.csv").write_text("patient,prescription_gy\npt_1,66\npt_2,\n")
    cache = ensure_cache(copy, CacheConfig(), cache_dir=tmp_path / "cache")
    assert cache["pt_1"].prescription_gy == 66 and cache["pt_1"].manifest["prescription_source"] == "clinical.csv"
    assert cache["pt_2"].prescription_gy == 70 and cache["pt_2"].manifest["prescription_source"] == "target name PTV_70"
    values = cache["pt_1"].read_tile("dose:prescription", (0, 0, 0), cache["pt_1"].shape)[0]
    np.testing.assert_allclose(values.max(), min(1.0, float(cache["pt_1"].dose.max()) / 66), rtol=1e-3)


def test_cli_reports_failed_patients(cohort, tmp_path, capsys):
    from DeepDosimetricsLib.cli import main

    broken = tmp_path / "cohort"
    broken.mkdir()
    for pid in ("pt_1", "pt_3"):
        os.symlink(cohort / pid, broken / pid)
    (broken / "pt_9").mkdir()
    (broken / "pt_9" / "ct.nrrd").write_text("not an image")
    code = main(["cache", "--cohort", str(broken), "--cache", str(tmp_path / "cache"), "--quiet",
                 "--spacing", "2", "2", "3", "--margin", "5"])
    output = capsys.readouterr().out
    assert code == 1
    assert "patients cached: 2; failed: 1" in output and "pt_9" in output
    assert output.count("@progress ") == 3 and '"failed": true' in output
    manifest = json.loads((tmp_path / "cache" / "cohort.json").read_text())
    assert manifest["patients"] == ["pt_1", "pt_3"] and "pt_9" in manifest["failed"]
    assert manifest["config"]["spacing"] == [2.0, 2.0, 3.0]
    assert main(["cache", "--cohort", str(tmp_path / "nowhere"), "--quiet"]) == 2


def test_phantom_cohort_round_trip(phantom_cohort, tmp_path):
    cache = ensure_cache(phantom_cohort, CacheConfig(), cache_dir=tmp_path / "phantom")
    assert len(cache) >= 1 and not cache.failed
    for cached in cache:
        patient = Patient.from_folder(phantom_cohort / cached.id)
        plan = json.loads((phantom_cohort / cached.id / "phantom.json").read_text())["plan"]
        assert cached.prescription_gy == plan["prescription_gy"]
        assert np.array_equal(cached.body, patient.body()[region_of(cached)])
        region = region_of(cached)
        np.testing.assert_array_equal(cached.hu, patient.ct_array()[region])
        if patient.has_dose:
            np.testing.assert_allclose(cached.dose, patient.dose()[region], atol=0.05, rtol=1e-3)
        assert cached.has_structure("PTV")
        specs = parse_channels("full") if cached.has_dose else parse_channels("window:lung,mask:PTV")
        assert cached.read_tile(specs, (0, 0, 0), (16, 16, 16)).shape == (len(specs), 16, 16, 16)


def test_openkbp_patients(openkbp_train, tmp_path):
    cohort = tmp_path / "kbp"
    cohort.mkdir()
    for pid in ("pt_1", "pt_38"):
        if not (openkbp_train / pid).is_dir():
            pytest.skip(f"{openkbp_train / pid} is absent")
        os.symlink(openkbp_train / pid, cohort / pid)
    cache = ensure_cache(cohort, CacheConfig(), cache_dir=tmp_path / "cache")
    assert cache.ids == ["pt_1", "pt_38"]
    first = cache["pt_1"]
    assert first.manifest["target"] == "PTV70" and first.prescription_gy == 70.0
    assert {"PTV", "PTV63", "PTV56", "Brainstem", "SpinalCord"} <= set(first.structure_names)
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(openkbp_train / "pt_1" / "ct.nrrd")))
    start = first.manifest["crop"]["start"][::-1]
    np.testing.assert_array_equal(first.hu, ct[tuple(slice(s, s + n) for s, n in zip(start, first.shape))])
    tile = first.read_tile("full", (0, 0, 0), (32, 32, 32))
    assert tile.shape == (7, 32, 32, 32) and 0 <= tile.min() and tile.max() <= 1
    assert tile[6].max() > 0.5  # dose near 70 Gy of 80
    missing = cache["pt_38"]
    with pytest.raises(InputError, match="patient pt_38 has no dose; channel 'dose' needs it"):
        missing.check_channels("full")
    assert missing.read_tile("window:lung,mask:PTV", (0, 0, 0), (8, 8, 8)).shape == (2, 8, 8, 8)
