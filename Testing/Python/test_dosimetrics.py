"""Dose-volume metrics: hand-computed values on known doses, patients, cohorts, the `dvh` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from DeepDosimetricsLib.cli import main
from DeepDosimetricsLib.data.patient import Patient
from DeepDosimetricsLib.features.dosimetrics import (
    cohort_dvh,
    cumulative_dvh,
    dose_to_hottest,
    dose_volume_metrics,
    metric_names,
    patient_dvh,
)
from DeepDosimetricsLib.features.tables import EMPTY_STRUCTURE, NO_DOSE, StructureSkipped
from DeepDosimetricsLib.runtime.errors import InputError


def slab_gradient(slices: int = 100, rows: int = 4, cols: int = 5) -> np.ndarray:
    """Dose rising linearly along z: slice k receives k + 0.5 Gy (0..slices Gy over the volume)."""
    dose = np.empty((slices, rows, cols), dtype=np.float32)
    dose[:] = (np.arange(slices, dtype=np.float32) + 0.5)[:, None, None]
    return dose


def test_uniform_dose_gives_that_dose_everywhere():
    dose = np.full((10, 12, 14), 42.0, dtype=np.float32)
    mask = np.zeros(dose.shape, dtype=np.uint8)
    mask[2:8, 3:9, 4:10] = 1  # 216 voxels
    metrics = dose_volume_metrics(dose, mask, voxel_volume_cc=0.027)
    assert list(metrics) == metric_names()
    assert metrics["volume_cc"] == pytest.approx(216 * 0.027)
    for name in ("Dmean_Gy", "Dmin_Gy", "Dmax_Gy", "D98_Gy", "D95_Gy", "D50_Gy", "D2_Gy"):
        assert metrics[name] == pytest.approx(42.0)
    for level in range(5, 75, 5):
        assert metrics[f"V{level}Gy_pct"] == (100.0 if level <= 42 else 0.0)


def test_linear_gradient_matches_hand_computed_and_analytic_values():
    """100 slices of 20 voxels, slice k at k + 0.5 Gy: the continuous dose runs linearly from 0 to 100 Gy."""
    dose = slab_gradient()
    mask = np.ones(dose.shape, dtype=np.uint8)
    metrics = dose_volume_metrics(dose, mask, voxel_volume_cc=0.5)
    assert metrics["volume_cc"] == pytest.approx(2000 * 0.5)
    # analytic: mean 50 Gy; V_x = (100 - x) % (slices above x Gy have centres at >= x + 0.5)
    assert metrics["Dmean_Gy"] == pytest.approx(50.0)
    assert metrics["Dmin_Gy"] == 0.5 and metrics["Dmax_Gy"] == 99.5
    for level in range(5, 75, 5):
        assert metrics[f"V{level}Gy_pct"] == pytest.approx(100.0 - level)
    # D_x: the hottest x% is x slices; its coldest slice is number 100 - x, at 100 - x + 0.5 Gy
    hand = {98: 2.5, 95: 5.5, 50: 50.5, 2: 98.5}
    for level, value in hand.items():
        assert metrics[f"D{level}_Gy"] == pytest.approx(value)
        # within one voxel's dose step (1 Gy) of the analytic continuous value 100 - x
        assert abs(metrics[f"D{level}_Gy"] - (100 - level)) <= 1.0


def test_gradient_along_x_inside_a_sub_region():
    """Dose = 2 Gy per column along x; the mask keeps columns 10..29 (doses 20..58 Gy), 3 x 4 voxels each."""
    dose = np.zeros((3, 4, 40), dtype=np.float32)
    dose[:] = 2.0 * np.arange(40, dtype=np.float32)
    mask = np.zeros(dose.shape, dtype=np.uint8)
    mask[:, :, 10:30] = 1
    metrics = dose_volume_metrics(dose, mask, voxel_volume_cc=1.0)
    assert metrics["volume_cc"] == 240
    assert metrics["Dmean_Gy"] == pytest.approx(39.0)
    assert (metrics["Dmin_Gy"], metrics["Dmax_Gy"]) == (20.0, 58.0)
    assert metrics["V20Gy_pct"] == 100.0
    assert metrics["V40Gy_pct"] == pytest.approx(50.0)  # columns 20..29
    assert metrics["V45Gy_pct"] == pytest.approx(35.0)  # 46..58 Gy: 7 columns of 20
    assert metrics["V60Gy_pct"] == 0.0
    assert metrics["D50_Gy"] == 40.0  # hottest 10 columns: 40..58 Gy
    assert metrics["D95_Gy"] == 22.0  # ceil(0.95 * 20) = 19 hottest columns: down to column 11
    assert metrics["D2_Gy"] == 58.0


def test_dose_to_hottest_rounding_and_bounds():
    ascending = np.arange(1, 101, dtype=np.float64)  # 1..100 Gy, 100 voxels
    assert dose_to_hottest(ascending, 95) == 6.0  # exactly 95 voxels: 6..100, not 96 voxels
    assert dose_to_hottest(ascending, 100) == 1.0
    assert dose_to_hottest(ascending, 0.1) == 100.0  # a partial voxel counts whole
    assert dose_to_hottest(ascending, 50.5) == 50.0  # ceil(50.5) = 51 hottest voxels


def test_cumulative_dvh_agrees_with_the_metrics():
    dose = slab_gradient(slices=50)
    mask = np.ones(dose.shape, dtype=np.uint8)
    axis, volume = cumulative_dvh(dose, mask, bin_width_gy=0.5)
    assert axis[0] == 0 and volume[0] == 100.0
    assert volume[-1] == 0.0 and axis[-1] > dose.max() and axis[-2] <= dose.max()
    assert np.all(np.diff(axis) == pytest.approx(0.5))
    assert np.all(np.diff(volume) <= 0)
    metrics = dose_volume_metrics(dose, mask, voxel_volume_cc=1.0)
    for level in (5, 10, 20, 45):
        assert volume[int(level / 0.5)] == pytest.approx(metrics[f"V{level}Gy_pct"])
    with pytest.raises(InputError, match="positive"):
        cumulative_dvh(dose, mask, bin_width_gy=0)


def test_empty_mask_and_shape_mismatch():
    dose = np.ones((4, 4, 4), dtype=np.float32)
    with pytest.raises(StructureSkipped, match=EMPTY_STRUCTURE):
        dose_volume_metrics(dose, np.zeros_like(dose, dtype=np.uint8), 1.0)
    with pytest.raises(InputError, match="shape"):
        dose_volume_metrics(dose, np.ones((4, 4, 5), dtype=np.uint8), 1.0)


def _image(array: np.ndarray, spacing=(2.0, 2.0, 3.0), origin=(-10.0, 5.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _gradient_patient(patient_id: str = "grad", with_dose: bool = True) -> Patient:
    """A 20-slice patient: dose k + 0.5 Gy on slice k; a box structure and a half-volume structure."""
    ct = np.zeros((20, 16, 16), dtype=np.int16)
    box = np.zeros(ct.shape, dtype=np.uint8)
    box[4:14, 4:8, 4:9] = 1  # slices 4..13: doses 4.5..13.5 Gy, 20 voxels per slice
    upper = np.zeros(ct.shape, dtype=np.uint8)
    upper[10:] = 1
    dose = _image(slab_gradient(slices=20, rows=16, cols=16)) if with_dose else None
    return Patient.from_images(
        patient_id, _image(ct), {"Box": _image(box), "Upper": _image(upper)}, dose=dose
    )


def test_patient_dvh_on_a_known_dose_with_curves():
    result = patient_dvh(_gradient_patient(), curves=True, bin_width_gy=1.0)
    metrics = result.metrics
    assert list(metrics.columns) == ["patient", "structure", "image", "feature", "value", "reason"]
    assert (metrics["reason"] == "").all() and (metrics["image"] == "dose").all()
    box = metrics[metrics.structure == "Box"].set_index("feature")["value"]
    assert box["volume_cc"] == pytest.approx(200 * 2 * 2 * 3 / 1000)
    assert box["Dmean_Gy"] == pytest.approx(9.0)
    assert box["V10Gy_pct"] == pytest.approx(40.0)  # slices 10..13 of 4..13
    assert box["D50_Gy"] == pytest.approx(9.5)
    upper = metrics[metrics.structure == "Upper"].set_index("feature")["value"]
    assert upper["Dmin_Gy"] == 10.5 and upper["V15Gy_pct"] == pytest.approx(50.0)
    curves = result.curves
    assert list(curves.columns) == ["patient", "structure", "dose_gy", "volume_pct"]
    box_curve = curves[curves.structure == "Box"]
    assert box_curve["dose_gy"].iloc[0] == 0 and box_curve["volume_pct"].iloc[0] == 100
    assert box_curve.set_index("dose_gy")["volume_pct"][10.0] == pytest.approx(40.0)


def test_structure_partly_outside_the_dose_grid_is_flagged(caplog):
    ct = sitk.Image([20, 20, 20], sitk.sitkInt16)
    box = np.zeros((20, 20, 20), np.uint8)
    box[5:15, 5:15, 5:15] = 1  # 1000 voxels; the 500 with z >= 10 lie beyond the dose grid
    mask = sitk.GetImageFromArray(box)
    dose = sitk.Image([20, 20, 10], sitk.sitkFloat32) + 2.0  # covers slices z = 0..9 only
    patient = Patient.from_images("partial", ct, {"Box": mask}, dose)
    with caplog.at_level("WARNING"):
        metrics = patient_dvh(patient).metrics.set_index("feature")["value"]
    assert metrics["outside_dose_grid_pct"] == pytest.approx(50.0)
    assert metrics["Dmean_Gy"] == pytest.approx(1.0)  # half at 2 Gy, half filled with 0 Gy
    assert "50.0% of Box lies outside the dose grid" in caplog.text
    full = patient_dvh(_gradient_patient()).metrics
    assert "outside_dose_grid_pct" not in set(full["feature"])


def test_patient_without_dose_gives_a_reason_row():
    result = patient_dvh(_gradient_patient(with_dose=False))
    assert len(result.metrics) == 1
    row = result.metrics.iloc[0]
    assert row["reason"].startswith(NO_DOSE) and math.isnan(row["value"]) and row["feature"] == ""


def _write_patient(folder, patient: Patient) -> None:
    folder.mkdir(parents=True)
    sitk.WriteImage(patient.ct_image(), str(folder / "ct.nrrd"))
    if patient.has_dose:
        sitk.WriteImage(patient.dose_image(), str(folder / "dose.nrrd"))
    (folder / "structures").mkdir()
    for name in patient.structure_names:
        sitk.WriteImage(patient.structure_image(name), str(folder / "structures" / f"{name}.nrrd"))


@pytest.fixture(scope="module")
def gradient_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvh") / "cohort"
    _write_patient(root / "p1", _gradient_patient("p1"))
    _write_patient(root / "p2", _gradient_patient("p2"))
    _write_patient(root / "p3", _gradient_patient("p3", with_dose=False))
    return root


def test_cohort_dvh_in_parallel_equals_in_process(gradient_cohort):
    one = cohort_dvh(gradient_cohort, jobs=1, quiet=True, curves=True)
    two = cohort_dvh(gradient_cohort, jobs=2, quiet=True, curves=True)
    pd.testing.assert_frame_equal(one.metrics, two.metrics)
    pd.testing.assert_frame_equal(one.curves, two.curves)
    assert list(one.metrics["patient"].unique()) == ["p1", "p2", "p3"]
    assert one.metrics[one.metrics.patient == "p3"]["reason"].str.startswith(NO_DOSE).all()


def test_dvh_command_long_wide_and_curves(gradient_cohort, tmp_path):
    out = tmp_path / "dvh.csv"
    curves = tmp_path / "curves.csv"
    code = main(
        [
            "dvh",
            "--cohort",
            str(gradient_cohort),
            "--structures",
            "box",
            "--quiet",
            "--out",
            str(out),
            "--dvh-curves",
            str(curves),
        ]
    )
    assert code == 0  # a patient without dose is a skip, not a failure
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["patient", "structure", "image", "feature", "value", "reason"]
    assert set(table[table.feature == "Dmean_Gy"]["structure"]) == {"Box"}
    assert pd.read_csv(curves)["structure"].unique().tolist() == ["Box"]
    wide_out = tmp_path / "wide.csv"
    assert main(["dvh", "--cohort", str(gradient_cohort), "--wide", "--quiet", "--out", str(wide_out)]) == 0
    wide = pd.read_csv(wide_out, index_col="feature")
    assert list(wide.columns) == ["p1/Box", "p1/Upper", "p2/Box", "p2/Upper"]
    assert list(wide.index) == metric_names()
    assert wide.loc["Dmean_Gy", "p2/Box"] == pytest.approx(9.0)
    assert main(["dvh", "--cohort", str(gradient_cohort), "--structures", "Nope", "--out", str(out)]) == 2


def test_openkbp_patient_matches_the_converter_statistics(openkbp_train):
    """Voxel counts and mean doses of pt_1 agree with the statistics the converter recorded."""
    folder = openkbp_train / "pt_1"
    info = json.loads((folder / "info.json").read_text())
    patient = Patient.from_folder(folder)
    metrics = patient_dvh(patient).metrics
    voxel_cc = float(np.prod(info["spacing"])) / 1000
    assert (metrics["reason"] == "").all()
    for name, stats in info["structures"].items():
        if name not in patient.structure_names:  # possible_dose_mask is not a structure
            continue
        values = metrics[metrics.structure == name].set_index("feature")["value"]
        assert values["volume_cc"] == pytest.approx(stats["voxels"] * voxel_cc, rel=1e-3)
        assert values["Dmean_Gy"] == pytest.approx(stats["dose_mean_gy"], abs=1e-3)
        assert values["Dmin_Gy"] <= values["D98_Gy"] <= values["D95_Gy"] <= values["D50_Gy"]
        assert values["D50_Gy"] <= values["D2_Gy"] <= values["Dmax_Gy"]
    ptv70 = metrics[metrics.structure == "PTV70"].set_index("feature")["value"]
    assert 65 < ptv70["D95_Gy"] < 71  # a 70 Gy prescription


def test_image_dvh_on_images_with_a_labelmap():
    from DeepDosimetricsLib.features.dosimetrics import image_dvh

    patient = _gradient_patient()
    dose = patient.dose_image()
    box = patient.structure_image("Box")
    labelmap = sitk.Cast(box * 2 + patient.structure_image("Upper"), sitk.sitkUInt8)  # 1 upper, 2 box, 3 both
    result = image_dvh(dose, {"Box": box, "BoxOnly": (labelmap, 2), "Nothing": (labelmap, 7)}, curves=True)
    metrics = result.metrics
    box_values = metrics[metrics.structure == "Box"].set_index("feature")["value"]
    assert box_values["Dmean_Gy"] == pytest.approx(9.0)
    box_only = metrics[metrics.structure == "BoxOnly"].set_index("feature")["value"]
    assert box_only["Dmax_Gy"] == 9.5  # slices 4..9 of the box lie below the upper half
    assert metrics[metrics.structure == "Nothing"]["reason"].iloc[0].startswith(EMPTY_STRUCTURE)
    assert set(result.curves["structure"]) == {"Box", "BoxOnly"}
    with pytest.raises(InputError, match="differs from the dose grid"):
        image_dvh(dose, {"Small": sitk.Image(3, 3, 3, sitk.sitkUInt8)})
