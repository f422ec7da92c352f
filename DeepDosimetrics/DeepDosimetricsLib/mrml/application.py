"""The Slicer application seen from the module: first-use installation, scene saving, and stand-ins for the
scripted-module API where only `slicer-core` exists.

``DeepDosimetrics.py`` imports Qt, CTK, the scripted-module base classes and the parameter-node wrapper from
the application. On the `slicer-core` wheel (tests, batch use) none of those exist: the module file then
takes the stand-ins below, so that its Logic and its Test run headless. The stand-ins only let the classes
be defined; nothing of the panel runs without the application.
"""

from __future__ import annotations

import logging
import os
import unittest
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import slicer

from DeepDosimetricsLib.mrml.bundles import save_scene_bundle
from DeepDosimetricsLib.mrml.headless import in_slicer_application
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError


# ------------------------------------------------------------------ the application's services
def ensure_requirements(groups: Iterable[Optional[str]] = (None,), ask_confirmation: bool = True) -> bool:
    """Install the library's missing Python requirements (``runtime.requirements``) the Slicer way.

    Asks once (``slicer.util.confirmOkCancelDisplay``; not asked outside the application or without
    ``ask_confirmation``), installs with ``slicer.util.pip_install`` at the listed versions and torch through
    the PyTorch extension; Slicer's own SimpleITK, numpy and vtk are never reinstalled. Returns False when
    the user declined.
    """
    from DeepDosimetricsLib.runtime import requirements

    def confirm(message: str) -> bool:
        if not ask_confirmation or not in_slicer_application():
            return True
        return slicer.util.confirmOkCancelDisplay(message, "DeepDosimetrics needs Python packages")

    def install_torch(spec: str) -> Any:
        try:
            import PyTorchUtils
        except ImportError:
            raise DeepDosimetricsError("install the PyTorch extension from the Extensions Manager") from None
        return PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=ask_confirmation, torchVersionRequirement=spec
        )

    return requirements.ensure(groups, confirm, lambda specs: slicer.util.pip_install(specs), install_torch)


def save_scene(path: Union[str, os.PathLike], scene: Any = None) -> Path:
    """Write the scene as a Slicer data bundle (.mrb): ``slicer.util.saveScene`` in the application, else
    :func:`mrml.bundles.save_scene_bundle` (headless)."""
    if not in_slicer_application():
        return save_scene_bundle(path, scene)
    if not slicer.util.saveScene(str(path)):
        raise DeepDosimetricsError(f"could not save the scene to {path}")
    return Path(path)


# ------------------------------------------------------------------ headless stand-ins (slicer-core only)
vtkMRMLScalarVolumeNode = getattr(slicer, "vtkMRMLScalarVolumeNode", object)
vtkMRMLSegmentationNode = getattr(slicer, "vtkMRMLSegmentationNode", object)


def parameterNodeWrapper(cls):
    """Stand-in for ``slicer.parameterNodeWrapper.parameterNodeWrapper``: the class is left as it is."""
    return cls


def Choice(choices):
    """Stand-in for ``slicer.parameterNodeWrapper.Choice`` (an annotation only)."""
    return ("Choice", tuple(choices))


def WithinRange(minimum, maximum):
    """Stand-in for ``slicer.parameterNodeWrapper.WithinRange`` (an annotation only)."""
    return ("WithinRange", minimum, maximum)


class ScriptedLoadableModule:
    """Stand-in for ``slicer.ScriptedLoadableModule.ScriptedLoadableModule``."""

    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleWidget:
    """Stand-in for ``slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget``."""

    def __init__(self, parent=None):
        self.parent = parent


class ScriptedLoadableModuleLogic:
    """Stand-in for ``slicer.ScriptedLoadableModule.ScriptedLoadableModuleLogic``."""

    def __init__(self, parent=None):
        self.parent = parent


class ScriptedLoadableModuleTest(unittest.TestCase):
    """Stand-in for ``slicer.ScriptedLoadableModule.ScriptedLoadableModuleTest``: messages go to the log."""

    def delayDisplay(self, message, msec=0):
        logging.info(message)


class VTKObservationMixin:
    """Stand-in for ``slicer.util.VTKObservationMixin`` (observes nothing)."""

    def __init__(self):
        pass

    def removeObservers(self, *args):
        pass
