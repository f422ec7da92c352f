"""Segmentations and labelmaps <-> masks: segments exported on a reference (CT) geometry, labelmaps split
by label value, masks added as segments."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from DeepDosimetricsLib.mrml.display import STRUCTURE_COLORS
from DeepDosimetricsLib.mrml.headless import current_scene
from DeepDosimetricsLib.mrml.volumes import array_to_volume, check_scalar_volume, node_label, volume_to_image
from DeepDosimetricsLib.runtime.errors import InputError


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
            f"segmentation {node_label(segmentation_node)}: its segments cannot be converted to labelmaps"
        )


def segmentation_to_arrays(
    segmentation_node: Any, reference_node: Any, names: Optional[Iterable[str]] = None
) -> Dict[str, np.ndarray]:
    """Segment name -> uint8 0/1 array (z, y, x) exported on the reference (CT) geometry.

    An empty segment, or one that does not overlap the reference volume, raises InputError.
    """
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("no segmentation node given")
    check_scalar_volume(reference_node, "CT")
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
                f"segmentation {node_label(segmentation_node)} has two segments named '{name}'"
            )
        mask = _export_segment(segmentation_node, segment_id, reference_node)
        if not mask.any():
            own = _export_segment(segmentation_node, segment_id, None)
            if own.any():
                raise InputError(
                    f"segment '{name}' of segmentation {node_label(segmentation_node)} does not overlap "
                    f"the CT {node_label(reference_node)}"
                )
            raise InputError(f"segment '{name}' of segmentation {node_label(segmentation_node)} is empty")
        result[name] = mask
    if wanted is not None:
        missing = sorted(wanted - set(result))
        if missing:
            raise InputError(
                f"segmentation {node_label(segmentation_node)} has no segment named {', '.join(missing)}"
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
        raise InputError(f"labelmap {node_label(labelmap_node)} is empty (no voxel above 0)")
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
            oriented = oriented_image_from_volume(labelmap)
            color = STRUCTURE_COLORS[index % len(STRUCTURE_COLORS)]
            segmentation_node.AddSegmentFromBinaryLabelmapRepresentation(oriented, segment_name, color)
        finally:
            if labelmap.GetDisplayNode() is not None:
                scene.RemoveNode(labelmap.GetDisplayNode())
            scene.RemoveNode(labelmap)
    return segmentation_node


def oriented_image_from_volume(volume_node: Any) -> Any:
    """The volume as a ``vtkOrientedImageData`` (a copy of its voxels with its geometry).

    ``CreateOrientedImageDataFromVolumeNode`` hands the caller ownership of a new object ("take ownership
    of the created object", its header says); the Python wrapper adds its own reference, so the creation
    reference is released here, as Slicer's own Python tests do, or one image per call would leak.
    """
    oriented = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(volume_node)
    if oriented is None:
        raise InputError(f"volume {node_label(volume_node)} cannot be converted to an oriented image")
    oriented.UnRegister(None)
    return oriented


def masks_from_node(
    mask_node: Any, reference_node: Any, structures: Optional[Iterable[str]] = None
) -> Tuple[Dict[str, sitk.Image], Dict[str, str]]:
    """Structure name -> sitk mask of a segmentation (on the reference geometry) or of a labelmap (on its
    own grid, one structure per label value), and name -> reason for segments that cannot be exported
    (empty, outside the reference).

    Raises InputError for a structure name the node does not have, or a node that is neither.
    """
    if mask_node is None:
        raise InputError("no segmentation or labelmap given")
    wanted = None if structures is None else list(structures)
    masks: Dict[str, sitk.Image] = {}
    skipped: Dict[str, str] = {}
    if mask_node.IsA("vtkMRMLSegmentationNode"):
        segmentation = mask_node.GetSegmentation()
        names = [segmentation.GetSegment(i).GetName() for i in segment_ids(mask_node)]
        if wanted is not None:
            unknown = sorted(set(wanted) - set(names))
            if unknown:
                raise InputError(f"segmentation '{mask_node.GetName()}' has no segment named {', '.join(unknown)}")
            names = [n for n in names if n in set(wanted)]
        for name in names:
            try:
                masks.update(segmentation_to_images(mask_node, reference_node, [name]))
            except InputError as error:
                skipped[name] = str(error)
    elif mask_node.IsA("vtkMRMLLabelMapVolumeNode"):
        masks = labelmap_to_images(mask_node)
        if wanted is not None:
            masks = {n: m for n, m in masks.items() if n in set(wanted)}
    else:
        raise InputError(
            f"mask node '{mask_node.GetName()}' is a {mask_node.GetClassName()}: "
            "a segmentation or a labelmap volume is needed"
        )
    return masks, skipped
