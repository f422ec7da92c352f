"""The MRML layer against a real scene (slicer-core): geometry, segments, dose, scene bundles, snapshots,
tables, bad input. One headless scene per module keeps the `import slicer` cost (3 s) paid once."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

pytestmark = pytest.mark.slicer

try:
    import slicer  # noqa: F401
    import vtk
except ImportError as error:  # pragma: no cover - slicer-core is part of the dev install
    pytest.skip(f"slicer-core is not installed ({error})", allow_module_level=True)

from DeepDosimetricsLib import mrml  # noqa: E402
from DeepDosimetricsLib.data.patient import Patient  # noqa: E402
from DeepDosimetricsLib.runtime.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def headless():
    """One wired headless scene for the module, cleared after each test by `clean_scene`."""
    wired = mrml.headless.create_headless_scene()
    yield wired
    mrml.headless.close_headless_scene(wired)


@pytest.fixture()
def scene(headless):
    """The shared scene, emptied of the nodes a test added."""
    yield headless.scene
    headless.scene.Clear(False)


@pytest.fixture(scope="module")
def patient_dir(phantom_cohort) -> Path:
    """The first phantom patient (CT, structures/, dose)."""
    return sorted(p for p in phantom_cohort.iterdir() if p.is_dir())[0]


def lps_matrix(image: sitk.Image) -> np.ndarray:
    """IJK -> LPS 4x4 of a SimpleITK image."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def load_native(path: Path, headless, labelmap: bool = False):
    """A volume read by Slicer's own reader (the Volumes logic), as the application loads files."""
    node = headless.logic("Volumes").AddArchetypeVolume(str(path), path.name.split(".")[0], 1 if labelmap else 0)
    assert node is not None, f"Slicer could not read {path}"
    return node


def oblique_image(pixel=np.int16) -> sitk.Image:
    """A small image on a rotated, anisotropic, shifted grid with distinct voxel values."""
    array = (np.arange(7 * 9 * 11).reshape(7, 9, 11) % 251 - 100).astype(pixel)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.9, 1.3, 2.7))
    image.SetOrigin((-12.5, 33.25, -7.0))
    rotation = sitk.VersorTransform((0.3, -0.2, 1.0), 0.4).GetMatrix()
    image.SetDirection(rotation)
    return image


# ---------------------------------------------------------------------------------------- geometry
def test_image_round_trip_is_exact_on_an_oblique_grid(scene):
    image = oblique_image()
    node = mrml.volumes.image_to_volume(image, "oblique", scene)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(ijk_to_ras(node), flip @ lps_matrix(image), rtol=0, atol=1e-12)
    back = mrml.volumes.volume_to_image(node)
    assert back.GetSpacing() == image.GetSpacing()
    assert back.GetOrigin() == image.GetOrigin()
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert back.GetPixelID() == image.GetPixelID()


def test_nrrd_to_patient_to_node_to_arrays(scene, headless, patient_dir):
    """NRRD -> Patient -> MRML node -> arrays: same values, IJK-to-RAS = flipped IJK-to-LPS, and the
    same as Slicer's own NRRD reader gives."""
    patient = Patient.from_folder(patient_dir)
    nodes = mrml.patients.add_patient_nodes(patient, scene)
    np.testing.assert_array_equal(mrml.volumes.volume_to_array(nodes.ct), patient.ct_array())
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    expected = flip @ lps_matrix(patient.ct_image())
    np.testing.assert_allclose(ijk_to_ras(nodes.ct), expected, rtol=0, atol=1e-9)
    native = load_native(patient_dir / "ct.nrrd", headless)
    np.testing.assert_allclose(ijk_to_ras(native), expected, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(native), patient.ct_array())
    np.testing.assert_allclose(mrml.volumes.volume_to_array(nodes.dose), patient.dose(), rtol=0, atol=0)
    back = Patient.from_images("p", mrml.volumes.volume_to_image(native), {})
    assert back.geometry.isclose(patient.geometry)


def test_transformed_volume_gives_world_geometry(scene):
    image = oblique_image()
    node = mrml.volumes.image_to_volume(image, "moved", scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)  # +10 mm towards R = -10 mm in LPS x
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = mrml.volumes.volume_to_image(node)
    np.testing.assert_allclose(np.array(moved.GetOrigin()) - image.GetOrigin(), [-10.0, 0.0, 0.0], atol=1e-9)


# ---------------------------------------------------------------------------------------- structures
def test_segments_land_on_the_nrrd_voxels(scene, headless, patient_dir):
    patient = Patient.from_folder(patient_dir)
    nodes = mrml.patients.add_patient_nodes(patient, scene)
    exported = mrml.segments.segmentation_to_arrays(nodes.segmentation, nodes.ct)
    assert list(exported) == patient.structure_names
    for name, mask in exported.items():
        np.testing.assert_array_equal(mask, patient.structure(name), err_msg=name)
    # a labelmap read by Slicer's reader, imported into a segmentation, exported on the CT
    ct = load_native(patient_dir / "ct.nrrd", headless)
    labelmap = load_native(patient_dir / "structures" / "PTV.nrrd", headless, labelmap=True)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "imported")
    assert headless.logic("Segmentations").ImportLabelmapToSegmentationNode(labelmap, segmentation)
    only = mrml.segments.segmentation_to_arrays(segmentation, ct)
    assert len(only) == 1
    np.testing.assert_array_equal(next(iter(only.values())), patient.structure("PTV"))


def test_segment_on_a_coarser_shifted_grid_is_exported_on_the_ct(scene):
    ct_image = sitk.Image(40, 30, 20, sitk.sitkInt16)
    ct_image.SetSpacing((1.0, 1.0, 2.0))
    ct = mrml.volumes.image_to_volume(ct_image, "ct", scene)
    # a box of 2 mm voxels starting 4 mm further along x (LPS): CT voxels x 10..17, y 6..13, z 4..7
    mask = sitk.Image(20, 15, 10, sitk.sitkUInt8)
    mask.SetSpacing((2.0, 2.0, 4.0))
    mask.SetOrigin((4.5, 0.5, 1.0))
    array = np.zeros((10, 15, 20), np.uint8)
    array[1:3, 3:7, 3:7] = 1
    mask = sitk.GetImageFromArray(array)
    mask.SetSpacing((2.0, 2.0, 4.0))
    mask.SetOrigin((4.5, 0.5, 1.0))
    labelmap = mrml.volumes.image_to_volume(mask, "box", scene, labelmap=True)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(labelmap)
    segmentation.AddSegmentFromBinaryLabelmapRepresentation(oriented, "box", [1.0, 0.0, 0.0])
    exported = mrml.segments.segmentation_to_arrays(segmentation, ct)["box"]
    expected = sitk.GetArrayFromImage(
        sitk.Resample(mask, ct_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    )
    np.testing.assert_array_equal(exported, expected)
    # the library's own path (Patient resampling the labelmap node) agrees
    patient = mrml.patients.patient_from_nodes(ct, labelmap_nodes=[labelmap], patient_id="box")
    np.testing.assert_array_equal(patient.structure("box"), expected)


def test_closed_surface_segment_is_rasterised_on_the_ct(scene):
    """A segmentation whose source is a surface (or planar contours, as an RTSTRUCT loads) gets its
    binary labelmap on the CT grid: a 10 mm ball centred at RAS (5, -3, 2)."""
    image = sitk.Image(60, 60, 40, sitk.sitkInt16)
    image.SetSpacing((1.0, 1.0, 1.5))
    image.SetOrigin((-30.0, -30.0, -30.0))
    ct = mrml.volumes.image_to_volume(image, "ct", scene)
    sphere = vtk.vtkSphereSource()
    sphere.SetRadius(10.0)
    sphere.SetCenter(5.0, -3.0, 2.0)
    sphere.SetThetaResolution(64)
    sphere.SetPhiResolution(64)
    sphere.Update()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    segmentation.GetSegmentation().SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    )
    segmentation.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "Ball", [1.0, 0.0, 0.0])
    ball = mrml.segments.segmentation_to_arrays(segmentation, ct)["Ball"]
    assert ball.sum() == pytest.approx(4 / 3 * np.pi * 1000 / 1.5, rel=0.03)
    # RAS (5, -3, 2) = LPS (-5, 3, 2) = voxel (x 25, y 33, z 21.33)
    np.testing.assert_allclose(np.argwhere(ball).mean(axis=0), [(2 + 30) / 1.5, 33, 25], atol=0.1)


def test_patient_from_nodes_equals_patient_from_folder(scene, patient_dir):
    reference = Patient.from_folder(patient_dir)
    nodes = mrml.patients.add_patient_nodes(reference, scene)
    patient = mrml.patients.patient_from_nodes(nodes.ct, nodes.segmentation, dose_node=nodes.dose)
    assert patient.id == reference.id  # from the subject hierarchy
    assert patient.structure_names == reference.structure_names
    np.testing.assert_array_equal(patient.ct_array(), reference.ct_array())
    for name in reference.structure_names:
        np.testing.assert_array_equal(patient.structure(name), reference.structure(name))
    np.testing.assert_allclose(patient.dose(), reference.dose(), rtol=0, atol=1e-6)


def test_labelmap_with_several_labels_gives_one_structure_per_label(scene):
    image = oblique_image(np.uint8)
    array = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
    array[1:3, 2:5, 2:6] = 1
    array[4:6, 5:8, 6:9] = 3
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(image)
    node = mrml.volumes.image_to_volume(labels, "organs", scene, labelmap=True)
    masks = mrml.segments.labelmap_to_images(node)
    assert sorted(masks) == ["organs_label_1", "organs_label_3"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(masks["organs_label_3"]), (array == 3).astype(np.uint8))


# ---------------------------------------------------------------------------------------- dose
def test_dose_attribute_marks_and_finds_dose(scene, patient_dir):
    nodes = mrml.patients.add_patient_nodes(Patient.from_folder(patient_dir), scene)
    assert nodes.dose.GetAttribute(mrml.volumes.DOSE_ATTRIBUTE) == "1"
    assert mrml.volumes.is_dose_volume(nodes.dose) and not mrml.volumes.is_dose_volume(nodes.ct)
    assert mrml.volumes.find_dose_volumes(scene) == [nodes.dose]
    display = nodes.dose.GetDisplayNode()
    assert display.GetApplyThreshold() and 0 < display.GetLowerThreshold() < 1.0
    assert scene.GetNodeByID(display.GetColorNodeID()).GetName() == mrml.display.DOSE_COLOR_NAME


def test_array_to_volume_copies_the_ct_geometry(scene):
    ct = mrml.volumes.image_to_volume(oblique_image(), "ct", scene)
    values = np.random.default_rng(0).normal(size=(7, 9, 11)).astype(np.float32)
    node = mrml.volumes.array_to_volume(values, ct, "residual", scene=scene)
    np.testing.assert_array_equal(ijk_to_ras(node), ijk_to_ras(ct))
    np.testing.assert_array_equal(mrml.volumes.volume_to_array(node), values)
    label = mrml.volumes.array_to_volume((values > 0).astype(np.uint8), ct, "label", labelmap=True, scene=scene)
    assert label.IsA("vtkMRMLLabelMapVolumeNode")


# ---------------------------------------------------------------------------------------- display
def test_residual_display_is_diverging_and_symmetric(scene):
    ct = mrml.volumes.image_to_volume(oblique_image(), "ct", scene)
    values = np.linspace(-30, 10, 7 * 9 * 11).reshape(7, 9, 11).astype(np.float32)
    residual = mrml.volumes.array_to_volume(values, ct, "residual", scene=scene)
    mrml.display.set_residual_display(residual)
    display = residual.GetDisplayNode()
    assert display.GetWindowLevelMin() == pytest.approx(-display.GetWindowLevelMax())
    assert display.GetLevel() == pytest.approx(0.0)
    table = scene.GetNodeByID(display.GetColorNodeID())
    assert table.GetName() == mrml.display.RESIDUAL_COLOR_NAME
    low, mid, high = (np.array(table.GetLookupTable().GetTableValue(i)[:3]) for i in (0, 128, 255))
    assert low[2] > low[0] and high[0] > high[2] and mid.min() > 0.9  # blue, white, red


def test_show_reconstruction_sets_every_slice_view(scene):
    ct = mrml.volumes.image_to_volume(oblique_image(), "ct", scene)
    recon = mrml.volumes.array_to_volume(mrml.volumes.volume_to_array(ct), ct, "recon", scene=scene)
    mrml.display.show_reconstruction(ct, recon, opacity=0.5)
    composites = mrml.slices.composite_nodes(scene)
    assert len(composites) == 3
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == ct.GetID()
        assert composite.GetForegroundVolumeID() == recon.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------- snapshots
def read_png(path: Path) -> np.ndarray:
    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    image = reader.GetOutput()
    width, height, _ = image.GetDimensions()
    from vtk.util.numpy_support import vtk_to_numpy

    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1]


def test_snapshots_show_the_dose_overlay(scene, patient_dir, tmp_path):
    patient = Patient.from_folder(patient_dir)
    nodes = mrml.patients.add_patient_nodes(patient, scene)
    centre = mrml.volumes.mask_center_ras(patient.structure("PTV"), nodes.ct)
    written = mrml.slices.write_snapshots(tmp_path / "snap", nodes.ct, centre, nodes.dose, 0.5)
    assert sorted(written) == ["axial", "coronal", "sagittal"]
    for path in written.values():
        assert path.stat().st_size > 1000
        pixels = read_png(path)
        assert pixels.shape == (256, 256, 3) and pixels.std() > 10
    plain = mrml.slices.slice_snapshot(nodes.ct, "axial", centre)
    overlay = mrml.slices.slice_snapshot(nodes.ct, "axial", centre, nodes.dose, 0.5)
    changed = np.any(plain[..., :3] != overlay[..., :3], axis=-1)
    assert changed.mean() > 0.02, "the dose overlay is not visible"
    coloured = np.abs(overlay[..., 0].astype(int) - overlay[..., 2].astype(int)) > 30
    assert coloured[changed].mean() > 0.5, "the overlay is not in colour"
    # (near) zero dose is transparent: there the overlay equals the CT alone
    hidden = mrml.slices.slice_snapshot(nodes.dose, "axial", centre)[..., 3] == 0
    assert 0.1 < hidden.mean() < 0.9
    assert not changed[hidden].any() and changed[~hidden].mean() > 0.9
    assert len(mrml.slices.composite_nodes(scene)) == 3, "snapshots left slice views behind"


# ---------------------------------------------------------------------------------------- tables, plots
def test_table_from_dataframe_round_trip(scene):
    frame = pd.DataFrame({"Feature": ["a", "b", "c"], "PTV": [1.5, np.nan, -2.0], "n": [1, 2, 3]})
    node = mrml.tables.table_from_dataframe(frame, "t", scene)
    back = mrml.tables.dataframe_from_table(node)
    assert list(back.columns) == ["Feature", "PTV", "n"]
    assert list(back["Feature"]) == ["a", "b", "c"]
    np.testing.assert_array_equal(back["PTV"].to_numpy(float), frame["PTV"].to_numpy(float))
    assert list(back["n"]) == [1, 2, 3]


def test_dvh_chart_has_one_series_per_structure(scene):
    axis = np.arange(0, 5.0, 0.5)
    curves = {"PTV": (axis, np.clip(100 - 10 * axis, 0, 100)), "Cord": (axis[:4], np.array([100, 50, 10, 0.0]))}
    table, chart = mrml.tables.dvh_chart(curves, "DVH", scene)
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    frame = mrml.tables.dataframe_from_table(table)
    assert list(frame.columns) == ["Dose (Gy)", "PTV", "Cord"]
    np.testing.assert_allclose(frame["PTV"], np.clip(100 - 10 * frame["Dose (Gy)"], 0, 100))
    series = chart.GetNthPlotSeriesNode(1)
    assert series.GetYColumnName() == "Cord" and series.GetTableNodeID() == table.GetID()


# ---------------------------------------------------------------------------------------- scene bundles
def test_scene_bundle_is_written_and_reopens(scene, patient_dir, tmp_path):
    patient = Patient.from_folder(patient_dir)
    nodes = mrml.patients.add_patient_nodes(patient, scene)
    residual = mrml.volumes.array_to_volume(np.zeros(patient.ct_array().shape, np.float32), nodes.ct, "residual", scene=scene)
    mrml.display.set_residual_display(residual, limit=100.0)
    mrml.display.show_reconstruction(nodes.ct, residual, None, nodes.dose, nodes.segmentation)
    path = mrml.bundles.save_scene_bundle(tmp_path / "out" / "patient.mrb", scene)
    assert path.is_file() and not list(path.parent.glob("*.part"))
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    assert "patient/patient.mrml" in names and any(n.endswith(".seg.nrrd") for n in names)

    other = mrml.headless.create_headless_scene(make_current=False)
    try:
        mrml.bundles.open_scene_bundle(path, other.scene, unpack_dir=str(tmp_path / "unpacked"))
        ct = other.scene.GetFirstNodeByName(nodes.ct.GetName())
        dose = other.scene.GetFirstNodeByName(nodes.dose.GetName())
        segmentation = other.scene.GetFirstNodeByName(nodes.segmentation.GetName())
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct), patient.ct_array())
        np.testing.assert_allclose(ijk_to_ras(ct), ijk_to_ras(nodes.ct), atol=1e-9)
        assert mrml.volumes.is_dose_volume(dose)
        assert [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                for i in range(segmentation.GetSegmentation().GetNumberOfSegments())] == patient.structure_names
        composite = mrml.slices.composite_nodes(other.scene)[0]
        assert composite.GetBackgroundVolumeID() == ct.GetID()
        assert other.scene.GetFirstNodeByName(mrml.display.RESIDUAL_COLOR_NAME) is not None
    finally:
        mrml.headless.close_headless_scene(other)


# ---------------------------------------------------------------------------------------- bad input
def test_missing_ct_node(scene):
    with pytest.raises(InputError, match="no CT volume node"):
        mrml.patients.patient_from_nodes(None)


def test_4d_volume_is_refused(scene):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "timeseries")
    slicer.util.updateVolumeFromArray(node, np.zeros((4, 5, 6, 3), np.float32))
    with pytest.raises(InputError, match=r"'timeseries'.*3 components"):
        mrml.volumes.volume_to_image(node, "CT")
    with pytest.raises(InputError, match="timeseries"):
        mrml.patients.patient_from_nodes(node)


def test_dose_node_given_as_ct_is_refused(scene, patient_dir):
    nodes = mrml.patients.add_patient_nodes(Patient.from_folder(patient_dir), scene)
    with pytest.raises(InputError, match="marked as a dose volume"):
        mrml.patients.patient_from_nodes(nodes.dose)


def test_empty_segment_and_segment_outside_the_ct(scene):
    ct = mrml.volumes.image_to_volume(oblique_image(), "ct", scene)
    segmentation = mrml.segments.add_segmentation({"inside": np.pad(np.ones((1, 1, 1), np.uint8), ((3, 3), (4, 4), (5, 5)))},
                                         ct, "seg", scene)
    segmentation.GetSegmentation().AddEmptySegment("Empty", "Empty")
    with pytest.raises(InputError, match="segment 'Empty' of segmentation node 'seg'.* is empty"):
        mrml.patients.patient_from_nodes(ct, segmentation)
    far = sitk.Image(5, 5, 5, sitk.sitkUInt8) + 1
    far.SetOrigin((500.0, 500.0, 500.0))
    elsewhere = mrml.volumes.image_to_volume(far, "far", scene, labelmap=True)
    outside = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "outside")
    oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(elsewhere)
    outside.AddSegmentFromBinaryLabelmapRepresentation(oriented, "Far", [0.0, 1.0, 0.0])
    with pytest.raises(InputError, match="segment 'Far' .* does not overlap the CT"):
        mrml.patients.patient_from_nodes(ct, outside)
    with pytest.raises(InputError, match="does not overlap the CT"):
        mrml.patients.patient_from_nodes(ct, labelmap_nodes=[elsewhere]).structure("far")


def test_array_of_the_wrong_shape_is_refused(scene):
    ct = mrml.volumes.image_to_volume(oblique_image(), "ct", scene)
    with pytest.raises(InputError, match=r"shape \(2, 2, 2\).*'ct'"):
        mrml.volumes.array_to_volume(np.zeros((2, 2, 2)), ct, "bad", scene=scene)


def test_scene_bundle_accepts_relative_paths(scene, patient_dir, tmp_path, monkeypatch):
    # MRML wants absolute bundle folders; a user's relative --out must still work.
    mrml.patients.add_patient_nodes(Patient.from_folder(patient_dir), scene)
    monkeypatch.chdir(tmp_path)
    path = mrml.bundles.save_scene_bundle(Path("relative") / "patient.mrb", scene)
    assert path.is_absolute() and path.is_file()


def test_scene_bundle_name_must_end_in_mrb(scene, tmp_path):
    with pytest.raises(InputError, match="must end in .mrb"):
        mrml.bundles.save_scene_bundle(tmp_path / "scene.zip", scene)


def test_owned_vtk_objects_are_released(scene):
    """GetNodesByClass collections and CreateOrientedImageDataFromVolumeNode images belong to the caller:
    after release only the Python reference is left (2 before, a leak per call)."""
    ct = mrml.volumes.image_to_volume(oblique_image(), "ct", scene)
    collection = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    assert collection.GetReferenceCount() == 2  # the defect: a raw call leaks one reference
    assert mrml.headless.nodes_by_class(scene, "vtkMRMLScalarVolumeNode") == [ct]
    oriented = mrml.segments.oriented_image_from_volume(ct)
    assert oriented.GetReferenceCount() == 1


def test_show_table_switches_to_a_layout_with_a_table_first(scene):
    table = mrml.tables.table_from_dataframe(pd.DataFrame({"a": [1.0]}), "t", scene)
    layout = mrml.tables.show_table(table, scene)
    assert layout == slicer.vtkSlicerTablesLogic.GetLayoutWithTable(layout)  # a layout that has a table view
    assert scene.GetFirstNodeByClass("vtkMRMLLayoutNode").GetViewArrangement() == layout
    assert mrml.headless.application_logic(scene).GetSelectionNode().GetActiveTableID() == table.GetID()


def test_roc_chart_of_predictions(scene):
    frame = pd.DataFrame({"feature_set": ["a"] * 4 + ["b"] * 4, "outcome": [0, 0, 1, 1] * 2,
                          "prediction": [0.1, 0.2, 0.8, 0.9, 0.9, 0.8, 0.2, 0.1]})
    table, chart = mrml.tables.roc_chart(frame, "ROC", scene)
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    values = mrml.tables.dataframe_from_table(table)
    fpr, tpr = values["a FPR"].to_numpy(), values["a TPR"].to_numpy()
    assert np.trapezoid(tpr, fpr) == pytest.approx(1.0)
    fpr, tpr = mrml.tables.roc_points(np.array([0, 0, 1, 1]), np.array([0.9, 0.8, 0.2, 0.1]))
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.0)
