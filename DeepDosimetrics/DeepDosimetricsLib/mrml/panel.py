"""What the extension's scripted modules share (``DeepDosimetrics``, ``DeepDosimetricsOutcome``).

- the scripted-module API: Slicer's classes in the application, the stand-ins of :mod:`.application` on
  slicer-core (``HAS_SLICER_GUI`` says which), so the module files import headless;
- :class:`JobLogic`: the base of the modules' Logics: the scene, first-use installation, one background
  ``deepdosimetrics`` job at a time (``runtime.jobs.CliJob``);
- :class:`JobPanel`: the base of the modules' Widgets: the .ui and its parameter node, clearable path
  fields, and a job's log, progress bar, Cancel and results. A Widget adds its buttons' handlers and
  ``_checkCanApply`` (which buttons are enabled);
- :class:`ModuleTest`: the base of the modules' Test classes (a clean scene and a work folder per test,
  ``runTest`` runs every ``test_*`` method).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple

import slicer
import vtk

from DeepDosimetricsLib.mrml.application import ensure_requirements
from DeepDosimetricsLib.mrml.headless import (
    close_headless_scene,
    create_headless_scene,
    current_scene,
    in_slicer_application,
)
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError
from DeepDosimetricsLib.runtime.jobs import PARTIAL_EXIT, CliJob

try:  # the Slicer application: Qt, CTK, scripted-module base classes, parameter node wrapper
    import ctk  # noqa: F401
    import qt
    from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    HAS_SLICER_GUI = True
except ImportError:  # slicer-core (headless): the Logics and the Tests still work
    HAS_SLICER_GUI = False
    qt = None
    from DeepDosimetricsLib.mrml.application import (  # noqa: F401
        Choice,
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
        VTKObservationMixin,
        WithinRange,
        parameterNodeWrapper,
        vtkMRMLScalarVolumeNode,
        vtkMRMLSegmentationNode,
    )

__all__ = ["HAS_SLICER_GUI", "Choice", "JobLogic", "JobPanel", "ModuleTest", "ScriptedLoadableModule",
           "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest", "ScriptedLoadableModuleWidget", "VTKObservationMixin", "WithinRange",
           "is_set", "parameterNodeWrapper", "qt", "vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode"]


def is_set(path: Any) -> bool:
    """Whether a Path parameter holds a real path (an unset or cleared one reads as '' or '.')."""
    return path is not None and str(path) not in ("", ".")


class JobLogic(ScriptedLoadableModuleLogic):
    """Base of the modules' Logics (usable from the Python console and headless)."""

    def __init__(self, scene: Any = None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.currentJob: Optional[CliJob] = None
        self._requirementsChecked: set = set()

    @property
    def scene(self) -> Any:
        """The MRML scene the logic adds nodes to (the given one, else Slicer's)."""
        return current_scene(self._scene)

    def ensureRequirements(self, groups: Iterable[Optional[str]] = (None,), askConfirmation: bool = True) -> bool:
        """Install the missing Python requirements of ``groups`` (``None`` core, ``"analysis"``, ``"review"``)
        after asking once (``mrml.application.ensure_requirements``); False when the user declined."""
        key = tuple(groups)
        if key not in self._requirementsChecked and ensure_requirements(groups, askConfirmation):
            self._requirementsChecked.add(key)
        return key in self._requirementsChecked

    def runJob(self, arguments: Sequence[str], blocking: bool = False, onLine: Optional[Callable] = None,
               onProgress: Optional[Callable] = None, timeout: Optional[float] = None) -> CliJob:
        """Run ``deepdosimetrics <arguments>`` in a background process (``runtime.jobs.CliJob``).

        Not blocking (the panel): returns the started CliJob; poll it, cancel it with ``cancelJob()``.
        Blocking (console, batch): waits, returns the CliJob, raises DeepDosimetricsError if it failed. A job
        that did its work but left some patients out (exit code 1, ``job.finished``) is returned, with a
        warning in the log naming them (``job.left_out_message()``).
        """
        if self.currentJob is not None and self.currentJob.running:
            raise DeepDosimetricsError("a job is already running: cancel it or wait for it to finish")
        job = CliJob(arguments, on_line=onLine, on_progress=onProgress)
        self.currentJob = job.start()
        if blocking:
            job.wait(timeout=timeout)
            if not job.finished and not job.cancelled:
                raise DeepDosimetricsError(f"deepdosimetrics {arguments[0]} failed: {job.error_message()}")
            if job.returncode == PARTIAL_EXIT:
                logging.warning("deepdosimetrics %s %s", arguments[0], job.left_out_message())
        return job

    def cancelJob(self) -> None:
        """Cancel the running job (the whole process tree)."""
        if self.currentJob is not None:
            self.currentJob.cancel()


class JobPanel(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Base of the modules' Widgets: values move between the .ui and the parameter node, jobs are followed
    in the Progress section (``progressBar``, ``logTextEdit``, ``cancelButton``)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[JobLogic] = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._jobTimer = None
        self._onJobFinished = None  # what to do with the current job's results

    def setupPanel(self, logic: JobLogic, buttons: Sequence[Tuple[str, Callable]]) -> None:
        """Load ``UI/<module>.ui``, connect ``buttons`` ((button name, handler) pairs) and Cancel, bind the
        parameter node."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = logic
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        for name, handler in (*buttons, ("cancelButton", self.onCancel)):
            getattr(self.ui, name).connect("clicked(bool)", handler)
        self.ui.cancelButton.enabled = False
        # ctkPathLineEdit only reports valid paths, and an empty text is not one: report a cleared field
        for pathEdit in slicer.util.findChildren(uiWidget, className="ctkPathLineEdit"):
            pathEdit.connect("validInputChanged(bool)", lambda valid, edit=pathEdit: self._onPathEdited(edit))
        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(200)
        self._jobTimer.connect("timeout()", self.onJobTimer)
        self.initializeParameterNode()

    def _onPathEdited(self, pathEdit) -> None:
        """An emptied path field clears its parameter (the field's validator refuses an empty text)."""
        name = pathEdit.property("SlicerParameterName")
        if self._parameterNode and name and not pathEdit.currentPath.strip():
            setattr(self._parameterNode, name, Path(""))

    # ------------------------------------------------------------------ parameter node
    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self.logic is not None:
            self.logic.cancelJob()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    @property
    def busy(self) -> bool:
        """Whether a background job is running."""
        return self.logic is not None and self.logic.currentJob is not None and self.logic.currentJob.running

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Enable the buttons that can run now (the Widget adds its own); Cancel while a job runs."""
        self.ui.cancelButton.enabled = self.busy

    # ------------------------------------------------------------------ background jobs
    def onCancel(self) -> None:
        self.logic.cancelJob()
        self.log("Cancelled.")

    def startCommand(self, arguments: Callable, groups=(None,), onFinished: Optional[Callable] = None) -> None:
        """Run ``deepdosimetrics <arguments()>`` in the background."""
        self.startJob(lambda: self.logic.runJob(arguments()), groups, onFinished)

    def startJob(self, start: Callable, groups=(None,), onFinished: Optional[Callable] = None,
                 failure: str = "Could not start the job.") -> None:
        """Start a background job (``start()`` returns it started) and follow it: log, progress, then
        ``onFinished(job)`` when it succeeded."""
        self.ui.progressBar.value = 0
        with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
            self.logic.ensureRequirements(groups)
            job = start()
            job.on_line, job.on_progress = self.log, self._onProgress
            self.log("$ deepdosimetrics " + " ".join(job.arguments))
            self._onJobFinished = onFinished
            self._jobTimer.start()
        self._checkCanApply()

    def onJobTimer(self) -> None:
        job = self.logic.currentJob
        if job is None:
            self._jobTimer.stop()
            return
        job.poll()
        if job.running:
            return
        self._jobTimer.stop()
        finished, self._onJobFinished = self._onJobFinished, None
        try:
            if job.cancelled:
                self.log("Job cancelled.")
            elif job.finished:  # exit code 0, or 1: done, with what it left out named in its last lines
                self.ui.progressBar.value = 100
                self.log("Job finished." if job.returncode == 0 else "Job finished, with patients left out.")
                if job.returncode == PARTIAL_EXIT:
                    slicer.util.warningDisplay(f"deepdosimetrics {job.arguments[0]} finished, but left some patients "
                                               f"out:\n{job.left_out_message()}")
                if finished is not None:
                    with slicer.util.tryWithErrorDisplay("Could not show the results.", waitCursor=True):
                        finished(job)
            else:
                self.log(f"Job failed: {job.error_message()}")
                slicer.util.errorDisplay(f"deepdosimetrics {job.arguments[0]} failed: {job.error_message()}")
        finally:  # tryWithErrorDisplay re-raises: the buttons come back and the work folder goes anyway
            if job.workFolder is not None:
                shutil.rmtree(job.workFolder, ignore_errors=True)
            self._checkCanApply()

    def _onProgress(self, record: dict) -> None:
        done, total = record.get("done") or 0, record.get("total")
        if total:
            self.ui.progressBar.value = int(100 * done / total)
        extra = ", ".join(f"{k}={v}" for k, v in record.items() if k not in ("task", "done", "total"))
        self.ui.progressBar.setFormat(f"{record.get('task', '')} %p% {extra}".strip())

    def log(self, line: str) -> None:
        """Append a line to the panel's log."""
        self.ui.logTextEdit.appendPlainText(str(line))


class ModuleTest(ScriptedLoadableModuleTest):
    """Base of the modules' Test classes, after Slicer's ScriptedLoadableModuleTest conventions: ``runTest``
    (what Reload and Test and ``slicer_add_python_unittest`` call) runs every ``test_*`` method, each between
    ``setUp`` (a clean scene: Slicer's, cleared, in the application; a new headless one on slicer-core; and a
    work folder ``self.workdir``) and ``tearDown`` (the headless scene closed, the folder removed). A Test
    builds its own data there."""

    workdir: Path

    def setUp(self) -> None:
        import tempfile

        inApplication = in_slicer_application()
        if inApplication:
            slicer.mrmlScene.Clear()
        self._headless = None if inApplication else create_headless_scene()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{type(self).__name__}-"))

    def tearDown(self) -> None:
        if getattr(self, "_headless", None) is not None:
            close_headless_scene(self._headless)
            self._headless = None
        if getattr(self, "workdir", None) is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def runTest(self, **kwargs) -> None:
        """Every ``test_*`` method, each between ``setUp`` and ``tearDown`` (``kwargs``: Slicer's, unused)."""
        for name in sorted(n for n in dir(self) if n.startswith("test_") and callable(getattr(self, n))):
            self.setUp()
            try:
                getattr(self, name)()
            finally:
                self.tearDown()
