"""Volume nodes <-> SimpleITK images and numpy arrays, with exact geometry; dose volumes.

SimpleITK images are in LPS, MRML nodes in RAS. The conversion flips the sign of the first two rows of the
direction matrix and of the first two origin components; spacing and voxel order (arrays in (z, y, x)) stay
the same, so values and geometry round-trip exactly. A volume under a linear transform is converted with
its world geometry.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from DeepDosimetricsLib.mrml.headless import current_scene, nodes_by_class
from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)


#: node attribute SlicerRT's DICOM-RT import sets on RTDOSE volumes (value "1")
DOSE_ATTRIBUTE = "DicomRtImport.DoseVolume"


#: LPS <-> RAS: flip the first two axes
_FLIP = np.diag([-1.0, -1.0, 1.0])


def node_label(node: Any) -> str:
    return f"node '{node.GetName()}' ({node.GetID()})"


def world_transform(node: Any) -> Optional[np.ndarray]:
    """The 4x4 linear transform from the node's RAS to world RAS, or None if it is not transformed."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return None
    if not parent.IsTransformToWorldLinear():
        raise InputError(
            f"volume {node_label(node)} is under a non-linear transform: harden the transform first"
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
    world = world_transform(node)
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


def check_scalar_volume(node: Any, role: str) -> None:
    if node is None:
        raise InputError(f"no {role} volume node given")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{role} {node_label(node)} is a {node.GetClassName()}, not a scalar volume")
    image_data = node.GetImageData()
    if image_data is None or image_data.GetNumberOfPoints() == 0:
        raise InputError(f"{role} {node_label(node)} has no voxels")
    components = image_data.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(
            f"{role} {node_label(node)} has {components} components per voxel (a 4D or vector volume); "
            "a 3D scalar volume is needed"
        )


def volume_to_image(node: Any, role: str = "volume") -> sitk.Image:
    """A copy of a scalar or labelmap volume node as a SimpleITK image with exact LPS geometry."""
    check_scalar_volume(node, role)
    image = sitk.GetImageFromArray(slicer.util.arrayFromVolume(node))  # copies the voxels once
    spacing, origin, direction = volume_geometry_lps(node)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def volume_to_array(node: Any) -> np.ndarray:
    """A copy of the node's voxels in (z, y, x) order."""
    check_scalar_volume(node, "volume")
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
    check_scalar_volume(reference_node, "reference")
    dimensions = reference_node.GetImageData().GetDimensions()
    expected = tuple(reversed(dimensions))
    if tuple(array.shape) != expected:
        raise InputError(
            f"array for node '{name}' has shape {tuple(array.shape)} but the reference "
            f"{node_label(reference_node)} has shape (z, y, x) {expected}"
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


def is_dose_volume(node: Any) -> bool:
    """True when the node carries SlicerRT's dose attribute (``DicomRtImport.DoseVolume``)."""
    return node is not None and bool(node.GetAttribute(DOSE_ATTRIBUTE))


def mark_dose_volume(node: Any) -> None:
    """Set the dose attribute, as SlicerRT's DICOM-RT import does."""
    node.SetAttribute(DOSE_ATTRIBUTE, "1")


def find_dose_volumes(scene: Any = None) -> list:
    """Scalar volume nodes of the scene marked as dose."""
    return [node for node in nodes_by_class(current_scene(scene), "vtkMRMLScalarVolumeNode") if is_dose_volume(node)]


def default_inputs(scene: Any = None) -> Tuple[Optional[Any], Optional[Any]]:
    """(first scalar volume that is not a dose, first dose volume) of the scene, None where there is none:
    what the panel picks when its CT and dose inputs are empty."""
    volumes = nodes_by_class(current_scene(scene), "vtkMRMLScalarVolumeNode")
    cts = [node for node in volumes if not is_dose_volume(node)]
    doses = [node for node in volumes if is_dose_volume(node)]
    return (cts[0] if cts else None), (doses[0] if doses else None)


def volume_center_ras(node: Any) -> Tuple[float, float, float]:
    """The RAS centre of a volume node's bounds."""
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    return tuple((bounds[2 * k] + bounds[2 * k + 1]) / 2.0 for k in range(3))


def mask_center_ras(mask: np.ndarray, reference_node: Any) -> Tuple[float, float, float]:
    """The RAS centre of mass of a (z, y, x) mask on the reference node's grid."""
    indices = np.argwhere(np.asarray(mask) > 0)
    if indices.size == 0:
        raise InputError(f"mask on {node_label(reference_node)} is empty: no centre")
    k, j, i = indices.mean(axis=0)
    matrix = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(matrix)
    ras = slicer.util.arrayFromVTKMatrix(matrix) @ np.array([i, j, k, 1.0])
    world = world_transform(reference_node)
    if world is not None:
        ras = world @ ras
    return tuple(float(c) for c in ras[:3])
