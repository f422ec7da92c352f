"""The phantom cohort: layout, determinism, anatomy (HU, masks, body share), dose and clinical data."""

from __future__ import annotations

import csv
import filecmp
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from DeepDosimetricsLib.cli import main
from DeepDosimetricsLib.data.phantoms import (
    OUTCOME_MODEL,
    PELVIS_STRUCTURES,
    THORAX_STRUCTURES,
    PhantomConfig,
    generate_patient,
    patient_variant,
    synthesize_cohort,
    synthesize_patient,
)
from DeepDosimetricsLib.runtime.errors import InputError
from scipy import ndimage

SHAPE = (48, 48, 32)
PATIENTS = 6


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Six patients (thoraxes, a one-legged and a two-legged pelvis) at 48x48x32, seed 0."""
    out = tmp_path_factory.mktemp("phantom") / "cohort"
    return synthesize_cohort(out, patients=PATIENTS, shape=SHAPE, seed=0, quiet=True)


def read(path: Path):
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def patient_folders(cohort: Path):
    return sorted(p for p in cohort.iterdir() if p.is_dir() and p.name.startswith("phantom_"))


def load(folder: Path):
    """(ct image, ct array, dose array, {name: mask array}, parameters) of one patient folder."""
    ct_image, ct = read(folder / "ct.nrrd")
    _, dose = read(folder / "dose.nrrd")
    masks = {p.stem: read(p)[1] for p in sorted((folder / "structures").glob("*.nrrd"))}
    return ct_image, ct, dose, masks, json.loads((folder / "phantom.json").read_text())


def test_layout_types_and_geometry(cohort):
    folders = patient_folders(cohort)
    assert [f.name for f in folders] == [f"phantom_{i:03d}" for i in range(PATIENTS)]
    assert not list(cohort.glob(".*")), "no temporary files are left behind"
    for folder in folders:
        ct_image, ct, dose, masks, parameters = load(folder)
        assert ct_image.GetSize() == SHAPE
        assert ct.dtype == np.int16 and ct.min() >= -1024 and ct.max() <= 3071
        assert dose.dtype == np.float32
        assert ct_image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        assert any(abs(v) > 1.0 for v in ct_image.GetOrigin()), "a realistic, non-zero origin"
        spacing = ct_image.GetSpacing()
        assert spacing == pytest.approx((400.0 / 48, 400.0 / 48, 320.0 / 32))
        for name in ("dose.nrrd",) + tuple(f"structures/{n}.nrrd" for n in masks):
            image = sitk.ReadImage(str(folder / name))
            assert image.GetOrigin() == ct_image.GetOrigin() and image.GetSpacing() == spacing
        expected = THORAX_STRUCTURES if parameters["variant"] == "thorax" else PELVIS_STRUCTURES
        assert set(masks) == set(expected) == set(parameters["structures"])
        assert parameters["geometry"]["origin"] == pytest.approx(list(ct_image.GetOrigin()))
        for key in ("variant", "legs", "ptv", "plan", "noise_hu", "dose_metrics", "anatomy_template"):
            assert key in parameters


def test_same_seed_gives_identical_files_whatever_the_cohort_size(cohort, tmp_path):
    again = synthesize_cohort(tmp_path / "again", patients=3, shape=SHAPE, seed=0)
    for index in range(3):
        name = f"phantom_{index:03d}"
        comparison = filecmp.dircmp(cohort / name, again / name)
        assert not comparison.left_only and not comparison.right_only
        files = ["ct.nrrd", "dose.nrrd", "phantom.json"] + [
            f"structures/{n}" for n in comparison.subdirs["structures"].common_files
        ]
        match, mismatch, errors = filecmp.cmpfiles(cohort / name, again / name, files, shallow=False)
        assert not mismatch and not errors, f"{name}: {mismatch} differ"
    rows = (cohort / "clinical.csv").read_text().splitlines()
    assert (again / "clinical.csv").read_text().splitlines() == rows[:4]


def test_different_seeds_differ():
    small = (32, 32, 16)
    a = generate_patient(0, PhantomConfig(shape=small, seed=0))
    b = generate_patient(0, PhantomConfig(shape=small, seed=1))
    assert not np.array_equal(a.ct, b.ct)
    assert not np.array_equal(a.structures["PTV"], b.structures["PTV"])
    assert a.parameters["ptv"]["center_mm"] != b.parameters["ptv"]["center_mm"]


def test_rerun_skips_done_patients_and_redoes_changed_ones(tmp_path):
    out = synthesize_cohort(tmp_path / "c", patients=1, shape=(32, 32, 16), seed=3)
    ct = out / "phantom_000" / "ct.nrrd"
    before = ct.stat().st_mtime_ns
    (out / ".phantom_000.tmp-999").mkdir()  # as left by an interrupted run
    synthesize_cohort(out, patients=1, shape=(32, 32, 16), seed=3)
    assert ct.stat().st_mtime_ns == before
    assert not (out / ".phantom_000.tmp-999").exists()
    synthesize_cohort(out, patients=1, shape=(32, 32, 16), seed=4)
    assert json.loads((out / "phantom_000" / "phantom.json").read_text())["generator"]["seed"] == 4
    synthesize_cohort(out, patients=2, shape=(32, 32, 16), seed=4)
    synthesize_cohort(out, patients=1, shape=(32, 32, 16), seed=4)
    assert not (out / "phantom_001").exists(), "a smaller rerun leaves exactly the requested patients"
    assert (out / "clinical.csv").read_text().count("phantom_") == 1


def test_body_fills_35_to_55_percent(cohort):
    for folder in patient_folders(cohort):
        body = read(folder / "structures" / "Body.nrrd")[1]
        assert 0.35 <= body.mean() <= 0.55, f"{folder.name}: body fraction {body.mean():.3f}"


@pytest.mark.parametrize("shape", [(64, 64, 40), (40, 56, 24)])
def test_body_share_at_other_shapes(shape):
    for index in (0, 2):  # a thorax and the one-legged pelvis (the smallest body)
        patient = generate_patient(index, PhantomConfig(shape=shape))
        fraction = patient.structures["Body"].mean()
        assert 0.35 <= fraction <= 0.55, f"patient {index} at {shape}: {fraction:.3f}"
        assert patient.ct.shape == shape[::-1]


def test_masks_binary_nonempty_and_inside_body(cohort):
    for folder in patient_folders(cohort):
        _, _, _, masks, _ = load(folder)
        body = masks["Body"].astype(bool)
        for name, mask in masks.items():
            assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}, f"{folder.name}/{name}"
            assert not (mask.astype(bool) & ~body).any(), f"{folder.name}/{name} leaves the body"


def test_hounsfield_units_per_tissue(cohort):
    for folder in patient_folders(cohort):
        _, ct, _, masks, parameters = load(folder)
        body = masks["Body"].astype(bool)
        assert ct[~body].mean() < -950, "air around the body"
        bones = ct[masks["Bones"].astype(bool)]
        assert 250 < bones.mean() < 1200 and np.percentile(bones, 99) > 600
        noise = ct[~body & (ct > -990)]  # noise around air, above the clip
        assert 5 < parameters["noise_hu"] <= 20 and noise.size > 0
        if parameters["variant"] == "thorax":
            for lung in ("Lung_L", "Lung_R"):
                assert -900 < np.median(ct[masks[lung].astype(bool)]) < -780, lung
            assert 20 < np.median(ct[masks["Heart"].astype(bool)]) < 80  # median: partial volume at 8 mm
            assert -20 < np.median(ct[masks["SpinalCord"].astype(bool)]) < 150
            assert 0 < np.median(ct[masks["Esophagus"].astype(bool)]) < 120
        else:
            assert -30 < np.median(ct[masks["Bladder"].astype(bool)]) < 50
            for femur in ("Femur_L", "Femur_R"):
                assert ct[masks[femur].astype(bool)].mean() > 300


def test_dose_prescription_and_falloff(cohort):
    for folder in patient_folders(cohort):
        ct_image, _, dose, masks, parameters = load(folder)
        rx = parameters["plan"]["prescription_gy"]
        assert rx == (60.0 if parameters["variant"] == "thorax" else 70.0)
        assert 5 <= len(parameters["plan"]["beam_angles_deg"]) <= 7
        ptv = masks["PTV"].astype(bool)
        assert dose[ptv].mean() == pytest.approx(rx, rel=0.01)
        assert np.percentile(dose[ptv], 5) > 0.85 * rx, "D95"
        assert dose.max() < 1.2 * rx
        assert (dose[~masks["Body"].astype(bool)] == 0).all()
        distance = ndimage.distance_transform_edt(~ptv, sampling=ct_image.GetSpacing()[::-1])
        far = (distance > 30.0) & masks["Body"].astype(bool)
        assert dose[far].mean() < 0.35 * rx, "dose falls off away from the PTV"
        assert parameters["dose_metrics"]["PTV"]["mean_gy"] == pytest.approx(rx, rel=0.01)


def test_ptv_centre_in_world_coordinates_lies_in_the_ptv(cohort):
    for folder in patient_folders(cohort):
        image = sitk.ReadImage(str(folder / "structures" / "PTV.nrrd"))
        parameters = json.loads((folder / "phantom.json").read_text())
        index = image.TransformPhysicalPointToIndex(parameters["ptv"]["center_mm"])
        assert image[index] == 1, folder.name


def test_pelvis_variants_with_one_and_two_legs(cohort):
    legs_found = {}
    for folder in patient_folders(cohort):
        _, _, _, masks, parameters = load(folder)
        if parameters["variant"] != "pelvis":
            continue
        body = masks["Body"]
        components = ndimage.label(body[0])[1]  # the lowest slice cuts through the thighs
        assert components == parameters["legs"], folder.name
        middle = ndimage.label(body[body.shape[0] // 2])[1]
        assert middle == 1, "one trunk above the legs"
        legs_found[parameters["legs"]] = folder.name
    assert set(legs_found) == {1, 2}
    assert patient_variant(2) == ("pelvis", 1) and patient_variant(5) == ("pelvis", 2)


def test_clinical_csv_and_outcome_model(cohort):
    with open(cohort / "clinical.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["patient", "age", "sex", "smoking", "ecog", "site", "outcome"]
    assert [r["patient"] for r in rows] == [f"phantom_{i:03d}" for i in range(PATIENTS)]
    description = json.loads((cohort / "cohort.json").read_text())
    model = description["outcome_model"]
    assert model["reference_dose_gy"] == {"Heart": 3.0, "Rectum": 20.0} and "formula" in model
    for row in rows:
        assert row["outcome"] in ("0", "1") and row["sex"] in ("M", "F") and 0 <= int(row["ecog"]) <= 2
        parameters = json.loads((cohort / row["patient"] / "phantom.json").read_text())
        truth = parameters["outcome_model"]
        assert int(row["outcome"]) == truth["outcome"]
        assert truth["organ"] == ("Heart" if parameters["variant"] == "thorax" else "Rectum")
        logit = OUTCOME_MODEL.logit(truth["organ"], truth["organ_mean_dose_gy"], truth["ptv_volume_cc"])
        assert truth["probability"] == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-3)
        assert truth["organ_mean_dose_gy"] == pytest.approx(
            parameters["dose_metrics"][truth["organ"]]["mean_gy"]
        )


def test_cli_synth_and_bad_input(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(
            [
                "synth",
                "--out",
                str(out),
                "--patients",
                "1",
                "--shape",
                "32",
                "32",
                "16",
                "--seed",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    parameters = json.loads((out / "phantom_000" / "phantom.json").read_text())
    assert parameters["generator"]["seed"] == 2 and parameters["geometry"]["size"] == [32, 32, 16]
    assert (out / "clinical.csv").is_file() and (out / "cohort.json").is_file()
    assert main(["synth", "--out", str(tmp_path / "x"), "--shape", "8", "8", "8", "--quiet"]) == 2
    assert "phantom shape" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "y"), "--spacing", "1", "0", "1", "--quiet"]) == 2
    (tmp_path / "file").write_text("x")
    assert main(["synth", "--out", str(tmp_path / "file"), "--quiet"]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_explicit_spacing_and_single_patient_api(tmp_path):
    config = PhantomConfig(shape=(40, 40, 20), spacing=(9.0, 9.0, 12.0), seed=1)
    folder = synthesize_patient(tmp_path, 4, config)
    assert folder.name == "phantom_004"
    image = sitk.ReadImage(str(folder / "ct.nrrd"))
    assert image.GetSpacing() == (9.0, 9.0, 12.0) and image.GetSize() == (40, 40, 20)
    with pytest.raises(InputError):
        PhantomConfig(seed=-1)


def test_patient_loader_reads_the_phantom(cohort):
    patient_module = pytest.importorskip("DeepDosimetricsLib.data.patient", reason="patient.py is not there yet")
    patient = patient_module.Patient.from_folder(cohort / "phantom_000")
    assert "PTV" in patient.structure_names and patient.has_dose
    np.testing.assert_array_equal(patient.ct_array(), read(cohort / "phantom_000" / "ct.nrrd")[1])
    np.testing.assert_array_equal(
        patient.structure("PTV"), read(cohort / "phantom_000" / "structures" / "PTV.nrrd")[1]
    )
    cohort_module = pytest.importorskip("DeepDosimetricsLib.data.cohort", reason="cohort.py is not there yet")
    opened = cohort_module.Cohort.open(cohort)
    assert list(opened.ids) == [f"phantom_{i:03d}" for i in range(PATIENTS)]
    assert (
        opened.clinical is not None
        and list(opened.clinical["outcome"].astype(int).isin([0, 1])) == [True] * PATIENTS
    )
