"""Patient and cohort loading: geometry, resampling onto the CT grid, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from DeepDosimetricsLib.data.cohort import Cohort
from DeepDosimetricsLib.data.geometry import Geometry
from DeepDosimetricsLib.data.patient import Patient, body_mask_from_hu
from DeepDosimetricsLib.runtime.errors import InputError

CT_GEOMETRY = Geometry(size=(40, 36, 30), spacing=(2.0, 2.0, 3.0), origin=(-40.0, -30.0, 10.0))
BOX_CENTRE = np.array([-1.3, 4.7, 55.4])  # LPS mm, chosen off the voxel centres
BOX_HALF = np.array([10.5, 7.3, 9.8])


def rotation_z(degrees: float) -> tuple:
    """Direction cosines of a rotation about the z axis."""
    a = np.deg2rad(degrees)
    return tuple(np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]).ravel())


def voxel_centres_lps(geometry: Geometry) -> np.ndarray:
    """LPS coordinates of every voxel centre, shape (z, y, x, 3)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in geometry.shape_zyx), indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    return (ijk @ geometry.ijk_to_lps().T)[..., :3]


def box_mask(geometry: Geometry) -> np.ndarray:
    """The analytic box, sampled at the voxel centres of a grid."""
    inside = np.all(np.abs(voxel_centres_lps(geometry) - BOX_CENTRE) < BOX_HALF, axis=-1)
    return inside.astype(np.uint8)


def write(array: np.ndarray, geometry: Geometry, path: Path, **metadata: str) -> Path:
    """Write an array with a geometry (and optional metadata) as an image file."""
    image = geometry.image_from_array(array)
    for key, value in metadata.items():
        image.SetMetaData(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def make_ct(folder: Path, **metadata: str) -> np.ndarray:
    """A CT of soft tissue with noise, written as folder/ct.nrrd."""
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 20, CT_GEOMETRY.shape_zyx).astype(np.int16)
    write(hu, CT_GEOMETRY, folder / "ct.nrrd", **metadata)
    return hu


@pytest.fixture()
def patient_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "pt_a"
    make_ct(folder)
    return folder


def test_structure_on_shifted_finer_rotated_grid_lands_on_the_right_ct_voxels(patient_folder: Path):
    # A grid rotated by 90 degrees, with half the CT spacing and an origin on CT voxel centres:
    # every CT voxel centre is a structure voxel centre, so nearest neighbour must be exact.
    ct_centre = np.array(CT_GEOMETRY.origin)
    structure_geometry = Geometry(
        size=(90, 100, 70), spacing=(1.0, 1.0, 1.5), origin=tuple(ct_centre + [70.0, -12.0, -6.0]),
        direction=rotation_z(90),
    )
    write(box_mask(structure_geometry), structure_geometry, patient_folder / "structures" / "Box.nrrd")
    patient = Patient.from_folder(patient_folder)
    expected = box_mask(CT_GEOMETRY)
    assert expected.sum() > 100
    np.testing.assert_array_equal(patient.structure("Box"), expected)


def test_structure_on_obliquely_rotated_grid_keeps_position_and_volume(patient_folder: Path):
    size, spacing, direction = (60, 50, 40), (0.9, 1.1, 1.3), rotation_z(30)
    half_extent = np.asarray(size) * spacing / 2  # centre the rotated grid on the box
    origin = BOX_CENTRE - np.asarray(direction).reshape(3, 3) @ half_extent
    structure_geometry = Geometry(size=size, spacing=spacing, origin=tuple(origin), direction=direction)
    source = box_mask(structure_geometry)
    write(source, structure_geometry, patient_folder / "structures" / "Box.nrrd")
    mask = Patient.from_folder(patient_folder).structure("Box")
    expected = box_mask(CT_GEOMETRY)
    dice = 2 * np.sum(mask & expected) / (mask.sum() + expected.sum())
    assert dice > 0.85
    centroid = voxel_centres_lps(CT_GEOMETRY)[mask.astype(bool)].mean(axis=0)
    np.testing.assert_allclose(centroid, BOX_CENTRE, atol=1.0)


def test_dose_on_coarser_rotated_grid_is_interpolated_linearly(patient_folder: Path):
    dose_geometry = Geometry(
        size=(40, 40, 40), spacing=(3.0, 3.5, 2.5), origin=(-20.0, -60.0, 0.0), direction=rotation_z(15)
    )
    gradient = np.array([0.2, -0.1, 0.3])  # Gy per mm

    def linear_dose(points: np.ndarray) -> np.ndarray:
        return 60.0 + (points - BOX_CENTRE) @ gradient

    write(linear_dose(voxel_centres_lps(dose_geometry)).astype(np.float32), dose_geometry,
          patient_folder / "dose.nrrd")
    patient = Patient.from_folder(patient_folder)
    dose = patient.dose()
    assert dose.dtype == np.float32 and dose.shape == CT_GEOMETRY.shape_zyx
    expected = linear_dose(voxel_centres_lps(CT_GEOMETRY))
    inside = box_mask(CT_GEOMETRY).astype(bool)  # well inside the dose grid
    np.testing.assert_allclose(dose[inside], expected[inside], atol=1e-3)


def test_structures_from_flat_layout_folder_and_segmentation_file(tmp_path: Path):
    folder = tmp_path / "pt_flat"
    make_ct(folder)
    box = box_mask(CT_GEOMETRY)
    write(box, CT_GEOMETRY, folder / "PTV70.nrrd")
    write(box, CT_GEOMETRY, folder / "possible_dose_mask.nrrd")
    write(box * 7, CT_GEOMETRY, folder / "structures" / "Heart.nrrd")
    # A Slicer-style segmentation with two segments in one layer.
    labels = box.copy()
    labels[:, :, :20] *= 2
    seg = CT_GEOMETRY.image_from_array(labels)
    for index, (name, value) in enumerate([("Left", 1), ("Right", 2)]):
        seg.SetMetaData(f"Segment{index}_ID", name)
        seg.SetMetaData(f"Segment{index}_Name", name)
        seg.SetMetaData(f"Segment{index}_LabelValue", str(value))
        seg.SetMetaData(f"Segment{index}_Layer", "0")
    sitk.WriteImage(seg, str(folder / "structures.seg.nrrd"), True)

    patient = Patient.from_folder(folder)
    assert set(patient.structure_names) == {"PTV70", "Heart", "Left", "Right"}
    np.testing.assert_array_equal(patient.structure("ptv70"), box)
    np.testing.assert_array_equal(patient.structure("Heart"), box)  # label 7 -> 1
    np.testing.assert_array_equal(patient.structure("Left") + patient.structure("Right"), box)
    assert not patient.has_dose


def test_body_from_hu_fills_lungs_and_ignores_table():
    hu = np.full((10, 60, 60), -1000, dtype=np.int16)
    yy, xx = np.mgrid[:60, :60]
    body = (yy - 28) ** 2 / 20**2 + (xx - 30) ** 2 / 25**2 < 1
    lung = (yy - 28) ** 2 / 8**2 + (xx - 20) ** 2 / 6**2 < 1
    hu[:, body] = 40
    hu[:, lung] = -850
    hu[:, 55:58, 5:55] = 200  # a couch plate, not connected to the body
    mask = body_mask_from_hu(hu)
    np.testing.assert_array_equal(mask[5], body.astype(np.uint8))


def test_patient_from_images_matches_folder(patient_folder: Path):
    write(box_mask(CT_GEOMETRY), CT_GEOMETRY, patient_folder / "structures" / "Box.nrrd")
    from_folder = Patient.from_folder(patient_folder)
    from_images = Patient.from_images(
        "pt_a", from_folder.ct_image(), {"Box": from_folder.structure_image("Box")}, source="test"
    )
    assert from_images.geometry == from_folder.geometry
    np.testing.assert_array_equal(from_images.structure("Box"), from_folder.structure("Box"))


# ---------------------------------------------------------------------- bad input
def test_missing_ct_names_the_folder(tmp_path: Path):
    folder = tmp_path / "pt_noct"
    write(box_mask(CT_GEOMETRY), CT_GEOMETRY, folder / "PTV.nrrd")
    with pytest.raises(InputError, match=r"pt_noct.*no CT found"):
        Patient.from_folder(folder)


def test_dose_only_patient_puts_structures_on_the_dose_grid(tmp_path: Path):
    # A DICOM-RT case with a single CT slice has dose and structures but no CT volume.
    folder = tmp_path / "pt_doseonly"
    write(np.full(CT_GEOMETRY.shape_zyx, 2.0, np.float32), CT_GEOMETRY, folder / "dose.nrrd")
    write(box_mask(CT_GEOMETRY), CT_GEOMETRY, folder / "structures" / "Box.nrrd")
    (tmp_path / ".pt_x.importing").mkdir()  # an importer's staging folder is not a patient
    write(np.zeros(CT_GEOMETRY.shape_zyx, np.int16), CT_GEOMETRY, tmp_path / ".pt_x.importing" / "ct.nrrd")
    cohort = Cohort.open(tmp_path)
    assert cohort.ids == ["pt_doseonly"]
    patient = cohort["pt_doseonly"]
    assert not patient.has_ct and patient.has_dose
    assert patient.geometry.isclose(CT_GEOMETRY)
    np.testing.assert_array_equal(patient.structure("Box"), box_mask(CT_GEOMETRY))
    assert patient.dose().max() == 2.0
    with pytest.raises(InputError, match="pt_doseonly has no CT volume"):
        patient.ct_array()


def test_unreadable_ct_names_the_file(tmp_path: Path):
    folder = tmp_path / "pt_broken"
    folder.mkdir()
    (folder / "ct.nrrd").write_bytes(b"NRRD0004\nthis is not a header\n")
    with pytest.raises(InputError, match=r"CT \(.*ct\.nrrd\).*cannot read"):
        Patient.from_folder(folder).ct_image()


def test_4d_ct_is_refused(tmp_path: Path):
    folder = tmp_path / "pt_4d"
    folder.mkdir()
    sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkInt16), str(folder / "ct.nrrd"))
    with pytest.raises(InputError, match="4D image"):
        Patient.from_folder(folder).ct_image()


def test_non_binary_structure_is_refused(patient_folder: Path):
    labels = box_mask(CT_GEOMETRY).astype(np.uint8)
    labels[:, :, :18] *= 2
    write(labels, CT_GEOMETRY, patient_folder / "structures" / "Multi.nrrd")
    with pytest.raises(InputError, match=r"structure Multi .*not binary.*1, 2"):
        Patient.from_folder(patient_folder).structure("Multi")


def test_empty_structure_is_refused(patient_folder: Path):
    write(np.zeros(CT_GEOMETRY.shape_zyx, np.uint8), CT_GEOMETRY, patient_folder / "structures" / "Void.nrrd")
    with pytest.raises(InputError, match=r"structure Void .*empty"):
        Patient.from_folder(patient_folder).structure("Void")


def test_structure_and_dose_outside_the_ct_are_refused(patient_folder: Path):
    far = Geometry(size=(10, 10, 10), spacing=(1.0, 1.0, 1.0), origin=(500.0, 500.0, 500.0))
    write(np.ones(far.shape_zyx, np.uint8), far, patient_folder / "structures" / "Far.nrrd")
    write(np.ones(far.shape_zyx, np.float32), far, patient_folder / "dose.nrrd")
    patient = Patient.from_folder(patient_folder)
    with pytest.raises(InputError, match=r"structure Far .*does not overlap the CT"):
        patient.structure("Far")
    with pytest.raises(InputError, match=r"dose .*does not overlap the CT"):
        patient.dose()


def test_unknown_structure_lists_the_known_ones(patient_folder: Path):
    write(box_mask(CT_GEOMETRY), CT_GEOMETRY, patient_folder / "structures" / "Box.nrrd")
    with pytest.raises(InputError, match=r"no structure named 'PTV' \(structures: Box\)"):
        Patient.from_folder(patient_folder).structure("PTV")


def test_mismatched_patient_ids_are_refused(tmp_path: Path):
    folder = tmp_path / "pt_mixed"
    make_ct(folder, PatientID="ANON001")
    write(np.ones(CT_GEOMETRY.shape_zyx, np.float32), CT_GEOMETRY, folder / "dose.nrrd", PatientID="ANON002")
    with pytest.raises(InputError, match=r"patient id 'ANON002'.*patient id 'ANON001'"):
        Patient.from_folder(folder).dose()


def test_cohort_errors(tmp_path: Path, patient_folder: Path):
    with pytest.raises(InputError, match="does not exist"):
        Cohort.open(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no patient folder"):
        Cohort.open(empty)
    with pytest.raises(InputError, match="is a patient folder, not a cohort"):
        Cohort.open(patient_folder)
    (tmp_path / "clinical.csv").write_text("patient,age\nsomeone_else,60\n")
    with pytest.raises(InputError, match="match none of the patient folders"):
        Cohort.open(tmp_path)
    (tmp_path / "clinical.csv").write_text("id,age\npt_a,60\n")
    with pytest.raises(InputError, match="no 'patient' column"):
        Cohort.open(tmp_path)
    (tmp_path / "clinical.csv").write_text("patient,age\npt_a,60\n")
    cohort = Cohort.open(tmp_path)
    assert cohort.ids == ["pt_a"] and cohort.clinical["age"].tolist() == [60]


# ---------------------------------------------------------------------- real data
@pytest.mark.shared
def test_all_openkbp_patients_load(openkbp_train: Path):
    cohort = Cohort.open(openkbp_train)
    assert len(cohort) == 170
    assert cohort.ids[:3] == ["pt_1", "pt_2", "pt_3"]
    without_dose = []
    for patient in cohort:
        info = json.loads((patient.folder / "info.json").read_text())
        assert patient.geometry.shape_zyx == (128, 128, 128)
        np.testing.assert_allclose(patient.geometry.spacing, info["spacing"], rtol=1e-6)
        assert "possible_dose_mask" not in patient.structure_names
        assert set(patient.structure_names) == set(info["structures"]) - {"possible_dose_mask"}
        if not patient.has_dose:
            without_dose.append(patient.id)
    assert without_dose == ["pt_38"]


@pytest.mark.shared
def test_openkbp_voxels_match_the_converter_statistics(openkbp_train: Path):
    cohort = Cohort.open(openkbp_train, patient_ids=["pt_1", "pt_38", "pt_100"])
    for patient in cohort:
        info = json.loads((patient.folder / "info.json").read_text())
        ct = patient.ct_array()
        assert ct.dtype == np.int16 and ct.min() == info["hu_min"] and ct.max() == info["hu_max"]
        dose = patient.dose() if patient.has_dose else None
        for name in patient.structure_names:
            mask = patient.structure(name).astype(bool)
            stats = info["structures"][name]
            assert mask.sum() == stats["voxels"]
            assert ct[mask].mean() == pytest.approx(stats["hu_mean"], abs=0.06)
            if dose is not None:
                assert dose[mask].mean() == pytest.approx(stats["dose_mean_gy"], abs=1e-3)
