"""A headless MRML scene: the scene, its application logic and the module logics the MRML layer needs.

Inside the Slicer application ``slicer.mrmlScene`` and ``slicer.app.applicationLogic()`` are used; on the
`slicer-core` wheel :func:`create_headless_scene` wires a scene with the Colors, Volumes, Segmentations,
Tables, SubjectHierarchy and Plots logics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import slicer
import vtk

from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)

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


def headless_scene_of(scene: Any) -> Optional[HeadlessScene]:
    """The wiring of a scene made by :func:`create_headless_scene`, or None (e.g. Slicer's own scene)."""
    return _HEADLESS.get(id(scene))


def nodes_by_class(scene: Any, class_name: str) -> List[Any]:
    """The scene's nodes of a class, as a list.

    ``GetNodesByClass`` returns a new collection the caller owns: the Python wrapper adds its own
    reference, so the C++ one is released here (as ``slicer.util.getNodesByClass`` does) or every call
    would leak a collection holding references to the nodes.
    """
    collection = scene.GetNodesByClass(class_name)
    collection.UnRegister(None)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
