"""Display: colour tables (dose wash, diverging residual, structure colours), window/level, and the
inspection set-up of a reconstruction over the CT."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np
import slicer

from DeepDosimetricsLib.mrml.headless import current_scene
from DeepDosimetricsLib.mrml.slices import show_overlay
from DeepDosimetricsLib.runtime.errors import InputError

#: colour tables this module defines (the slicer-core wheel ships no colour files)
DOSE_COLOR_NAME = "DeepDosimetricsDose"


RESIDUAL_COLOR_NAME = "DeepDosimetricsResidual"


#: distinct structure colours (RGB 0..1), cycled
STRUCTURE_COLORS = (
    (0.90, 0.10, 0.10), (0.10, 0.60, 0.95), (0.95, 0.80, 0.10), (0.20, 0.80, 0.30),
    (0.80, 0.40, 0.90), (1.00, 0.55, 0.10), (0.10, 0.85, 0.85), (0.95, 0.45, 0.65),
    (0.55, 0.35, 0.20), (0.60, 0.60, 0.60),
)


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
