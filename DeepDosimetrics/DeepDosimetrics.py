"""DeepDosimetrics: deep-learning dosimetrics in 3D Slicer (module, parameter node, widget, logic and test).

The module is thin. The computation lives in ``DeepDosimetricsLib`` (a Slicer-free library with the
``deepdosimetrics`` command line), the MRML conversions in ``DeepDosimetricsLib.mrml``, the background
process runner in ``DeepDosimetricsLib.runtime.jobs``. The Logic works from the Python console and
headless (``slicer-core``): the Qt/CTK imports below are guarded, and ``mrml.application`` stands in for
the scripted-module classes where only the MRML classes exist.
"""

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Dict, Optional

import slicer
import vtk
from DeepDosimetricsLib import mrml
from DeepDosimetricsLib.analysis.protocol import MODELS, ProtocolSettings
from DeepDosimetricsLib.deep.channels import CHANNEL_SETS
from DeepDosimetricsLib.deep.encode.settings import DEFAULT_OVERLAP
from DeepDosimetricsLib.deep.train.training import TrainConfig
from DeepDosimetricsLib.features.radiomics import DEFAULT_PRESET, preset_names
from DeepDosimetricsLib.runtime.devices import DEFAULT_DEVICE, DEVICES
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError, InputError
from DeepDosimetricsLib.runtime.jobs import CliJob, cli_arguments, start_server

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
except ImportError:  # slicer-core (headless): the Logic and the Test still work
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

# Every choice and default below comes from the library, so the panel and the command line agree.
RADIOMICS_PRESETS = tuple(preset_names())
DEFAULT_PROTOCOL = ProtocolSettings()
DEFAULT_TRAINING_STEPS = TrainConfig().total_steps


#
# DeepDosimetrics
#
class DeepDosimetrics(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DeepDosimetrics"
        self.parent.categories = ["Radiotherapy"]
        # SlicerRadiomics and PyTorch are optional: a listed module that fails to load would stop this one.
        self.parent.dependencies = []
        self.parent.contributors = ["DeepDosimetrics developers (INFN Firenze)"]
        self.parent.helpText = (
            "Learned features of CT, structures (PTV) and planned dose from a tiled 3D convolutional "
            "autoencoder, with reconstructions overlaid on the CT, and the classical baselines: radiomics "
            "(SlicerRadiomics or pyradiomics) and dose-volume metrics per structure. Outcome analysis tells "
            "whether the features add predictive value to the clinical variables; a browser review station "
            "lets clinicians inspect reconstructions. Long jobs run in a background process with progress "
            "and Cancel. Everything is also available from the Python console through DeepDosimetricsLogic "
            "and from the <tt>deepdosimetrics</tt> command line."
        )
        self.parent.acknowledgementText = (
            "Built on 3D Slicer, pyradiomics/SlicerRadiomics, SimpleITK, PyTorch and scikit-learn. Phantom "
            "cohort and OpenKBP data (Babier et al., Med Phys 2021) are used in the tests."
        )


#
# Parameter node
#
@parameterNodeWrapper
class DeepDosimetricsParameterNode:
    """Module state saved with the scene; each field is bound to the widget whose dynamic property
    ``SlicerParameterName`` names it in the .ui."""

    # inputs
    ctVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    doseVolume: vtkMRMLScalarVolumeNode
    # radiomics and dose-volume metrics
    radiomicsPreset: Annotated[str, Choice(RADIOMICS_PRESETS)] = DEFAULT_PRESET
    radiomicsParameterFile: Path
    radiomicsOnDose: bool = False
    # deep features
    cohortFolder: Path
    modelFolder: Path
    outputFolder: Path
    channels: Annotated[str, Choice(tuple(CHANNEL_SETS))] = "default"
    device: Annotated[str, Choice(DEVICES)] = DEFAULT_DEVICE
    trainingSteps: Annotated[int, WithinRange(1, 10_000_000)] = DEFAULT_TRAINING_STEPS
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = DEFAULT_OVERLAP
    reconstruct: bool = True
    # outcome analysis
    clinicalFile: Path
    outcomeColumn: str = "outcome"
    timeColumn: str = ""
    eventColumn: str = ""
    featureTables: str = ""
    predictModel: Annotated[str, Choice(MODELS)] = DEFAULT_PROTOCOL.model
    folds: Annotated[int, WithinRange(2, 20)] = DEFAULT_PROTOCOL.folds
    repeats: Annotated[int, WithinRange(1, 100)] = DEFAULT_PROTOCOL.repeats
    harmonizeColumn: str = ""
    analysisFolder: Path


def _isSet(path) -> bool:
    """Whether a Path parameter holds a real path (an unset or cleared one reads as '' or '.')."""
    return path is not None and str(path) not in ("", ".")


def parseFeatureTables(text: str) -> Dict[str, str]:
    """``"dvh=dvh.csv radiomics=/data/radiomics.csv"`` -> {name: path} (the ``predict --features`` form)."""
    tables: Dict[str, str] = {}
    for item in (text or "").split():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"feature table {item!r}: write NAME=TABLE.csv (e.g. dvh=dvh.csv)")
        if name in tables:
            raise InputError(f"feature set {name!r} is given twice")
        tables[name] = path
    return tables


#
# DeepDosimetricsLogic
#
class DeepDosimetricsLogic(ScriptedLoadableModuleLogic):
    """All behaviour of the module, usable from the Python console and headless (no Qt needed): a facade
    over library calls (``DeepDosimetricsLib``) and the MRML layer (``DeepDosimetricsLib.mrml``)."""

    def __init__(self, scene: Any = None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.lastRadiomicsPath: Optional[str] = None
        self.currentJob: Optional[CliJob] = None
        self.reviewJob: Optional[CliJob] = None
        self._requirementsChecked: set = set()

    @property
    def scene(self) -> Any:
        """The MRML scene the logic adds nodes to."""
        return mrml.headless.current_scene(self._scene)

    def getParameterNode(self):
        """The typed parameter node (application only)."""
        return DeepDosimetricsParameterNode(super().getParameterNode())

    def ensureRequirements(self, groups=(None,), askConfirmation: bool = True) -> bool:
        """Check the library's Python requirements (``runtime.requirements``) and install the missing ones.

        Asks once (``confirmOkCancelDisplay``), installs with ``slicer.util.pip_install`` at the listed
        versions and torch through the PyTorch extension; Slicer's own SimpleITK, numpy and vtk are never
        reinstalled (``mrml.application.ensure_requirements``). ``groups``: ``None`` (core), ``"review"``...
        Returns False when the user declined.
        """
        key = tuple(groups)
        if key not in self._requirementsChecked and mrml.application.ensure_requirements(groups, askConfirmation):
            self._requirementsChecked.add(key)
        return key in self._requirementsChecked

    # ------------------------------------------------------------------ patients
    def patientFromNodes(self, ctNode, segmentationNode=None, labelmapNodes=(), doseNode=None, patientId=None):
        """The library's Patient built from scene nodes (segments exported on the CT geometry)."""
        return mrml.patients.patient_from_nodes(ctNode, segmentationNode, labelmapNodes, doseNode, patientId)

    def loadPatientFolder(self, path):
        """Load a patient folder into CT, segmentation and dose nodes; returns mrml.patients.PatientNodes."""
        nodes = mrml.patients.load_patient_folder(path, self.scene)
        mrml.display.show_reconstruction(nodes.ct, None, None, nodes.dose, nodes.segmentation)
        return nodes

    def exportPatientFolder(self, ctNode, segmentationNode=None, doseNode=None, folder=None, patientId=None):
        """Write the nodes as one patient of a cohort (the importers' layout) under ``folder`` (default: a
        new temporary cohort); returns the patient folder."""
        return mrml.patients.export_patient_folder(ctNode, segmentationNode, doseNode, folder, patientId)

    # ------------------------------------------------------------------ radiomics and DVH
    @staticmethod
    def slicerRadiomicsLogic():
        """SlicerRadiomics' logic when that extension is installed, else None."""
        try:
            from SlicerRadiomics import SlicerRadiomicsLogic
        except ImportError:
            return None
        return SlicerRadiomicsLogic()

    def computeRadiomics(self, volumeNode, maskNode, presetOrParameterFile=DEFAULT_PRESET, tableNode=None,
                         structures=None, useSlicerRadiomics=None):
        """Radiomics per structure -> table node (``Feature`` column, one column per structure).

        Through SlicerRadiomics when it is installed (or ``useSlicerRadiomics=True``), else the library's
        pyradiomics path with the same parameter file (``mrml.features.radiomics_table``); the path used is
        in :attr:`lastRadiomicsPath` and the table attribute ``DeepDosimetrics.RadiomicsPath``.
        """
        radiomicsLogic = self.slicerRadiomicsLogic() if useSlicerRadiomics in (None, True) else None
        if useSlicerRadiomics and radiomicsLogic is None:
            raise InputError("SlicerRadiomics is not installed: install it from the Extensions Manager")
        tableNode, self.lastRadiomicsPath = mrml.features.radiomics_table(
            volumeNode, maskNode, presetOrParameterFile, tableNode, structures, radiomicsLogic)
        return tableNode

    def computeDoseVolumeMetrics(self, doseNode, segmentationNode, ctNode=None, tableNode=None, binWidthGy=0.1,
                                 structures=None):
        """Dose-volume metrics per structure -> (table node, DVH chart node); with ``ctNode`` on the CT grid
        as the ``dvh`` command computes them, else on the dose grid (``mrml.features.dvh_tables``)."""
        return mrml.features.dvh_tables(doseNode, segmentationNode, ctNode, tableNode, binWidthGy, structures)

    # ------------------------------------------------------------------ long jobs
    def runJob(self, arguments, blocking=False, onLine=None, onProgress=None, timeout=None):
        """Run ``deepdosimetrics <arguments>`` in a background process (``runtime.jobs.CliJob``).

        Non-blocking (the widget): returns the started CliJob; poll it, cancel it with cancelJob().
        Blocking (console, batch): waits, returns the CliJob, raises DeepDosimetricsError if it failed.
        """
        if self.currentJob is not None and self.currentJob.running:
            raise DeepDosimetricsError("a job is already running: cancel it or wait for it to finish")
        job = CliJob(arguments, on_line=onLine, on_progress=onProgress)
        self.currentJob = job.start()
        if blocking and job.wait(timeout=timeout) != 0 and not job.cancelled:
            raise DeepDosimetricsError(f"deepdosimetrics {arguments[0]} failed: {job.error_message()}")
        return job

    def cancelJob(self):
        """Cancel the running job (the whole process tree)."""
        if self.currentJob is not None:
            self.currentJob.cancel()

    @staticmethod
    def trainArguments(cohortFolder, modelFolder, channels="default", steps=DEFAULT_TRAINING_STEPS,
                       device=DEFAULT_DEVICE):
        """Command-line arguments of a training job."""
        return cli_arguments("train", cohort=cohortFolder, out=modelFolder, channels=channels, steps=int(steps),
                             device=device)

    @staticmethod
    def encodeArguments(modelFolder, cohortFolder, outputFolder, reconstruct=True, overlap=DEFAULT_OVERLAP,
                        device=DEFAULT_DEVICE):
        """Command-line arguments of a cohort encoding job."""
        return cli_arguments("encode", model=modelFolder, cohort=cohortFolder, out=outputFolder,
                             overlap=float(overlap), device=device, reconstruct=bool(reconstruct))

    # ------------------------------------------------------------------ encoding and reconstruction
    def encodeNodes(self, ctNode, segmentationNode=None, doseNode=None, modelFolder=None, outputFolder=None,
                    reconstruct=True, overlap=DEFAULT_OVERLAP, device=DEFAULT_DEVICE, blocking=True):
        """Encode the patient in the scene with a trained model (``deepdosimetrics encode``).

        The nodes are written as a one-patient cohort in a temporary folder (with its own preprocessing
        cache) and encoded in a background process (``mrml.results.encode_nodes``). Blocking, the features
        table and (with ``reconstruct``) the reconstruction and residual volumes are added to the scene and
        shown over the CT, the temporary folder is removed, and a dict name -> added node is returned. Not
        blocking, the started CliJob is returned: when it has finished, call
        ``loadEncodingResults(outputFolder, ctNode, job.patientId, ...)`` and remove ``job.workFolder``.
        """
        return mrml.results.encode_nodes(
            ctNode, segmentationNode, doseNode, modelFolder, outputFolder,
            lambda cohort, out: self.encodeArguments(modelFolder, cohort, out, reconstruct, overlap, device),
            self.runJob, blocking, self.scene)

    def loadEncodingResults(self, outputFolder, ctNode, patientId, doseNode=None, segmentationNode=None):
        """Add one patient's encoding results (features table, reconstructions, residuals, labelmaps) to the
        scene and show them over the CT (``mrml.results.load_encoding_results``, which the ``.mrb`` scenes
        of ``encode --scene`` use too); returns file stem -> node."""
        return mrml.results.load_encoding_results(outputFolder, patientId, ctNode, doseNode, segmentationNode,
                                                  scene=self.scene)

    def showReconstruction(self, ctNode, reconNode=None, residualNode=None, doseNode=None, segmentationNode=None,
                           opacity=0.5):
        """CT background, reconstruction foreground at ``opacity``, residual with a diverging map symmetric
        around zero, dose with a dose map hiding zero, structures as outlines."""
        mrml.display.show_reconstruction(ctNode, reconNode, residualNode, doseNode, segmentationNode, opacity)

    def saveSnapshots(self, outPrefix, ctNode, foregroundNode=None, rasPoint=None, opacity=0.5, labelNode=None):
        """Axial, coronal and sagittal PNG snapshots (``<prefix>_<view>.png``) through ``rasPoint``."""
        return mrml.slices.write_snapshots(outPrefix, ctNode, rasPoint, foregroundNode, opacity, labelNode)

    def saveSceneBundle(self, path):
        """Write the scene as a Slicer data bundle (.mrb)."""
        return mrml.application.save_scene(path, self.scene)

    # ------------------------------------------------------------------ outcome analysis
    @staticmethod
    def predictArguments(clinicalFile, featureTables, outFolder, outcome="outcome", time="", event="",
                         model=DEFAULT_PROTOCOL.model, folds=DEFAULT_PROTOCOL.folds,
                         repeats=DEFAULT_PROTOCOL.repeats, harmonize=""):
        """Command-line arguments of ``deepdosimetrics predict``; ``featureTables`` is {name: table} or the
        text ``"dvh=dvh.csv radiomics=radiomics.csv"``. A time column selects a time-to-event endpoint."""
        tables = parseFeatureTables(featureTables) if isinstance(featureTables, str) else dict(featureTables)
        return cli_arguments(
            "predict", clinical=clinicalFile, time=str(time) if time else None, event=str(event) if time else None,
            outcome=None if time else str(outcome), features=[f"{name}={path}" for name, path in tables.items()],
            model=model, folds=int(folds), repeats=int(repeats), harmonize=harmonize or None, out=outFolder)

    def predictOutcome(self, clinicalFile, featureTables, outFolder, outcome="outcome", time="", event="",
                       model=DEFAULT_PROTOCOL.model, folds=DEFAULT_PROTOCOL.folds, repeats=DEFAULT_PROTOCOL.repeats,
                       harmonize="", jobs=1, showResults=True):
        """Outcome analysis, blocking (console): ``analysis.job.predict_outcome`` in this process.

        Returns the library's PredictResult (``summary``, ``comparison``, ``paths``); with ``showResults``
        the summary becomes a table node and the ROC curves a plot chart (``loadPredictionResults``).
        """
        from DeepDosimetricsLib.analysis.job import PredictSettings, predict_outcome

        tables = parseFeatureTables(featureTables) if isinstance(featureTables, str) else dict(featureTables)
        result = predict_outcome(PredictSettings(
            clinical=str(clinicalFile), features={k: str(v) for k, v in tables.items()}, out=str(outFolder),
            outcome=None if time else outcome, time=time or None, event=event or None, model=model,
            folds=int(folds), repeats=int(repeats), harmonize=harmonize or None, jobs=int(jobs),
        ))
        if showResults:
            self.loadPredictionResults(outFolder)
        return result

    def loadPredictionResults(self, outFolder):
        """``summary.csv`` as a table node, ROC curves (binary endpoint) as a plot chart: {"summary", "roc"}."""
        return mrml.results.load_prediction_results(outFolder, self.scene)

    # ------------------------------------------------------------------ review station
    @staticmethod
    def reviewArguments(encodingFolder, cohortFolder, modelFolder=None):
        """Command-line arguments of ``deepdosimetrics review`` (local only: 127.0.0.1)."""
        return cli_arguments("review", encoding=encodingFolder, cohort=cohortFolder,
                             model=modelFolder if _isSet(modelFolder) else None)

    def startReviewStation(self, encodingFolder, cohortFolder, modelFolder=None, timeout=120.0, onLine=None):
        """Start ``deepdosimetrics review`` in a background process; returns the URL it prints. The server
        runs until ``stopReviewStation()`` (or the application closes)."""
        self.stopReviewStation()
        arguments = self.reviewArguments(encodingFolder, cohortFolder, modelFolder)
        self.reviewJob, url = start_server(arguments, timeout, onLine)
        return url

    def stopReviewStation(self):
        """Stop the review station's server, if one was started."""
        if self.reviewJob is not None:
            self.reviewJob.cancel()
            self.reviewJob = None


#
# DeepDosimetricsWidget
#
class DeepDosimetricsWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: it moves values between the widgets and the parameter node and calls the Logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._jobTimer = None
        self._onJobFinished = None  # what to do with the current job's results

    def setup(self) -> None:
        """Load the .ui, connect the widgets and the parameter node."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepDosimetrics.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepDosimetricsLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for button, handler in (
            (self.ui.loadPatientButton, self.onLoadPatient),
            (self.ui.radiomicsButton, self.onRadiomics),
            (self.ui.dvhButton, self.onDoseVolumeMetrics),
            (self.ui.trainButton, self.onTrain),
            (self.ui.encodeButton, self.onEncode),
            (self.ui.encodeSceneButton, self.onEncodeScene),
            (self.ui.reviewButton, self.onReview),
            (self.ui.addFeatureTableButton, self.onAddFeatureTable),
            (self.ui.predictButton, self.onPredict),
            (self.ui.cancelButton, self.onCancel),
        ):
            button.connect("clicked(bool)", handler)
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

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self.logic is not None:
            self.logic.cancelJob()
            self.logic.stopReviewStation()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Parameter node of the module, with the scene's CT and dose as default inputs."""
        self.setParameterNode(self.logic.getParameterNode())
        ct, dose = mrml.volumes.default_inputs(slicer.mrmlScene)
        if not self._parameterNode.ctVolume and ct is not None:
            self._parameterNode.ctVolume = ct
        if not self._parameterNode.doseVolume and dose is not None:
            self._parameterNode.doseVolume = dose

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        busy = self.logic is not None and self.logic.currentJob is not None and self.logic.currentJob.running
        hasCt, hasSeg, hasDose = bool(p and p.ctVolume), bool(p and p.segmentation), bool(p and p.doseVolume)
        cohort, model, out = (bool(p and _isSet(getattr(p, f))) for f in ("cohortFolder", "modelFolder", "outputFolder"))
        self.ui.radiomicsButton.enabled = hasSeg and (hasDose if p and p.radiomicsOnDose else hasCt)
        self.ui.dvhButton.enabled = hasSeg and hasDose
        self.ui.trainButton.enabled = not busy and cohort and model
        self.ui.encodeButton.enabled = not busy and cohort and model and out
        self.ui.encodeSceneButton.enabled = not busy and hasCt and model
        self.ui.reviewButton.enabled = cohort and out
        endpoint = bool(p and (p.outcomeColumn or (p.timeColumn and p.eventColumn)))
        self.ui.predictButton.enabled = not busy and bool(p and _isSet(p.clinicalFile) and _isSet(p.analysisFolder)) \
            and endpoint
        self.ui.cancelButton.enabled = busy

    # ------------------------------------------------------------------ actions
    def onLoadPatient(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, "Patient folder (ct.nrrd, structures, dose.nrrd)")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Failed to load the patient folder.", waitCursor=True):
            self.logic.ensureRequirements()
            nodes = self.logic.loadPatientFolder(folder)
            self._parameterNode.ctVolume = nodes.ct
            self._parameterNode.segmentation = nodes.segmentation
            if nodes.dose is not None:
                self._parameterNode.doseVolume = nodes.dose

    def onRadiomics(self) -> None:
        p = self._parameterNode
        spec = str(p.radiomicsParameterFile) if _isSet(p.radiomicsParameterFile) else p.radiomicsPreset
        volume = p.doseVolume if p.radiomicsOnDose else p.ctVolume
        with slicer.util.tryWithErrorDisplay("Radiomics failed.", waitCursor=True):
            self.logic.ensureRequirements()
            table = self.logic.computeRadiomics(volume, p.segmentation, spec)
            self._log(f"Radiomics table '{table.GetName()}' computed through {self.logic.lastRadiomicsPath}.")
            mrml.tables.show_table(table)  # a layout with a table view first, then the selection

    def onDoseVolumeMetrics(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Dose-volume metrics failed.", waitCursor=True):
            self.logic.ensureRequirements()
            table, chart = self.logic.computeDoseVolumeMetrics(p.doseVolume, p.segmentation, p.ctVolume)
            self._log(f"DVH table '{table.GetName()}' and chart '{chart.GetName()}' added.")
            slicer.modules.plots.logic().ShowChartInLayout(chart)

    def onTrain(self) -> None:
        p = self._parameterNode
        self._startCommand(lambda: self.logic.trainArguments(p.cohortFolder, p.modelFolder, p.channels,
                                                             p.trainingSteps, p.device))

    def onEncode(self) -> None:
        p = self._parameterNode
        self._startCommand(lambda: self.logic.encodeArguments(p.modelFolder, p.cohortFolder, p.outputFolder,
                                                              p.reconstruct, p.overlap, p.device))

    def onPredict(self) -> None:
        p = self._parameterNode
        out = p.analysisFolder
        self._startCommand(
            lambda: self.logic.predictArguments(p.clinicalFile, p.featureTables, out, p.outcomeColumn, p.timeColumn,
                                                p.eventColumn, p.predictModel, p.folds, p.repeats, p.harmonizeColumn),
            groups=(None, "analysis"),
            onFinished=lambda job: self._showPrediction(out),
        )

    def _showPrediction(self, out) -> None:
        added = self.logic.loadPredictionResults(out)
        mrml.tables.show_table(added["summary"])
        if added["roc"] is not None:
            slicer.modules.plots.logic().ShowChartInLayout(added["roc"])
        self._log(f"Outcome analysis: {Path(str(out)) / 'report.html'}")

    def onAddFeatureTable(self) -> None:
        path = qt.QFileDialog.getOpenFileName(None, "Feature table (radiomics, dvh or encode features.csv)", "",
                                              "CSV tables (*.csv)")
        if path:
            name = Path(path).stem.replace("features", "deep") or "table"
            text = self._parameterNode.featureTables.strip()
            self._parameterNode.featureTables = f"{text} {name}={path}".strip()

    def onEncodeScene(self) -> None:
        p = self._parameterNode
        nodes, out = (p.ctVolume, p.segmentation, p.doseVolume), p.outputFolder if _isSet(p.outputFolder) else None
        self._startJob(lambda: self.logic.encodeNodes(*nodes, p.modelFolder, out, p.reconstruct, p.overlap, p.device,
                                                      blocking=False),
                       onFinished=lambda job: self._loadSceneEncoding(job, *nodes), failure="Encoding failed.")

    def _loadSceneEncoding(self, job, ctNode, segmentationNode, doseNode) -> None:
        outputFolder = job.arguments[job.arguments.index("--out") + 1]
        added = self.logic.loadEncodingResults(outputFolder, ctNode, job.patientId, doseNode, segmentationNode)
        self._log("Added: " + ", ".join(node.GetName() for node in added.values()))

    def onReview(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not start the review station.", waitCursor=True):
            self.logic.ensureRequirements(groups=(None, "review"))
            url = self.logic.startReviewStation(p.outputFolder, p.cohortFolder, p.modelFolder, onLine=self._log)
            self._log(f"Review station: {url}")
            qt.QDesktopServices.openUrl(qt.QUrl(url))

    def onCancel(self) -> None:
        self.logic.cancelJob()
        self._log("Cancelled.")

    def _startCommand(self, arguments, groups=(None,), onFinished=None) -> None:
        """Run ``deepdosimetrics <arguments()>`` in the background."""
        self._startJob(lambda: self.logic.runJob(arguments()), groups, onFinished)

    def _startJob(self, start, groups=(None,), onFinished=None, failure="Could not start the job.") -> None:
        """Start a background job (``start()`` returns it started) and follow it: log, progress, results."""
        self.ui.progressBar.value = 0
        with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
            self.logic.ensureRequirements(groups)
            job = start()
            job.on_line, job.on_progress = self._log, self._onProgress
            self._log("$ deepdosimetrics " + " ".join(job.arguments))
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
                self._log("Job cancelled.")
            elif job.returncode == 0:
                self.ui.progressBar.value = 100
                self._log("Job finished.")
                if finished is not None:
                    with slicer.util.tryWithErrorDisplay("Could not show the results.", waitCursor=True):
                        finished(job)
            else:
                self._log(f"Job failed: {job.error_message()}")
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

    def _log(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(str(line))


#
# DeepDosimetricsTest
#
class DeepDosimetricsTest(ScriptedLoadableModuleTest):
    """Runs a small phantom patient through the Logic (in Slicer: Reload and Test; headless: pytest)."""

    def setUp(self):
        """A clean scene (Slicer's own, or a new headless one) and a work folder."""
        inApplication = mrml.headless.in_slicer_application()
        if inApplication:
            slicer.mrmlScene.Clear()
        self._headless = None if inApplication else mrml.headless.create_headless_scene()
        self._workdir = Path(tempfile.mkdtemp(prefix="DeepDosimetricsTest-"))

    def tearDown(self):
        if getattr(self, "_headless", None) is not None:
            mrml.headless.close_headless_scene(self._headless)
        shutil.rmtree(getattr(self, "_workdir", ""), ignore_errors=True)

    def runTest(self):
        self.setUp()
        try:
            self.test_DeepDosimetrics_phantom()
        finally:
            self.tearDown()

    def test_DeepDosimetrics_phantom(self):
        from DeepDosimetricsLib.data.patient import Patient
        from DeepDosimetricsLib.data.phantom import PhantomConfig, synthesize_patient

        self.delayDisplay("Loading a phantom patient (the library's generator)")
        folder = synthesize_patient(self._workdir, 0, PhantomConfig(shape=(32, 32, 24)))
        expected = Patient.from_folder(folder)
        logic = DeepDosimetricsLogic()
        nodes = logic.loadPatientFolder(folder)
        self.assertTrue(mrml.volumes.is_dose_volume(nodes.dose))
        self.assertEqual(nodes.segmentation.GetSegmentation().GetNumberOfSegments(), len(expected.structure_names))

        self.delayDisplay("Patient from nodes")
        patient = logic.patientFromNodes(nodes.ct, nodes.segmentation, doseNode=nodes.dose)
        self.assertEqual(sorted(patient.structure_names), sorted(expected.structure_names))
        self.assertEqual(int(patient.structure("PTV").sum()), int(expected.structure("PTV").sum()))

        self.delayDisplay("Radiomics")
        table = logic.computeRadiomics(nodes.ct, nodes.segmentation, "firstorder", useSlicerRadiomics=False)
        self.assertIn("original_firstorder_Mean", list(mrml.tables.dataframe_from_table(table)["Feature"]))
        self.assertEqual(table.GetAttribute(mrml.tables.RADIOMICS_PATH_ATTRIBUTE), "pyradiomics")

        self.delayDisplay("Dose-volume metrics")
        dvhTable, chart = logic.computeDoseVolumeMetrics(nodes.dose, nodes.segmentation, nodes.ct)
        metrics = mrml.tables.dataframe_from_table(dvhTable).set_index("Metric")
        self.assertGreater(metrics.loc["Dmean_Gy", "PTV"], metrics.loc["Dmean_Gy", "Body"])
        self.assertEqual(chart.GetNumberOfPlotSeriesNodes(), len(expected.structure_names))

        self.delayDisplay("Overlay and snapshots")
        logic.showReconstruction(nodes.ct, None, None, nodes.dose, nodes.segmentation)
        written = logic.saveSnapshots(self._workdir / "snap", nodes.ct, nodes.dose)
        self.assertEqual(sorted(written), ["axial", "coronal", "sagittal"])
        self.delayDisplay("Test passed")
