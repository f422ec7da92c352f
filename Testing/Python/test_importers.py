"""Cohort importers: folder exports, OpenKBP sparse CSVs and DICOM-RT, with their report and CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from DeepDosimetricsLib.cli import main
from DeepDosimetricsLib.data.cohort import Cohort
from DeepDosimetricsLib.data.importers import ImportOptions, import_dicom, import_folder
from DeepDosimetricsLib.data.importers.layout import read_record
from DeepDosimetricsLib.data.importers.report import REPORT_FILE, read_report
from DeepDosimetricsLib.runtime.errors import InputError
from dicomrt import (
    COLUMN_SPACING,
    COLUMNS,
    ORIGIN_X,
    ORIGIN_Y,
    ROW_SPACING,
    ROWS,
    square,
    write_ct_series,
    write_image_slice,
    write_rtdose,
    write_rtstruct,
)

OPENKBP_PATIENTS = ["pt_1", "pt_2", "pt_3"]


def read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def same_image(a: sitk.Image, b: sitk.Image) -> bool:
    """Identical voxels, dtype and geometry."""
    return (
        np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
        and a.GetPixelID() == b.GetPixelID()
        and a.GetSpacing() == b.GetSpacing()
        and a.GetOrigin() == b.GetOrigin()
        and a.GetDirection() == b.GetDirection()
    )


def tree_state(folder: Path) -> dict:
    """Names, sizes and modification times of everything under a folder (to show it is unchanged)."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def rows_by_patient(cohort: Path) -> dict:
    return {row["patient"]: row for row in read_report(cohort / REPORT_FILE)}


# ------------------------------------------------------------------------------------------- OpenKBP CSV
@pytest.fixture(scope="module")
def openkbp_csv(shared_data: Path) -> Path:
    path = shared_data / "openkbp-csv"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="module")
def openkbp_cohort(openkbp_csv: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("openkbp") / "cohort"
    assert main(["import", "openkbp", str(openkbp_csv), "--out", str(out), "--quiet"]) == 0
    return out


def test_openkbp_csv_equals_the_shared_nrrds(openkbp_cohort: Path, openkbp_train: Path):
    for patient in OPENKBP_PATIENTS:
        imported, reference = openkbp_cohort / patient, openkbp_train / patient
        assert same_image(read(imported / "ct.nrrd"), read(reference / "ct.nrrd")), patient
        assert same_image(read(imported / "dose.nrrd"), read(reference / "dose.nrrd")), patient
        assert same_image(read(imported / "possible_dose_mask.nrrd"),
                          read(reference / "possible_dose_mask.nrrd")), patient
        record = read_record(imported)
        originals = {entry["original"] for entry in record["structures"].values()}
        expected = {p.name[:-5] for p in reference.glob("*.nrrd")} - {"ct", "dose", "possible_dose_mask"}
        assert originals == expected, patient
        for name, entry in record["structures"].items():
            assert same_image(read(imported / entry["file"]), read(reference / f"{entry['original']}.nrrd")), \
                (patient, name)


def test_openkbp_names_are_normalised_and_the_cohort_loads(openkbp_cohort: Path):
    record = read_record(openkbp_cohort / "pt_1")
    assert record["structures"]["Parotid_L"]["original"] == "LeftParotid"
    assert record["structures"]["Parotid_R"]["original"] == "RightParotid"
    cohort = Cohort.open(openkbp_cohort)
    assert cohort.ids == OPENKBP_PATIENTS
    patient = cohort["pt_1"]
    assert "possible_dose_mask" not in patient.structure_names
    assert {"PTV70", "Parotid_L", "SpinalCord"} <= set(patient.structure_names)
    assert patient.has_dose and patient.dose().max() > 60
    report = rows_by_patient(openkbp_cohort)
    assert {row["status"] for row in report.values()} == {"ok"}


def test_openkbp_bad_patients_are_skipped(openkbp_csv: Path, tmp_path: Path):
    source = tmp_path / "source"
    source.mkdir()
    os.symlink(openkbp_csv / "pt_1", source / "pt_1")
    (source / "pt_no_ct").mkdir()
    (source / "pt_no_ct" / "dose.csv").write_text(",data\n1,2.0\n")
    (source / "pt_bad").mkdir()
    (source / "pt_bad" / "ct.csv").write_text(",data\nnot-an-index,2.0\n")
    (source / "pt_bad" / "voxel_dimensions.csv").write_text("1\n1\n1\n")
    out = tmp_path / "cohort"
    assert main(["import", "openkbp", str(source), "--out", str(out), "--quiet"]) == 1
    report = rows_by_patient(out)
    assert report["pt_1"]["status"] == "ok"
    assert report["pt_no_ct"]["status"] == "skipped" and "no CT found" in report["pt_no_ct"]["reason"]
    assert report["pt_bad"]["status"] == "skipped" and "flat indices" in report["pt_bad"]["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["import_report.csv", "pt_1"]  # nothing half-written


# ------------------------------------------------------------------------------------------- folders
@pytest.fixture
def flat_source(openkbp_train: Path, tmp_path: Path) -> Path:
    """A flat-layout source of two OpenKBP patients (pt_38 has no dose)."""
    source = tmp_path / "flat"
    source.mkdir()
    for patient in ("pt_1", "pt_38"):
        os.symlink(openkbp_train / patient, source / patient)
    return source


def test_folder_import_of_a_flat_layout(flat_source: Path, openkbp_train: Path, tmp_path: Path):
    before = tree_state(openkbp_train / "pt_1")
    out = tmp_path / "cohort"
    report = import_folder(flat_source, ImportOptions(out=out, quiet=True))
    assert report.exit_code == 0, report.summary()
    assert tree_state(openkbp_train / "pt_1") == before  # the source is not modified
    patient_dir = out / "pt_1"
    assert (patient_dir / "ct.nrrd").is_symlink()
    assert (patient_dir / "ct.nrrd").resolve() == (openkbp_train / "pt_1" / "ct.nrrd").resolve()
    assert (patient_dir / "structures" / "Parotid_L.nrrd").is_symlink()
    assert not (patient_dir / "structures" / "possible_dose_mask.nrrd").exists()
    assert (patient_dir / "possible_dose_mask.nrrd").exists()
    record = read_record(patient_dir)
    assert record["structures"]["Parotid_L"]["original"] == "LeftParotid"
    cohort = Cohort.open(out)
    assert cohort.ids == ["pt_1", "pt_38"]
    assert not cohort["pt_38"].has_dose
    assert sorted(cohort["pt_38"].structure_names) == ["Esophagus", "Larynx", "PTV70"]
    assert np.array_equal(cohort["pt_1"].structure("Parotid_L"),
                          sitk.GetArrayFromImage(read(openkbp_train / "pt_1" / "LeftParotid.nrrd")))


def make_prototype_source(openkbp_train: Path, root: Path) -> Path:
    """The prototype's export layout: Pt001/2_pms.nrrd and Pt001/1_RTSTRUCT_ANON_<name>.nrrd."""
    reference = openkbp_train / "pt_1"
    ct = read(reference / "ct.nrrd")
    ptv = read(reference / "PTV70.nrrd")
    first = root / "Pt001"
    first.mkdir(parents=True)
    sitk.WriteImage(ct, str(first / "2_pms.nrrd"), True)
    sitk.WriteImage(ptv, str(first / "1_RTSTRUCT_ANON_PTV.nrrd"), True)
    sitk.WriteImage(read(reference / "Brainstem.nrrd"), str(first / "1_RTSTRUCT_ANON_cuore.nrrd"), True)
    sitk.WriteImage(read(reference / "SpinalCord.nrrd") * 255, str(first / "1_RTSTRUCT_ANON_midollo.nrrd"), True)
    sitk.WriteImage(read(reference / "dose.nrrd"), str(first / "3_RTDOSE.nrrd"), True)
    second = root / "Pt002"  # a float CT and no dose: converted, not linked
    second.mkdir()
    sitk.WriteImage(sitk.Cast(ct, sitk.sitkFloat32), str(second / "2_pms.nrrd"), True)
    sitk.WriteImage(ptv, str(second / "1_RTSTRUCT_ANON_polmoneSX.nrrd"), True)
    (root / "Pt003").mkdir()  # no CT
    sitk.WriteImage(ptv, str(root / "Pt003" / "1_RTSTRUCT_ANON_PTV.nrrd"), True)
    (root / "clinical.csv").write_text("patient,age\nPt001,61\nPt002,70\nPt003,55\n")
    return root


def test_folder_import_of_the_prototype_layout(openkbp_train: Path, tmp_path: Path):
    source = make_prototype_source(openkbp_train, tmp_path / "exports")
    before = tree_state(source)
    out = tmp_path / "cohort"
    assert main(["import", "folder", str(source), "--out", str(out), "--copy", "--quiet"]) == 1
    assert tree_state(source) == before
    report = rows_by_patient(out)
    assert report["Pt001"]["status"] == "ok" and report["Pt002"]["status"] == "ok"
    assert report["Pt003"]["status"] == "skipped" and "no CT found" in report["Pt003"]["reason"]
    first = out / "Pt001"
    assert not (first / "ct.nrrd").is_symlink()  # --copy
    assert sorted(p.name for p in (first / "structures").iterdir()) == \
        ["Heart.nrrd", "PTV.nrrd", "SpinalCord.nrrd"]
    record = read_record(first)
    assert record["structures"]["Heart"]["original"] == "cuore"
    assert record["structures"]["SpinalCord"]["original"] == "midollo"
    assert record["dose"]["source"].endswith("3_RTDOSE.nrrd")
    cohort = Cohort.open(out)
    assert cohort.ids == ["Pt001", "Pt002"]
    assert cohort.clinical is not None and list(cohort.clinical["age"]) == [61, 70, 55]
    spinal_cord = cohort["Pt001"].structure("SpinalCord")  # 0/255 in the source: now 0/1
    assert spinal_cord.max() == 1
    reference = sitk.GetArrayFromImage(read(openkbp_train / "pt_1" / "SpinalCord.nrrd"))
    assert np.array_equal(spinal_cord, reference)
    second = cohort["Pt002"]
    assert second.structure_names == ["Lung_L"] and not second.has_dose
    assert sitk.ReadImage(str(out / "Pt002" / "ct.nrrd")).GetPixelID() == sitk.sitkInt16
    assert np.array_equal(second.ct_array(), sitk.GetArrayFromImage(read(openkbp_train / "pt_1" / "ct.nrrd")))


def test_folder_patterns_and_ambiguous_ct(openkbp_train: Path, tmp_path: Path):
    source = tmp_path / "src" / "A"
    source.mkdir(parents=True)
    for name in ("image_a.nrrd", "image_b.nrrd"):
        os.symlink(openkbp_train / "pt_1" / "ct.nrrd", source / name)
    os.symlink(openkbp_train / "pt_1" / "PTV70.nrrd", source / "roi_PTV_70.nrrd")
    out = tmp_path / "cohort"
    assert main(["import", "folder", str(source.parent), "--out", str(out), "--quiet",
                 "--ct", "image_*.nrrd"]) == 1
    assert "several CT candidates" in rows_by_patient(out)["A"]["reason"]
    assert main(["import", "folder", str(source.parent), "--out", str(out), "--quiet", "--hardlink",
                 "--ct", "image_a.nrrd", "--structure", "roi_*.nrrd", "--name-pattern", r"roi_(?P<name>.+)"]) == 0
    record = read_record(out / "A")
    assert list(record["structures"]) == ["PTV70"]
    assert record["structures"]["PTV70"]["original"] == "PTV_70"
    assert (out / "A" / "ct.nrrd").stat().st_ino == (openkbp_train / "pt_1" / "ct.nrrd").stat().st_ino or \
        any("hardlink" in note for note in record["notes"])  # another file system: copied, and said so


def test_rerun_keeps_imported_patients_unless_overwrite(flat_source: Path, tmp_path: Path):
    out = tmp_path / "cohort"
    import_folder(flat_source, ImportOptions(out=out, quiet=True))
    marker = out / "pt_1" / "import.json"
    stamp = marker.stat().st_mtime_ns
    report = import_folder(flat_source, ImportOptions(out=out, quiet=True))
    assert report.exit_code == 0
    assert all("already imported" in e.reason for e in report.entries)
    assert report.entries[0].structures == 8
    assert marker.stat().st_mtime_ns == stamp
    report = import_folder(flat_source, ImportOptions(out=out, overwrite=True, quiet=True))
    assert not any("already imported" in e.reason for e in report.entries)
    assert sorted(p.name for p in out.iterdir()) == ["pt_1", "pt_38"]  # no staging left behind
    (out / "foreign").mkdir()
    (flat_source / "foreign").mkdir()
    report = import_folder(flat_source, ImportOptions(out=out, quiet=True))
    assert "was not made by an import" in {e.patient: e.reason for e in report.entries}["foreign"]


def test_bad_arguments_exit_2(openkbp_train: Path, tmp_path: Path, capsys):
    assert main(["import", "folder", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["import", "folder", str(tmp_path), "--out", str(tmp_path / "c"),
                 "--name-pattern", "(no group"]) == 2
    assert main(["import", "folder", str(openkbp_train / "pt_1"), "--out", str(tmp_path / "c")]) == 2
    assert "looks like one patient's folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["import"])
    assert exit_info.value.code == 2
    with pytest.raises(InputError, match="unknown link mode"):
        ImportOptions(out=tmp_path, link="teleport")


# ------------------------------------------------------------------------------------------- DICOM
@pytest.fixture(scope="module")
def breast_cohort(shared_data: Path, tmp_path_factory) -> Path:
    source = shared_data / "dicomrt-breast"
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    out = tmp_path_factory.mktemp("breast") / "cohort"
    assert main(["import", "dicom", str(source), "--out", str(out), "--quiet"]) == 0
    return out


BREAST_ROIS = {"BODY", "Areola", "Borders", "Breast", "Heart", "Lt Lung", "Nodes", "Scar", "Tumor Bed",
               "Tumor Bed Block"}


def test_dicom_breast_dose_in_gy_on_its_grid(breast_cohort: Path):
    patient_dir = breast_cohort / "123456"
    assert not (patient_dir / "ct.nrrd").exists()  # a single CT slice is no volume
    dose = read(patient_dir / "dose.nrrd")
    assert dose.GetSize() == (194, 129, 98)
    assert np.allclose(dose.GetSpacing(), (2.5, 2.5, 3.0))
    assert np.allclose(dose.GetOrigin(), (-228.6541915, -419.2444776, -122.4407))
    assert dose.GetPixelID() == sitk.sitkFloat32
    values = sitk.GetArrayFromImage(dose)
    assert 10 < values.max() < 20  # a breast boost plan, in Gy (not raw integers or cGy)
    record = read_record(patient_dir)
    assert any("1 CT slice" in note for note in record["notes"])


def test_dicom_breast_structures(breast_cohort: Path):
    patient_dir = breast_cohort / "123456"
    record = read_record(patient_dir)
    written = {entry["original"] for entry in record["structures"].values()}
    # Areola has no contour in this RTSTRUCT: reported, not written as an empty mask
    assert written == BREAST_ROIS - {"Areola"}
    assert any("'Areola' has no contours" in note for note in record["notes"])
    assert record["structures"]["Lung_L"]["original"] == "Lt Lung"
    assert record["structures"]["Body"]["original"] == "BODY"
    dose = sitk.GetArrayFromImage(read(patient_dir / "dose.nrrd"))
    masks = {name: sitk.GetArrayFromImage(read(patient_dir / entry["file"])).astype(bool)
             for name, entry in record["structures"].items()}
    voxel_cc = 2.5 * 2.5 * 3.0 / 1000
    for name, mask in masks.items():
        assert mask.any(), name
        assert mask.shape == dose.shape
    assert 300 < masks["Heart"].sum() * voxel_cc < 700
    assert 1000 < masks["Lung_L"].sum() * voxel_cc < 3000
    body = masks["Body"]
    assert dose[body].max() == pytest.approx(dose.max())  # the hottest voxel is in the body
    assert dose[~body].mean() < 0.1 * dose[body].mean() + 0.05
    assert dose[masks["Tumor_Bed"]].mean() > 0.9 * dose.max()  # the boost covers the tumour bed
    assert dose[masks["Heart"]].mean() < 0.3 * dose.max()
    assert not (masks["Tumor_Bed"] & ~masks["Body"]).any()


def test_dicom_breast_dvh_through_the_cohort(breast_cohort: Path, tmp_path: Path):
    # No CT volume: the patient loads on the dose grid and gets DVH metrics per structure.
    out = tmp_path / "dvh.csv"
    assert main(["dvh", "--cohort", str(breast_cohort), "--out", str(out), "--quiet"]) == 0
    import pandas as pd

    table = pd.read_csv(out)
    metrics = table.pivot_table(index="structure", columns="feature", values="value")
    assert set(metrics.index) == {"Body", "Borders", "Breast", "Heart", "Lung_L", "Nodes", "Scar",
                                  "Tumor_Bed", "Tumor_Bed_Block"}
    assert 300 < metrics.loc["Heart", "volume_cc"] < 700
    assert metrics.loc["Tumor_Bed", "D95_Gy"] > 0.9 * metrics.loc["Body", "Dmax_Gy"]
    assert metrics.loc["Heart", "Dmean_Gy"] < metrics.loc["Tumor_Bed", "Dmean_Gy"]


# synthetic DICOM series built with pydicom (dicomrt.py) -------------------------------------------
@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory) -> Path:
    """Several patients and studies in one tree, with good and bad series."""
    root = tmp_path_factory.mktemp("dicom") / "tree"
    steps = [0.0, 2.5, 5.0, 7.5, 10.0, 12.5]
    write_ct_series(root / "good" / "ct", "GOOD", "1.9.1", steps[::-1])  # positions given descending
    outer, hole = square(4, 13, 3, 12, 2.5), square(7, 9, 6, 8, 2.5)
    write_rtstruct(root / "good" / "rs.dcm", "GOOD", "1.9.1", {
        "Lt Lung": [outer, hole, square(4, 13, 3, 12, 5.0)],
        "cuore": [square(0, 1, 0, 1, 6.3)],  # between the slices at 5.0 and 7.5: nearer 7.5
        "External": [square(0, 23, 0, 19, z) for z in steps],
    })
    gy = np.arange(3 * 4 * 5, dtype=np.float64).reshape(3, 4, 5) * 0.5
    write_rtdose(root / "good" / "rd.dcm", "GOOD", "1.9.1", gy, 1e-3, 0.0)
    write_ct_series(root / "gap", "GAP", "1.9.2", [0, 3, 6, 12, 15])
    write_ct_series(root / "tilt", "TILT", "1.9.3", [0, 2, 4, 6], shift_y_per_slice=1.0)
    write_ct_series(root / "uneven", "UNEVEN", "1.9.4", [0, 2, 5, 7.5, 9])
    write_rtstruct(root / "lost" / "rs.dcm", "LOST", "1.9.99", {"PTV": [square(1, 2, 1, 2, 0)]})
    write_ct_series(root / "broken", "BROKEN", "1.9.5", [0, 2, 4])
    (root / "broken" / "img999.dcm").write_bytes(b"\x00" * 200)  # a damaged file among its slices
    for index, frame in enumerate(["1.9.6", "1.9.7"]):  # one patient, two studies
        write_ct_series(root / "two" / f"study{index}", "TWO", frame, [0, 1, 2], study=f"1.2.3.{index}")
    write_ct_series(root / "bare", "BARE", "1.9.8", [0, 2, 4], bare=True)  # no preamble, no extension
    (root / "README.txt").write_text("not DICOM")
    return root


@pytest.fixture(scope="module")
def dicom_cohort(dicom_tree: Path, tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("dicom-cohort") / "cohort"
    report = import_dicom(dicom_tree, ImportOptions(out=out, quiet=True))
    return out, {entry.patient: entry for entry in report.entries}, report


def test_dicom_ct_sorting_rescale_and_geometry(dicom_cohort):
    out, entries, _ = dicom_cohort
    assert entries["GOOD"].ok, entries["GOOD"].reason
    ct = read(out / "GOOD" / "ct.nrrd")
    assert ct.GetSize() == (COLUMNS, ROWS, 6)
    assert np.allclose(ct.GetSpacing(), (COLUMN_SPACING, ROW_SPACING, 2.5))
    assert np.allclose(ct.GetOrigin(), (ORIGIN_X, ORIGIN_Y, 0.0))
    assert np.allclose(ct.GetDirection(), np.eye(3).ravel())
    hu = sitk.GetArrayFromImage(ct)
    assert hu.dtype == np.int16
    # slice k (sorted by position) holds 1000 + 10k + column - 1024, also the one with slope 0.5
    expected = (1000 + 10 * np.arange(6)[:, None, None] + np.arange(COLUMNS)[None, None, :]) - 1024
    # positions were written descending, so the slice at z=0 is the one written last (index 5)
    assert np.array_equal(hu, np.broadcast_to(expected[::-1], hu.shape))


def test_dicom_rtstruct_rasterisation(dicom_cohort):
    out, _, _ = dicom_cohort
    record = read_record(out / "GOOD")
    lung = sitk.GetArrayFromImage(read(out / "GOOD" / record["structures"]["Lung_L"]["file"]))
    assert [int(lung[k].sum()) for k in range(6)] == [0, 100 - 9, 100, 0, 0, 0]  # a hole on slice 1
    assert lung[1, 3:13, 4:14].sum() == 91 and lung[1, 6:9, 7:10].sum() == 0
    heart = sitk.GetArrayFromImage(read(out / "GOOD" / record["structures"]["Heart"]["file"]))
    assert np.flatnonzero(heart.reshape(6, -1).any(axis=1)).tolist() == [3]
    body = sitk.GetArrayFromImage(read(out / "GOOD" / "structures" / "Body.nrrd"))
    assert body.all()
    assert Cohort.open(out)["GOOD"].structure_names == ["Body", "Heart", "Lung_L"]


def test_dicom_dose_in_gy(dicom_cohort):
    out, entries, _ = dicom_cohort
    assert entries["GOOD"].has_dose
    dose = read(out / "GOOD" / "dose.nrrd")
    assert dose.GetSize() == (5, 4, 3)
    assert np.allclose(dose.GetSpacing(), (2.0, 2.0, 5.0))
    expected = np.arange(60, dtype=np.float32).reshape(3, 4, 5) * 0.5
    assert np.allclose(sitk.GetArrayFromImage(dose), expected, atol=1e-3)


def test_dicom_bad_series_are_skipped_with_reasons(dicom_cohort, dicom_tree: Path):
    out, entries, report = dicom_cohort
    assert report.exit_code == 1
    assert "missing slice" in entries["GAP"].reason and "6.00 and 12.00" in entries["GAP"].reason
    assert "gantry tilt" in entries["TILT"].reason
    assert "inconsistent slice spacing" in entries["UNEVEN"].reason
    assert "matches no image" in entries["LOST"].reason and "1.9.99" in entries["LOST"].reason
    assert "unreadable file" in entries["BROKEN"].reason and "img999.dcm" in entries["BROKEN"].reason
    for patient in ("GAP", "TILT", "UNEVEN", "LOST", "BROKEN"):
        assert not entries[patient].ok
        assert not (out / patient).exists()
    # one patient with two frames of reference: two cohort patients
    assert entries["TWO_1"].ok and entries["TWO_2"].ok
    assert json.loads((out / "TWO_2" / "import.json").read_text())["dicom"]["FrameOfReferenceUID"] == "1.9.7"
    assert entries["BARE"].ok and read(out / "BARE" / "ct.nrrd").GetSize() == (COLUMNS, ROWS, 3)
    assert "README.txt" not in report.summary()


def test_dicom_cli_writes_the_report(dicom_tree: Path, tmp_path: Path, capsys):
    out = tmp_path / "cohort"
    assert main(["import", "dicom", str(dicom_tree), "--out", str(out), "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "dicom import: 4 patient(s) ok, 5 skipped" in printed
    assert "skipped GAP: " in printed
    report = rows_by_patient(out)
    assert report["GAP"]["status"] == "skipped" and report["GOOD"]["status"] == "ok"
    assert main(["import", "dicom", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_dicom_degenerate_contours_are_reported_and_left_out(tmp_path: Path, capsys):
    """A contour of fewer than 3 points or of zero area is reported by structure and contour index (a
    warning; exit 0) and left out: the structure is made of its valid contours, as if they were alone."""
    steps = [0.0, 2.5, 5.0, 7.5]
    valid = [square(4, 13, 3, 12, 2.5), square(6, 10, 5, 9, 5.0)]
    two_points = square(4, 13, 3, 12, 0.0)[:6]
    collinear = [ORIGIN_X, ORIGIN_Y, 7.5, ORIGIN_X + 3, ORIGIN_Y + 2, 7.5, ORIGIN_X + 6, ORIGIN_Y + 4, 7.5]
    for patient, rois in (("CLEAN", {"PTV": valid}),
                          ("DEFECTS", {"PTV": [valid[0], two_points, collinear, valid[1]], "Wire": [two_points]})):
        write_ct_series(tmp_path / "src" / patient, patient, f"1.9.{len(patient)}", steps)
        write_rtstruct(tmp_path / "src" / patient / "rs.dcm", patient, f"1.9.{len(patient)}", rois)
    out = tmp_path / "cohort"
    assert main(["import", "dicom", str(tmp_path / "src"), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "2 patient(s) ok, 0 skipped, 1 imported with warnings" in printed
    expected = ("structure 'PTV' (ROI 1, rs.dcm): contour 2 has 2 points (fewer than 3), contour 3 has zero area "
                "(its 3 points lie on one line) of 4: left out (the structure is made of its 2 other contour(s))")
    assert f"warning DEFECTS: {expected}" in printed
    assert "warning DEFECTS: structure 'Wire' (ROI 2, rs.dcm): contour 1 has 2 points (fewer than 3) of 1: left " \
           "out (no valid contour is left: not written)" in printed
    record = read_record(out / "DEFECTS")
    assert record["warnings"][0] == expected and f"warning: {expected}" in record["notes"]
    assert f"warning: {expected}" in rows_by_patient(out)["DEFECTS"]["reason"]
    assert "warnings" not in read_record(out / "CLEAN") and "warnings" not in rows_by_patient(out)["CLEAN"]
    assert sorted(record["structures"]) == ["PTV"]  # the wire has nothing left
    ptv, clean = (sitk.GetArrayFromImage(read(out / patient / "structures" / "PTV.nrrd"))
                  for patient in ("DEFECTS", "CLEAN"))
    assert ptv.sum() == 100 + 25 and np.array_equal(ptv, clean)


def test_dicom_series_with_a_duplicate_sop_instance_uid_is_refused(tmp_path: Path, capsys):
    """Two slices at different positions sharing one SOPInstanceUID (a series merged by hand): the series is
    refused naming both files (the import of that patient is skipped, exit 1); other patients import."""
    import pydicom

    write_ct_series(tmp_path / "src" / "ok", "OK", "1.9.1", [0.0, 2.5, 5.0])
    write_ct_series(tmp_path / "src" / "merged" / "a", "MERGED", "1.9.2", [0.0, 2.5, 5.0])
    extra = pydicom.dcmread(tmp_path / "src" / "merged" / "a" / "img001.dcm")  # its UID, another position
    extra.ImagePositionPatient = [ORIGIN_X, ORIGIN_Y, 7.5]
    (tmp_path / "src" / "merged" / "b").mkdir()
    extra.save_as(tmp_path / "src" / "merged" / "b" / "img001.dcm")
    out = tmp_path / "cohort"
    assert main(["import", "dicom", str(tmp_path / "src"), "--out", str(out), "--quiet"]) == 1
    reason = rows_by_patient(out)["MERGED"]["reason"]
    z = float(pydicom.dcmread(tmp_path / "src" / "merged" / "a" / "img001.dcm").ImagePositionPatient[2])
    assert f"a/img001.dcm and b/img001.dcm share one SOPInstanceUID (at positions (-10, -20, {z:g}) mm and " \
           "(-10, -20, 7.5) mm); PS3.3 forbids it" in reason
    assert "the series is refused" in reason and "skipped MERGED: " in capsys.readouterr().out
    assert not (out / "MERGED").exists() and rows_by_patient(out)["OK"]["status"] == "ok"


def test_mr_and_pet_images_are_imported_and_checked_as_their_modality(tmp_path: Path, capsys):
    """An MR series (values 0-3100, no voxel below 0: an un-rescaled CT to the HU check) with its RTSTRUCT is
    imported with its DICOM Modality in import.json and its own values; the same values in a CT series are
    refused as before; a PET series keeps its rescaled Bq/ml (a negative voxel: a warning); an MR alone in
    its frame of reference is no patient. The folder importer takes the
    modality from --modality. Radiomics then measures the MR patients; the cache (HU channels) refuses them."""
    from pydicom.uid import generate_uid

    steps = [0.0, 2.5, 5.0]
    values = [np.rint(np.linspace(0, 3000, ROWS * COLUMNS)).reshape(ROWS, COLUMNS) + 50 * k for k in range(3)]
    for patient, modality, frame in (("MRPLAN", "MR", "1.9.1"), ("RAWCT", "CT", "1.9.2"), ("MRONLY", "MR", "1.9.3"),
                                     ("PETPLAN", "PT", "1.9.4")):
        series = generate_uid()
        pet = modality == "PT"  # in Bq/ml, stored with RescaleSlope 0.25 and RescaleIntercept -1
        for k, z in enumerate(steps):
            write_image_slice(tmp_path / "dicom" / patient / f"im{k}.dcm", patient, series, frame,
                              [ORIGIN_X, ORIGIN_Y, z], values[k] / 4 - 1 if pet else values[k],
                              [ROW_SPACING, COLUMN_SPACING], slope=0.25 if pet else 1.0, intercept=-1.0 if pet else 0.0,
                              modality=modality, **({"Units": "BQML"} if pet else {}))
        if patient != "MRONLY":
            write_rtstruct(tmp_path / "dicom" / patient / "rs.dcm", patient, frame,
                           {"GTV": [square(4, 13, 3, 12, z) for z in steps]})
    out = tmp_path / "cohort"
    assert main(["import", "dicom", str(tmp_path / "dicom"), "--out", str(out), "--quiet"]) == 1
    report = rows_by_patient(out)
    assert sorted(report) == ["MRPLAN", "PETPLAN", "RAWCT"] and report["MRPLAN"]["status"] == "ok"
    pet = read_record(out / "PETPLAN")
    assert pet["ct"]["modality"] == "PT" and "PET values in BQML as stored" in report["PETPLAN"]["reason"]
    assert "warning: image (PT) (3 PT slices in" in report["PETPLAN"]["reason"]  # one voxel at -1 Bq/ml
    assert np.allclose(sitk.GetArrayFromImage(read(out / "PETPLAN" / "ct.nrrd")), np.asarray(values) / 4 - 1)
    assert "looks un-rescaled: no voxel below 0" in report["RAWCT"]["reason"]
    record = read_record(out / "MRPLAN")
    assert record["ct"]["modality"] == "MR" and "ImageSeriesInstanceUID" in record["dicom"]
    image = read(out / "MRPLAN" / "ct.nrrd")
    assert image.GetPixelID() == sitk.sitkFloat32
    assert np.array_equal(sitk.GetArrayFromImage(image), np.asarray(values, dtype=np.float32))

    folder = tmp_path / "folder" / "brain1"  # pyradiomics' brain1 MR: no modality in its header
    folder.mkdir(parents=True)
    data = Path(__file__).resolve().parent / "data" / "pyradiomics"
    shutil.copy(data / "brain1_image.nrrd", folder / "ct.nrrd")
    shutil.copy(data / "brain1_label.nrrd", folder / "Tumor.nrrd")
    assert main(["import", "folder", str(folder.parent), "--out", str(tmp_path / "refused"), "--quiet"]) == 1
    assert "looks un-rescaled" in rows_by_patient(tmp_path / "refused")["brain1"]["reason"]
    assert main(["import", "folder", str(folder.parent), "--out", str(out), "--quiet", "--modality", "MR"]) == 0
    assert read_record(out / "brain1")["ct"]["modality"] == "MR" and (out / "brain1" / "ct.nrrd").is_symlink()
    capsys.readouterr()
    table = tmp_path / "features.csv"
    assert main(["radiomics", "--cohort", str(out), "--quiet", "--out", str(table)]) == 0  # auto: import.json
    measured = pd.read_csv(table, keep_default_na=False)
    assert set(measured["patient"]) == {"MRPLAN", "PETPLAN", "brain1"}
    assert measured[measured["patient"] != "PETPLAN"]["reason"].eq("").all()
    assert measured[measured["patient"] == "PETPLAN"]["reason"].str.startswith("warning: ").all()
    assert main(["cache", "--cohort", str(out), "--cache", str(tmp_path / "cache"), "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "patient brain1: its image is MR, not a CT" in printed and "patient PETPLAN: its image is PT" in printed


def test_fill_polygons_matches_skimage():
    from DeepDosimetricsLib.data.importers.dicom import fill_polygons
    from skimage.draw import polygon

    rng = np.random.default_rng(0)
    shape = (40, 50)
    for _ in range(30):
        shapes = []
        expected = np.zeros(shape, dtype=bool)
        for _ in range(rng.integers(1, 4)):  # several polygons in one plane: XOR
            count = int(rng.integers(3, 40))
            angles = np.sort(rng.uniform(0, 2 * np.pi, count))
            radius = rng.uniform(2, 25, count)
            centre = rng.uniform(-5, 55, 2)
            vertices = np.column_stack([centre[0] + radius * np.cos(angles),
                                        centre[1] + radius * np.sin(angles)])  # (x=column, y=row)
            shapes.append(vertices)
            inside = np.zeros(shape, dtype=bool)
            rows, columns = polygon(vertices[:, 1], vertices[:, 0], shape=shape)
            inside[rows, columns] = True
            expected ^= inside
        assert np.array_equal(fill_polygons(shapes, shape), expected)


def test_user_synonyms_in_the_cli(openkbp_train: Path, tmp_path: Path):
    source = make_prototype_source(openkbp_train, tmp_path / "exports")
    user = tmp_path / "names.yaml"
    user.write_text("synonyms:\n  Cor: [cuore]\n")
    out = tmp_path / "cohort"
    main(["import", "folder", str(source), "--out", str(out), "--quiet", "--synonyms", str(user)])
    record = read_record(out / "Pt001")
    assert record["structures"]["Cor"]["original"] == "cuore"
    assert "PTV" in record["structures"]  # the packaged map still applies
