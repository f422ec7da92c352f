"""The MRML layer: Slicer scene nodes <-> Patient, sitk images and arrays; display, tables, plots, snapshots.

This is the only library module that imports `slicer`. It works in the Slicer application (where
``slicer.app`` and ``slicer.mrmlScene`` exist) and headless on the `slicer-core` wheel, where
:func:`create_headless_scene` wires a scene with the module logics the functions below need.

Geometry: SimpleITK images are in LPS, MRML nodes in RAS. The conversion flips the sign of the first
two rows of the direction matrix and of the first two origin components; spacing and voxel order
(arrays in (z, y, x)) stay the same, so values and geometry round-trip exactly.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from DeepDosimetricsLib.runtime.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from DeepDosimetricsLib.data.patient import Patient

log = logging.getLogger(__name__)

#: node attribute SlicerRT's DICOM-RT import sets on RTDOSE volumes (value "1")
DOSE_ATTRIBUTE = "DicomRtImport.DoseVolume"
#: node attribute recording which radiomics path produced a table
RADIOMICS_PATH_ATTRIBUTE = "DeepDosimetrics.RadiomicsPath"
#: colour tables this module defines (the slicer-core wheel ships no colour files)
DOSE_COLOR_NAME = "DeepDosimetricsDose"
RESIDUAL_COLOR_NAME = "DeepDosimetricsResidual"

#: LPS <-> RAS: flip the first two axes
_FLIP = np.diag([-1.0, -1.0, 1.0])

#: slice orientations for snapshots
VIEWS = ("axial", "coronal", "sagittal")

#: distinct structure colours (RGB 0..1), cycled
_STRUCTURE_COLORS = (
    (0.90, 0.10, 0.10), (0.10, 0.60, 0.95), (0.95, 0.80, 0.10), (0.20, 0.80, 0.30),
    (0.80, 0.40, 0.90), (1.00, 0.55, 0.10), (0.10, 0.85, 0.85), (0.95, 0.45, 0.65),
    (0.55, 0.35, 0.20), (0.60, 0.60, 0.60),
)


# ----------------------------------------------------------------------------------------------------
# Scene wiring
# ----------------------------------------------------------------------------------------------------
@dataclass
class HeadlessScene:
    """A scene with an application logic and the module logics volume/segmentation/table work needs."""

    scene: Any
    app_logic: Any
    logics: Dict[str, Any] = field(default_factory=dict)

    def logic(self, name: str) -> Any:
        """A module logic by name: Colors, Volumes, Segmentations, Tables, SubjectHierarchy, Plots."""
        return self.logics[name]


_HEADLESS: Dict[int, HeadlessScene] = {}


def in_slicer_application() -> bool:
    """True inside the Slicer application (slicer.app exists), False on the slicer-core wheel."""
    return getattr(slicer, "app", None) is not None


def create_headless_scene(make_current: bool = True) -> HeadlessScene:
    """A new MRML scene wired with the colour, volumes, segmentations, tables, subject-hierarchy and plots logics.

    With ``make_current`` it also becomes ``slicer.mrmlScene`` (as `slicer.util` functions expect).
    """
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    color_logic = slicer.vtkSlicerColorLogic()
    color_logic.SetMRMLApplicationLogic(app)
    # Without a Slicer home folder the colour logic logs that it cannot find default colour *files*;
    # the built-in tables are still created, so silence that one message.
    previous = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        color_logic.SetMRMLScene(scene)
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(previous)
    app.SetColorLogic(color_logic)
    app.SetModuleLogic("Colors", color_logic)
    logics = {"Colors": color_logic}
    for name, cls in (
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("Tables", slicer.vtkSlicerTablesLogic),
        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
        ("Plots", slicer.vtkSlicerPlotsLogic),
    ):
        module_logic = cls()
        module_logic.SetMRMLApplicationLogic(app)
        module_logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, module_logic)
        logics[name] = module_logic
    _add_generic_label_colors(scene)
    headless = HeadlessScene(scene=scene, app_logic=app, logics=logics)
    _HEADLESS[id(scene)] = headless
    if make_current:
        slicer.mrmlScene = scene
    return headless


def _add_generic_label_colors(scene: Any) -> None:
    """Stand in for Slicer's GenericColors file table (labelmaps' default), absent from the wheel.

    It copies the built-in Labels table and is not saved with the scene, so a scene bundle opened in
    Slicer uses Slicer's own table of that id.
    """
    labels = scene.GetNodeByID("vtkMRMLColorTableNodeLabels")
    if labels is None or scene.GetNodeByID("vtkMRMLColorTableNodeFileGenericColors.txt") is not None:
        return
    node = slicer.vtkMRMLColorTableNode()
    node.SetName("GenericColors")
    node.SetSingletonTag("FileGenericColors.txt")
    node.SetTypeToUser()
    node.SetSaveWithScene(False)
    node.SetNumberOfColors(labels.GetNumberOfColors())
    rgba = [0.0] * 4
    for index in range(labels.GetNumberOfColors()):
        labels.GetColor(index, rgba)
        node.SetColor(index, labels.GetColorName(index) or f"label_{index}", *rgba)
    scene.AddNode(node)


def close_headless_scene(headless: HeadlessScene) -> None:
    """Clear a headless scene and forget its wiring."""
    headless.scene.Clear(True)
    _HEADLESS.pop(id(headless.scene), None)
    if getattr(slicer, "mrmlScene", None) is headless.scene and not in_slicer_application():
        slicer.mrmlScene = None


def current_scene(scene: Any = None) -> Any:
    """The given scene, else ``slicer.mrmlScene``, else a new headless scene."""
    if scene is not None:
        return scene
    if getattr(slicer, "mrmlScene", None) is not None:
        return slicer.mrmlScene
    return create_headless_scene().scene


def application_logic(scene: Any = None) -> Any:
    """The application logic driving ``scene`` (Slicer's own inside the application)."""
    scene = current_scene(scene)
    headless = _HEADLESS.get(id(scene))
    if headless is not None:
        return headless.app_logic
    if in_slicer_application():
        return slicer.app.applicationLogic()
    raise InputError("the MRML scene has no application logic: create it with scene.create_headless_scene()")


# ----------------------------------------------------------------------------------------------------
# Geometry and volume conversion
# ----------------------------------------------------------------------------------------------------
def _node_label(node: Any) -> str:
    return f"node '{node.GetName()}' ({node.GetID()})"


def _world_transform(node: Any) -> Optional[np.ndarray]:
    """The 4x4 linear transform from the node's RAS to world RAS, or None if it is not transformed."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return None
    if not parent.IsTransformToWorldLinear():
        raise InputError(
            f"volume {_node_label(node)} is under a non-linear transform: harden the transform first"
        )
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def volume_geometry_lps(node: Any) -> Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
    """(spacing, origin, direction) of a volume node in ITK/LPS terms (direction row-major, 9 values)."""
    directions = np.zeros((3, 3))
    node.GetIJKToRASDirections(directions)
    spacing = np.array(node.GetSpacing(), dtype=float)
    origin = np.array(node.GetOrigin(), dtype=float)
    world = _world_transform(node)
    if world is not None:
        ijk_to_ras = np.eye(4)
        ijk_to_ras[:3, :3] = directions * spacing
        ijk_to_ras[:3, 3] = origin
        ijk_to_ras = world @ ijk_to_ras
        spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
        directions = ijk_to_ras[:3, :3] / spacing
        origin = ijk_to_ras[:3, 3]
    direction_lps = _FLIP @ directions
    origin_lps = _FLIP @ origin
    return tuple(float(s) for s in spacing), tuple(float(o) for o in origin_lps), tuple(
        float(d) for d in direction_lps.ravel()
    )


def _set_node_geometry_from_image(node: Any, image: sitk.Image) -> None:
    direction_ras = _FLIP @ np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    node.SetSpacing(*image.GetSpacing())
    node.SetOrigin(*(_FLIP @ np.array(image.GetOrigin(), dtype=float)))
    node.SetIJKToRASDirections(direction_ras)


def _check_scalar_volume(node: Any, role: str) -> None:
    if node is None:
        raise InputError(f"no {role} volume node given")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{role} {_node_label(node)} is a {node.GetClassName()}, not a scalar volume")
    image_data = node.GetImageData()
    if image_data is None or image_data.GetNumberOfPoints() == 0:
        raise InputError(f"{role} {_node_label(node)} has no voxels")
    components = image_data.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(
            f"{role} {_node_label(node)} has {components} components per voxel (a 4D or vector volume); "
            "a 3D scalar volume is needed"
        )


def volume_to_image(node: Any, role: str = "volume") -> sitk.Image:
    """A copy of a scalar or labelmap volume node as a SimpleITK image with exact LPS geometry."""
    _check_scalar_volume(node, role)
    image = sitk.GetImageFromArray(slicer.util.arrayFromVolume(node))  # copies the voxels once
    spacing, origin, direction = volume_geometry_lps(node)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def volume_to_array(node: Any) -> np.ndarray:
    """A copy of the node's voxels in (z, y, x) order."""
    _check_scalar_volume(node, "volume")
    return np.array(slicer.util.arrayFromVolume(node), copy=True)


def image_to_volume(
    image: sitk.Image, name: str, scene: Any = None, labelmap: bool = False, dose: bool = False
) -> Any:
    """A new scalar (or labelmap) volume node holding a copy of ``image`` with its geometry in RAS."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"image for node '{name}' is {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components; a 3D scalar image is needed"
        )
    scene = current_scene(scene)
    node = scene.AddNewNodeByClass(
        "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name
    )
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayViewFromImage(image))  # copies the voxels once
    _set_node_geometry_from_image(node, image)
    node.CreateDefaultDisplayNodes()
    if dose:
        mark_dose_volume(node)
    return node


def array_to_volume(
    array: np.ndarray,
    reference_node: Any,
    name: str,
    labelmap: bool = False,
    scene: Any = None,
    dose: bool = False,
) -> Any:
    """A new volume node holding ``array`` (z, y, x) on the geometry of ``reference_node`` (e.g. the CT)."""
    _check_scalar_volume(reference_node, "reference")
    dimensions = reference_node.GetImageData().GetDimensions()
    expected = tuple(reversed(dimensions))
    if tuple(array.shape) != expected:
        raise InputError(
            f"array for node '{name}' has shape {tuple(array.shape)} but the reference "
            f"{_node_label(reference_node)} has shape (z, y, x) {expected}"
        )
    scene = current_scene(scene)
    node = scene.AddNewNodeByClass(
        "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name
    )
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.CopyOrientation(reference_node)
    if reference_node.GetParentTransformNode() is not None:
        node.SetAndObserveTransformNodeID(reference_node.GetParentTransformNode().GetID())
    node.CreateDefaultDisplayNodes()
    if dose:
        mark_dose_volume(node)
    return node


# ----------------------------------------------------------------------------------------------------
# Dose volumes
# ----------------------------------------------------------------------------------------------------
def is_dose_volume(node: Any) -> bool:
    """True when the node carries SlicerRT's dose attribute (``DicomRtImport.DoseVolume``)."""
    return node is not None and bool(node.GetAttribute(DOSE_ATTRIBUTE))


def mark_dose_volume(node: Any) -> None:
    """Set the dose attribute, as SlicerRT's DICOM-RT import does."""
    node.SetAttribute(DOSE_ATTRIBUTE, "1")


def find_dose_volumes(scene: Any = None) -> list:
    """Scalar volume nodes of the scene marked as dose."""
    nodes = current_scene(scene).GetNodesByClass("vtkMRMLScalarVolumeNode")
    found = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
    return [node for node in found if is_dose_volume(node)]


# ----------------------------------------------------------------------------------------------------
# Segmentations and labelmaps
# ----------------------------------------------------------------------------------------------------
def segment_ids(segmentation_node: Any) -> list:
    """The ids of the node's segments, in order."""
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def _export_segment(segmentation_node: Any, segment_id: str, reference_node: Any = None) -> np.ndarray:
    """One segment as a (z, y, x) uint8 array on the reference geometry (own extent without reference)."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__deepdosimetrics_export")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if reference_node is None:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap
            )
        else:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_node
            )
        if not ok or labelmap.GetImageData() is None:
            return np.zeros((0, 0, 0), np.uint8)
        return (slicer.util.arrayFromVolume(labelmap) > 0).astype(np.uint8)
    finally:
        display = labelmap.GetDisplayNode()
        if display is not None:
            scene.RemoveNode(display)
        scene.RemoveNode(labelmap)


def _ensure_binary_labelmaps(segmentation_node: Any, reference_node: Any) -> None:
    """Rasterise contour/surface segments (e.g. an RTSTRUCT) on the CT geometry, as SlicerRT does.

    Without a reference geometry the converter picks a fine grid of its own (slow, large), and the
    export then resamples it: set the CT as reference first.
    """
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation_node.GetSegmentation().ContainsRepresentation(binary):
        return
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    if not segmentation_node.CreateBinaryLabelmapRepresentation():
        raise InputError(
            f"segmentation {_node_label(segmentation_node)}: its segments cannot be converted to labelmaps"
        )


def segmentation_to_arrays(
    segmentation_node: Any, reference_node: Any, names: Optional[Iterable[str]] = None
) -> Dict[str, np.ndarray]:
    """Segment name -> uint8 0/1 array (z, y, x) exported on the reference (CT) geometry.

    An empty segment, or one that does not overlap the reference volume, raises InputError.
    """
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("no segmentation node given")
    _check_scalar_volume(reference_node, "CT")
    segmentation = segmentation_node.GetSegmentation()
    _ensure_binary_labelmaps(segmentation_node, reference_node)
    wanted = None if names is None else set(names)
    result: Dict[str, np.ndarray] = {}
    for segment_id in segment_ids(segmentation_node):
        name = segmentation.GetSegment(segment_id).GetName()
        if wanted is not None and name not in wanted:
            continue
        if name in result:
            raise InputError(
                f"segmentation {_node_label(segmentation_node)} has two segments named '{name}'"
            )
        mask = _export_segment(segmentation_node, segment_id, reference_node)
        if not mask.any():
            own = _export_segment(segmentation_node, segment_id, None)
            if own.any():
                raise InputError(
                    f"segment '{name}' of segmentation {_node_label(segmentation_node)} does not overlap "
                    f"the CT {_node_label(reference_node)}"
                )
            raise InputError(f"segment '{name}' of segmentation {_node_label(segmentation_node)} is empty")
        result[name] = mask
    if wanted is not None:
        missing = sorted(wanted - set(result))
        if missing:
            raise InputError(
                f"segmentation {_node_label(segmentation_node)} has no segment named {', '.join(missing)}"
            )
    return result


def segmentation_to_images(
    segmentation_node: Any, reference_node: Any, names: Optional[Iterable[str]] = None
) -> Dict[str, sitk.Image]:
    """Segment name -> sitk uint8 mask on the reference (CT) geometry (see :func:`segmentation_to_arrays`)."""
    reference = volume_to_image(reference_node, "CT")
    images = {}
    for name, mask in segmentation_to_arrays(segmentation_node, reference_node, names).items():
        image = sitk.GetImageFromArray(mask)
        image.CopyInformation(reference)
        images[name] = image
    return images


def labelmap_to_images(labelmap_node: Any) -> Dict[str, sitk.Image]:
    """Structures of a labelmap node, on the labelmap's own grid, as uint8 0/1 masks.

    A labelmap with one label value gives one structure named after the node; several label values
    give ``<node>_label_<value>`` (as SlicerRadiomics names them).
    """
    image = volume_to_image(labelmap_node, "labelmap")
    array = sitk.GetArrayViewFromImage(image)
    values = [int(v) for v in np.unique(array) if v != 0]
    if not values:
        raise InputError(f"labelmap {_node_label(labelmap_node)} is empty (no voxel above 0)")
    masks = {}
    for value in values:
        name = labelmap_node.GetName() if len(values) == 1 else f"{labelmap_node.GetName()}_label_{value}"
        mask = sitk.GetImageFromArray((array == value).astype(np.uint8))
        mask.CopyInformation(image)
        masks[name] = mask
    return masks


def add_segmentation(
    masks: Mapping[str, np.ndarray], reference_node: Any, name: str = "Structures", scene: Any = None
) -> Any:
    """A new segmentation node with one segment per (z, y, x) 0/1 mask on the reference geometry."""
    scene = current_scene(scene)
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    for index, (segment_name, mask) in enumerate(masks.items()):
        labelmap = array_to_volume(
            np.asarray(mask, dtype=np.uint8), reference_node, "__deepdosimetrics_import", True, scene
        )
        try:
            oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(labelmap)
            color = _STRUCTURE_COLORS[index % len(_STRUCTURE_COLORS)]
            segmentation_node.AddSegmentFromBinaryLabelmapRepresentation(oriented, segment_name, color)
        finally:
            if labelmap.GetDisplayNode() is not None:
                scene.RemoveNode(labelmap.GetDisplayNode())
            scene.RemoveNode(labelmap)
    return segmentation_node


# ----------------------------------------------------------------------------------------------------
# Patient <-> nodes
# ----------------------------------------------------------------------------------------------------
def _patient_id_for(ct_node: Any) -> str:
    """The subject-hierarchy patient name above the CT, else the CT node's name."""
    scene = ct_node.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene) if scene else None
    if hierarchy is not None:
        item = hierarchy.GetItemByDataNode(ct_node)
        while item and item != hierarchy.GetSceneItemID():
            if hierarchy.GetItemLevel(item) == "Patient":
                return hierarchy.GetItemName(item)
            item = hierarchy.GetItemParent(item)
    return ct_node.GetName()


def patient_from_nodes(
    ct_node: Any,
    segmentation_node: Any = None,
    labelmap_nodes: Sequence[Any] = (),
    dose_node: Any = None,
    patient_id: Optional[str] = None,
) -> Patient:
    """The same `Patient` the library reads from files, built from scene nodes.

    Segments are exported on the CT geometry; labelmap and dose nodes keep their own grid and are
    resampled onto the CT grid by `Patient` (nearest neighbour for masks, linear for dose).
    """
    from DeepDosimetricsLib.data.patient import Patient

    if ct_node is None:
        raise InputError("no CT volume node selected")
    if is_dose_volume(ct_node):
        raise InputError(f"the CT {_node_label(ct_node)} is marked as a dose volume ({DOSE_ATTRIBUTE})")
    ct = volume_to_image(ct_node, "CT")
    structures: Dict[str, sitk.Image] = {}
    if segmentation_node is not None:
        structures.update(segmentation_to_images(segmentation_node, ct_node))
    for labelmap_node in labelmap_nodes:
        for name, mask in labelmap_to_images(labelmap_node).items():
            if name in structures:
                raise InputError(f"structure '{name}' is given twice (labelmap {_node_label(labelmap_node)})")
            structures[name] = mask
    dose = None
    if dose_node is not None:
        if not is_dose_volume(dose_node):
            log.info("dose %s has no %s attribute; used as dose anyway", _node_label(dose_node), DOSE_ATTRIBUTE)
        dose = sitk.Cast(volume_to_image(dose_node, "dose"), sitk.sitkFloat32)
    pid = patient_id or _patient_id_for(ct_node)
    return Patient.from_images(pid, ct, structures, dose=dose, source=f"MRML scene, CT {_node_label(ct_node)}")


@dataclass
class PatientNodes:
    """The nodes that show one patient: CT, structures as a segmentation, dose (or None)."""

    patient_id: str
    ct: Any
    segmentation: Any = None
    dose: Any = None


def add_patient_nodes(patient: Patient, scene: Any = None, structures: Optional[Sequence[str]] = None) -> PatientNodes:
    """Add a Patient to the scene: CT volume, a segmentation of its structures, the dose volume (marked)."""
    scene = current_scene(scene)
    ct_node = image_to_volume(patient.ct_image(), f"{patient.id} CT", scene)
    set_ct_display(ct_node)
    names = list(patient.structure_names if structures is None else structures)
    segmentation_node = None
    if names:
        masks = {name: patient.structure(name) for name in names}
        segmentation_node = add_segmentation(masks, ct_node, f"{patient.id} structures", scene)
    dose_node = None
    if patient.has_dose:
        dose_node = image_to_volume(patient.dose_image(), f"{patient.id} dose", scene, dose=True)
        set_dose_display(dose_node)
    _place_in_hierarchy(scene, patient.id, [ct_node, segmentation_node, dose_node])
    return PatientNodes(patient.id, ct_node, segmentation_node, dose_node)


def load_patient_folder(path: Union[str, os.PathLike], scene: Any = None) -> PatientNodes:
    """Read a patient folder (canonical or flat layout) into CT, segmentation and dose nodes."""
    from DeepDosimetricsLib.data.patient import Patient

    return add_patient_nodes(Patient.from_folder(path), scene)


def _place_in_hierarchy(scene: Any, patient_id: str, nodes: Sequence[Any]) -> None:
    """Group the nodes under a subject-hierarchy patient item (as the DICOM browser does)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    patient_item = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), patient_id)
    for node in nodes:
        if node is None:
            continue
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, patient_item)
        else:  # headless: no subject-hierarchy plugins create the items
            hierarchy.CreateItem(patient_item, node)


# ----------------------------------------------------------------------------------------------------
# Display: colour tables, window/level, overlays
# ----------------------------------------------------------------------------------------------------
def _color_table(scene: Any, name: str, stops: Sequence[Tuple[float, Tuple[float, float, float]]]) -> Any:
    """A 256-entry colour table interpolated between (position 0..1, RGB) stops; reused by name."""
    existing = scene.GetFirstNodeByName(name)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    positions = np.array([p for p, _ in stops])
    colors = np.array([c for _, c in stops])
    for index, t in enumerate(np.linspace(0.0, 1.0, 256)):
        rgb = [float(np.interp(t, positions, colors[:, k])) for k in range(3)]
        node.SetColor(index, f"{index}", rgb[0], rgb[1], rgb[2], 1.0)
    node.SetAttribute("Category", "DeepDosimetrics")
    return node


def dose_color_table(scene: Any = None) -> Any:
    """A dose colour wash (blue - cyan - green - yellow - red), like treatment-planning displays."""
    return _color_table(
        current_scene(scene),
        DOSE_COLOR_NAME,
        [(0.0, (0.0, 0.0, 0.55)), (0.2, (0.0, 0.3, 1.0)), (0.4, (0.0, 0.9, 0.9)), (0.6, (0.2, 0.9, 0.2)),
         (0.8, (1.0, 0.9, 0.0)), (1.0, (0.9, 0.0, 0.0))],
    )


def residual_color_table(scene: Any = None) -> Any:
    """A diverging blue - white - red table; with a window symmetric around 0, white means no error."""
    return _color_table(
        current_scene(scene),
        RESIDUAL_COLOR_NAME,
        [(0.0, (0.23, 0.30, 0.75)), (0.5, (0.97, 0.97, 0.97)), (1.0, (0.71, 0.02, 0.15))],
    )


def _display_node(node: Any) -> Any:
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node.GetDisplayNode()


def set_ct_display(node: Any, window: float = 400.0, level: float = 40.0) -> None:
    """Grey CT display with a fixed window/level (soft tissue by default)."""
    display = _display_node(node)
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    display.AutoWindowLevelOff()
    display.SetWindowLevel(window, level)


def set_dose_display(node: Any, maximum: Optional[float] = None, hide_below: Optional[float] = None) -> None:
    """Dose colour wash from 0 to ``maximum`` Gy (default: the volume's maximum); voxels below
    ``hide_below`` (default: 1% of the maximum, so zero dose) are transparent as a foreground."""
    display = _display_node(node)
    if maximum is None:
        maximum = float(np.max(slicer.util.arrayFromVolume(node))) or 1.0
    if hide_below is None:
        hide_below = 0.01 * maximum
    display.SetAndObserveColorNodeID(dose_color_table(node.GetScene()).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, maximum)
    display.AutoThresholdOff()
    display.SetThreshold(hide_below, max(maximum, hide_below) * 1000.0 + 1.0)
    display.ApplyThresholdOn()


def set_residual_display(node: Any, limit: Optional[float] = None) -> None:
    """Diverging colours with a window symmetric around zero: [-limit, +limit]
    (default: the 99th percentile of |residual|)."""
    display = _display_node(node)
    if limit is None:
        values = np.abs(slicer.util.arrayFromVolume(node))
        limit = float(np.percentile(values, 99)) if values.size else 1.0
        limit = limit or float(values.max()) or 1.0
    display.SetAndObserveColorNodeID(residual_color_table(node.GetScene()).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(-limit, limit)
    display.ApplyThresholdOff()


def _composite_nodes(scene: Any) -> list:
    nodes = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def ensure_slice_views(scene: Any = None) -> None:
    """Headless scenes get the Red, Yellow and Green slice views (the application has its own)."""
    scene = current_scene(scene)
    if in_slicer_application() or _composite_nodes(scene):
        return
    headless = _HEADLESS.get(id(scene))
    logics = vtk.vtkCollection()
    for layout_name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        slice_logic = slicer.vtkMRMLSliceLogic()
        if headless is not None:
            slice_logic.SetMRMLApplicationLogic(headless.app_logic)
        slice_logic.SetMRMLScene(scene)
        slice_node = slice_logic.AddSliceNode(layout_name)
        slice_node.SetOrientation(orientation)
        logics.AddItem(slice_logic)
    if headless is not None:
        headless.app_logic.SetSliceLogics(logics)
        headless.logics["Slices"] = logics


def show_overlay(
    background: Any,
    foreground: Any = None,
    opacity: float = 0.5,
    label: Any = None,
    scene: Any = None,
) -> None:
    """Every slice view: ``background`` below, ``foreground`` at ``opacity``, ``label`` as label layer."""
    scene = current_scene(scene if scene is not None else background.GetScene())
    ensure_slice_views(scene)
    for composite in _composite_nodes(scene):
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(float(opacity))
        composite.SetLabelVolumeID(label.GetID() if label is not None else None)


def show_reconstruction(
    ct_node: Any,
    reconstruction_node: Any = None,
    residual_node: Any = None,
    dose_node: Any = None,
    segmentation_node: Any = None,
    opacity: float = 0.5,
) -> None:
    """Inspection set-up: CT background, reconstruction foreground at ``opacity``, residual with the
    diverging map, dose with the dose map hiding zero, structures shown as outlines."""
    if ct_node is None:
        raise InputError("no CT volume node selected")
    set_ct_display(ct_node)
    if reconstruction_node is not None:
        ct_display = ct_node.GetDisplayNode()
        display = _display_node(reconstruction_node)
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
        display.AutoWindowLevelOff()
        display.SetWindowLevel(ct_display.GetWindow(), ct_display.GetLevel())
    if residual_node is not None:
        set_residual_display(residual_node)
    if dose_node is not None:
        set_dose_display(dose_node)
    if segmentation_node is not None:
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_display = segmentation_node.GetDisplayNode()
        segmentation_display.SetVisibility2DFill(False)
        segmentation_display.SetVisibility2DOutline(True)
    foreground = reconstruction_node or dose_node or residual_node
    show_overlay(ct_node, foreground, opacity)


# ----------------------------------------------------------------------------------------------------
# Tables and plots
# ----------------------------------------------------------------------------------------------------
def table_from_dataframe(
    frame: pd.DataFrame, name: str = "Table", scene: Any = None, table_node: Any = None
) -> Any:
    """A table node holding the DataFrame's columns (numbers as doubles/integers, the rest as text)."""
    import pandas as pd

    scene = current_scene(scene if table_node is None else table_node.GetScene())
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = vtk.vtkTable()
    for column in frame.columns:
        values = frame[column]
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_integer_dtype(values):
            array = vtk.vtkLongLongArray() if values.notna().all() else vtk.vtkDoubleArray()
            for value in values:
                array.InsertNextValue(value if pd.notna(value) else float("nan"))
        elif pd.api.types.is_float_dtype(values):
            array = vtk.vtkDoubleArray()
            for value in values.to_numpy(dtype=float):
                array.InsertNextValue(float(value))
        else:
            array = vtk.vtkStringArray()
            for value in values:
                array.InsertNextValue("" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value))
        array.SetName(str(column))
        table.AddColumn(array)
    table_node.SetAndObserveTable(table)
    table_node.Modified()
    return table_node


def dataframe_from_table(table_node: Any) -> pd.DataFrame:
    """The table node's content as a DataFrame (a copy)."""
    return slicer.util.dataframeFromTable(table_node)


def dvh_chart(
    curves: Mapping[str, Tuple[np.ndarray, np.ndarray]],
    name: str = "DVH",
    scene: Any = None,
) -> Tuple[Any, Any]:
    """Cumulative DVH curves (structure -> (dose Gy, volume %)) as a table node and a plot chart node.

    The table has a ``Dose (Gy)`` column and one ``<structure>`` column of volume % per structure,
    all on one dose axis (curves given on different axes are interpolated onto the union).
    """
    import pandas as pd

    scene = current_scene(scene)
    if not curves:
        raise InputError("no DVH curves to plot (no structure overlaps the dose)")
    axes = [np.asarray(dose, dtype=float) for dose, _ in curves.values()]
    same_axis = all(a.shape == axes[0].shape and np.array_equal(a, axes[0]) for a in axes)
    dose_axis = axes[0] if same_axis else np.unique(np.concatenate(axes))
    columns: Dict[str, np.ndarray] = {"Dose (Gy)": dose_axis}
    for structure, (dose, volume) in curves.items():
        dose = np.asarray(dose, dtype=float)
        volume = np.asarray(volume, dtype=float)
        columns[structure] = volume if same_axis else np.interp(dose_axis, dose, volume, right=0.0)
    table_node = table_from_dataframe(pd.DataFrame(columns), f"{name} table", scene)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.SetTitle("Cumulative dose-volume histogram")
    chart.SetXAxisTitle("Dose (Gy)")
    chart.SetYAxisTitle("Volume (%)")
    for index, structure in enumerate(curves):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {structure}")
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName("Dose (Gy)")
        series.SetYColumnName(structure)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetColor(*_STRUCTURE_COLORS[index % len(_STRUCTURE_COLORS)])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return table_node, chart


# ----------------------------------------------------------------------------------------------------
# Scene files
# ----------------------------------------------------------------------------------------------------
def save_scene_bundle(path: Union[str, os.PathLike], scene: Any = None) -> Path:
    """Write the scene and its data as a Slicer data bundle (``.mrb``), atomically."""
    path = Path(path).absolute()  # MRML refuses relative bundle folders
    if path.suffix.lower() != ".mrb":
        raise InputError(f"scene bundle {path} must end in .mrb")
    scene = current_scene(scene)
    path.parent.mkdir(parents=True, exist_ok=True)
    app_logic = application_logic(scene)
    with tempfile.TemporaryDirectory(prefix="deepdosimetrics-mrb-", dir=path.parent) as work:
        bundle_dir = Path(work) / path.stem
        bundle_dir.mkdir()
        if not app_logic.SaveSceneToSlicerDataBundleDirectory(str(bundle_dir), None):
            raise InputError(f"could not write the scene bundle {path}")
        partial = Path(work) / (path.name + ".part")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(bundle_dir.rglob("*")):
                if file.is_file():
                    # volumes and segmentations are gzip-compressed by their writers already
                    stored = file.name.endswith((".nrrd", ".nii.gz", ".mha"))
                    archive.write(
                        file, str(Path(path.stem) / file.relative_to(bundle_dir)),
                        compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED,
                    )
        os.replace(partial, path)
    return path


def open_scene_bundle(path: Union[str, os.PathLike], scene: Any = None, unpack_dir: Optional[str] = None) -> Any:
    """Load a ``.mrb`` into the scene (unpacked to ``unpack_dir``, default a new temporary folder)."""
    path = Path(path).absolute()
    if not path.is_file():
        raise InputError(f"scene bundle {path} does not exist")
    scene = current_scene(scene)
    unpack = Path(unpack_dir).absolute() if unpack_dir else Path(tempfile.mkdtemp(prefix="deepdosimetrics-open-"))
    unpack.mkdir(parents=True, exist_ok=True)
    if not application_logic(scene).OpenSlicerDataBundle(str(path), str(unpack)):
        raise InputError(f"could not open the scene bundle {path}")
    return scene


# ----------------------------------------------------------------------------------------------------
# Headless slice snapshots
# ----------------------------------------------------------------------------------------------------
def slice_snapshot(
    background: Any,
    view: str = "axial",
    ras_point: Optional[Sequence[float]] = None,
    foreground: Any = None,
    opacity: float = 0.5,
    label: Any = None,
    size: int = 256,
) -> np.ndarray:
    """The blended slice image (RGBA uint8, rows top to bottom) through ``ras_point`` as Slicer draws it.

    Uses a temporary ``vtkMRMLSliceLogic`` (no OpenGL needed); the scene is left as it was.
    """
    from vtk.util.numpy_support import vtk_to_numpy

    if view not in VIEWS:
        raise InputError(f"unknown view '{view}': use one of {', '.join(VIEWS)}")
    _check_scalar_volume(background, "background")
    scene = background.GetScene()
    slice_logic = slicer.vtkMRMLSliceLogic()
    headless = _HEADLESS.get(id(scene))
    if headless is not None:
        slice_logic.SetMRMLApplicationLogic(headless.app_logic)
    elif in_slicer_application():
        slice_logic.SetMRMLApplicationLogic(slicer.app.applicationLogic())
    slice_logic.SetMRMLScene(scene)
    slice_node = slice_logic.AddSliceNode(f"DeepDosimetricsSnapshot{view.capitalize()}")
    composite = slice_logic.GetSliceCompositeNode()
    try:
        slice_node.SetOrientation(view.capitalize())
        slice_node.SetDimensions(size, size, 1)
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(float(opacity))
        composite.SetLabelVolumeID(label.GetID() if label is not None else None)
        slice_logic.FitSliceToBackground(size, size)
        if ras_point is not None:
            slice_node.JumpSliceByOffsetting(*[float(c) for c in ras_point])
        slice_logic.UpdatePipeline()
        producer = slice_logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        width, height, _ = image.GetDimensions()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
        return np.ascontiguousarray(pixels[::-1]).astype(np.uint8)
    finally:
        slice_logic.SetMRMLScene(None)
        scene.RemoveNode(composite)
        scene.RemoveNode(slice_node)


def opaque_rgb(rgba: np.ndarray) -> np.ndarray:
    """RGB on black, as Slicer shows a slice: pixels outside the volume (alpha 0) become black."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return np.round(rgba[..., :3].astype(np.float32) * alpha).astype(np.uint8)


def write_png(rgba: np.ndarray, path: Union[str, os.PathLike]) -> Path:
    """Write an RGBA/RGB uint8 image (rows top to bottom) as PNG, atomically."""
    from vtk.util.numpy_support import numpy_to_vtk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width, channels = rgba.shape
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    flat = np.ascontiguousarray(rgba[::-1]).reshape(-1, channels)
    image.GetPointData().SetScalars(numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    partial = path.with_name(path.name + ".part.png")
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(partial))
    writer.SetInputData(image)
    writer.Write()
    os.replace(partial, path)
    return path


def volume_center_ras(node: Any) -> Tuple[float, float, float]:
    """The RAS centre of a volume node's bounds."""
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    return tuple((bounds[2 * k] + bounds[2 * k + 1]) / 2.0 for k in range(3))


def mask_center_ras(mask: np.ndarray, reference_node: Any) -> Tuple[float, float, float]:
    """The RAS centre of mass of a (z, y, x) mask on the reference node's grid."""
    indices = np.argwhere(np.asarray(mask) > 0)
    if indices.size == 0:
        raise InputError(f"mask on {_node_label(reference_node)} is empty: no centre")
    k, j, i = indices.mean(axis=0)
    matrix = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(matrix)
    ras = slicer.util.arrayFromVTKMatrix(matrix) @ np.array([i, j, k, 1.0])
    world = _world_transform(reference_node)
    if world is not None:
        ras = world @ ras
    return tuple(float(c) for c in ras[:3])


def write_snapshots(
    out_prefix: Union[str, os.PathLike],
    background: Any,
    ras_point: Optional[Sequence[float]] = None,
    foreground: Any = None,
    opacity: float = 0.5,
    label: Any = None,
    views: Sequence[str] = VIEWS,
    size: int = 256,
) -> Dict[str, Path]:
    """PNG snapshots ``<prefix>_<view>.png`` through ``ras_point`` (default: the background's centre)."""
    if ras_point is None:
        ras_point = volume_center_ras(background)
    written = {}
    for view in views:
        rgba = slice_snapshot(background, view, ras_point, foreground, opacity, label, size)
        written[view] = write_png(opaque_rgb(rgba), f"{os.fspath(out_prefix)}_{view}.png")
    return written


def remove_nodes(nodes: Iterable[Any]) -> None:
    """Remove nodes (and their display/storage nodes) from their scene; None entries are skipped."""
    for node in nodes:
        if node is None or node.GetScene() is None:
            continue
        scene = node.GetScene()
        if hasattr(node, "GetNumberOfDisplayNodes"):
            for index in reversed(range(node.GetNumberOfDisplayNodes())):
                display = node.GetNthDisplayNode(index)
                if display is not None:
                    scene.RemoveNode(display)
        scene.RemoveNode(node)
