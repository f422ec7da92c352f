"""Slice views: the background/foreground/label layers of every view, and headless slice pictures.

A temporary ``vtkMRMLSliceLogic`` blends the layers exactly as Slicer's slice views do, without OpenGL, so
overlays can be written to PNG (and tested) on machines without a display.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import slicer
import vtk

from DeepDosimetricsLib.mrml.headless import (
    current_scene,
    headless_scene_of,
    in_slicer_application,
    nodes_by_class,
)
from DeepDosimetricsLib.mrml.volumes import check_scalar_volume, volume_center_ras
from DeepDosimetricsLib.runtime.errors import InputError

#: slice orientations for snapshots
VIEWS = ("axial", "coronal", "sagittal")


def composite_nodes(scene: Any) -> list:
    """The slice composite nodes of the scene (one per slice view)."""
    return nodes_by_class(scene, "vtkMRMLSliceCompositeNode")


def ensure_slice_views(scene: Any = None) -> None:
    """Headless scenes get the Red, Yellow and Green slice views (the application has its own)."""
    scene = current_scene(scene)
    if in_slicer_application() or composite_nodes(scene):
        return
    headless = headless_scene_of(scene)
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
    for composite in composite_nodes(scene):
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(float(opacity))
        composite.SetLabelVolumeID(label.GetID() if label is not None else None)


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
    check_scalar_volume(background, "background")
    scene = background.GetScene()
    slice_logic = slicer.vtkMRMLSliceLogic()
    headless = headless_scene_of(scene)
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
        # the slice node first: a slice node left without its composite node makes a slice logic that
        # observes the scene create a new composite node for its layout name
        scene.RemoveNode(slice_node)
        scene.RemoveNode(composite)


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
