"""DeepDosimetrics: deep-learning dosimetrics in 3D Slicer (module, parameter node, widget, logic and test).

The module is thin: the computation lives in ``DeepDosimetricsLib`` (Slicer-free, with the ``deepdosimetrics``
command line), the MRML conversions in ``DeepDosimetricsLib.mrml``, what the extension's modules share (the
scripted-module API with headless stand-ins, the job Logic and panel bases) in ``mrml.panel``. Outcome
analysis is the second module of the extension, ``DeepDosimetricsOutcome``.
"""

from pathlib import Path
from typing import Annotated, Optional

import slicer
from DeepDosimetricsLib import mrml
from DeepDosimetricsLib.deep.channels import CHANNEL_SETS
from DeepDosimetricsLib.deep.encode.settings import DEFAULT_OVERLAP
from DeepDosimetricsLib.deep.shipped import shipped_models
from DeepDosimetricsLib.deep.train.training import TrainConfig
from DeepDosimetricsLib.features.radiomics import DEFAULT_PRESET, preset_names
from DeepDosimetricsLib.mrml.panel import (  # Slicer's classes, or their stand-ins on slicer-core
    HAS_SLICER_GUI,  # noqa: F401
    Choice,
    JobLogic,
    JobPanel,
    ModuleTest,
    ScriptedLoadableModule,
    WithinRange,
    is_set,
    parameterNodeWrapper,
    qt,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from DeepDosimetricsLib.runtime.devices import DEFAULT_DEVICE, DEVICES
from DeepDosimetricsLib.runtime.errors import InputError
from DeepDosimetricsLib.runtime.jobs import CliJob, cli_arguments, start_server

# Every choice and default below comes from the library, so the panel and the command line agree.
RADIOMICS_PRESETS = tuple(preset_names())
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
            "(SlicerRadiomics or pyradiomics) and dose-volume metrics per structure. A browser review station "
            "lets clinicians inspect reconstructions; the DeepDosimetrics Outcome module tells whether the "
            "features add predictive value to the clinical variables. Long jobs run in a background process "
            "with progress and Cancel. Everything is also available from the Python console through "
            "DeepDosimetricsLogic and from the <tt>deepdosimetrics</tt> command line."
        )
        self.parent.acknowledgementText = (
            "Built on 3D Slicer, pyradiomics/SlicerRadiomics, SimpleITK and PyTorch. Phantom cohort and OpenKBP "
            "data (Babier et al., Med Phys 2021) are used in the tests."
        )


#
# Parameter node
#
#: the "Shipped encoder" choice that means: the model in the model folder
MODEL_FOLDER_CHOICE = "model folder"


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
    dvhSpatial: bool = False
    # deep features
    cohortFolder: Path
    modelFolder: Path
    pretrainedModel: Annotated[str, Choice((MODEL_FOLDER_CHOICE, *shipped_models()))] = MODEL_FOLDER_CHOICE
    outputFolder: Path
    channels: Annotated[str, Choice(tuple(CHANNEL_SETS))] = "default"
    device: Annotated[str, Choice(DEVICES)] = DEFAULT_DEVICE
    trainingSteps: Annotated[int, WithinRange(1, 10_000_000)] = DEFAULT_TRAINING_STEPS
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = DEFAULT_OVERLAP
    reconstruct: bool = True


#
# DeepDosimetricsLogic
#
class DeepDosimetricsLogic(JobLogic):
    """All behaviour of the module, usable from the Python console and headless (no Qt needed): each method
    calls the library (``DeepDosimetricsLib``) or its MRML layer, whose functions document the details.
    From ``mrml.panel.JobLogic``: ``scene``, ``ensureRequirements``, ``runJob``, ``cancelJob``."""

    def __init__(self, scene=None):
        JobLogic.__init__(self, scene)
        self.lastRadiomicsPath: Optional[str] = None
        self.reviewJob: Optional[CliJob] = None

    def getParameterNode(self):
        """The typed parameter node (application only)."""
        return DeepDosimetricsParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ patients
    def patientFromNodes(self, ctNode, segmentationNode=None, labelmapNodes=(), doseNode=None, patientId=None):
        """The library's Patient built from scene nodes (``mrml.patients.patient_from_nodes``)."""
        return mrml.patients.patient_from_nodes(ctNode, segmentationNode, labelmapNodes, doseNode, patientId)

    def loadPatientFolder(self, path):
        """Load a patient folder into CT, segmentation and dose nodes, shown; returns mrml.patients.PatientNodes."""
        nodes = mrml.patients.load_patient_folder(path, self.scene)
        mrml.display.show_reconstruction(nodes.ct, None, None, nodes.dose, nodes.segmentation)
        return nodes

    def exportPatientFolder(self, ctNode, segmentationNode=None, doseNode=None, folder=None, patientId=None):
        """Write the nodes as one patient of a cohort (``mrml.patients.export_patient_folder``)."""
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
        """Radiomics per structure -> table node, through SlicerRadiomics when installed (or
        ``useSlicerRadiomics=True``), else pyradiomics with the same parameters (``mrml.features.radiomics_table``);
        the path used is in :attr:`lastRadiomicsPath`."""
        radiomicsLogic = self.slicerRadiomicsLogic() if useSlicerRadiomics in (None, True) else None
        if useSlicerRadiomics and radiomicsLogic is None:
            raise InputError("SlicerRadiomics is not installed: install it from the Extensions Manager")
        tableNode, self.lastRadiomicsPath = mrml.features.radiomics_table(
            volumeNode, maskNode, presetOrParameterFile, tableNode, structures, radiomicsLogic)
        return tableNode

    def computeDoseVolumeMetrics(self, doseNode, segmentationNode, ctNode=None, tableNode=None, binWidthGy=0.1,
                                 structures=None, spatial=False):
        """Dose-volume metrics per structure -> (table node, DVH chart node) (``mrml.features.dvh_tables``);
        ``spatial``: with the spatial descriptors (``features.spatial``)."""
        return mrml.features.dvh_tables(doseNode, segmentationNode, ctNode, tableNode, binWidthGy, structures,
                                        spatial)

    # ------------------------------------------------------------------ deep features
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

    def encodeNodes(self, ctNode, segmentationNode=None, doseNode=None, modelFolder=None, outputFolder=None,
                    reconstruct=True, overlap=DEFAULT_OVERLAP, device=DEFAULT_DEVICE, blocking=True):
        """Encode the patient in the scene with a trained model (``mrml.results.encode_nodes``). Blocking: adds
        and shows the results, returns name -> node. Not blocking: returns the started CliJob; when it has
        finished, call ``loadEncodingResults(outputFolder, ctNode, job.patientId, ...)``."""
        return mrml.results.encode_nodes(
            ctNode, segmentationNode, doseNode, modelFolder, outputFolder,
            lambda cohort, out: self.encodeArguments(modelFolder, cohort, out, reconstruct, overlap, device),
            self.runJob, blocking, self.scene)

    def loadEncodingResults(self, outputFolder, ctNode, patientId, doseNode=None, segmentationNode=None):
        """One patient's encoding results as nodes over the CT (``mrml.results.load_encoding_results``)."""
        return mrml.results.load_encoding_results(outputFolder, patientId, ctNode, doseNode, segmentationNode,
                                                  scene=self.scene)

    def showReconstruction(self, ctNode, reconNode=None, residualNode=None, doseNode=None, segmentationNode=None,
                           opacity=0.5):
        """Reconstruction, residual, dose and outlines over the CT (``mrml.display.show_reconstruction``)."""
        mrml.display.show_reconstruction(ctNode, reconNode, residualNode, doseNode, segmentationNode, opacity)

    def saveSnapshots(self, outPrefix, ctNode, foregroundNode=None, rasPoint=None, opacity=0.5, labelNode=None):
        """Axial, coronal and sagittal PNG snapshots (``mrml.slices.write_snapshots``)."""
        return mrml.slices.write_snapshots(outPrefix, ctNode, rasPoint, foregroundNode, opacity, labelNode)

    def saveSceneBundle(self, path):
        """Write the scene as a Slicer data bundle (.mrb)."""
        return mrml.application.save_scene(path, self.scene)

    # ------------------------------------------------------------------ review station
    @staticmethod
    def encoderFor(pretrainedModel, modelFolder):
        """The model to encode or review with: a shipped model's name when one is chosen, else the model folder."""
        return pretrainedModel if pretrainedModel in shipped_models() else modelFolder

    @staticmethod
    def reviewArguments(encodingFolder, cohortFolder, modelFolder=None):
        """Command-line arguments of ``deepdosimetrics review`` (local only: 127.0.0.1)."""
        return cli_arguments("review", encoding=encodingFolder, cohort=cohortFolder,
                             model=modelFolder if is_set(modelFolder) else None)

    def startReviewStation(self, encodingFolder, cohortFolder, modelFolder=None, timeout=120.0, onLine=None):
        """Start ``deepdosimetrics review`` in a background process; returns the URL it prints. The server
        runs until ``stopReviewStation()`` (or the application closes)."""
        self.stopReviewStation()
        self.reviewJob, url = start_server(self.reviewArguments(encodingFolder, cohortFolder, modelFolder),
                                           timeout, onLine)
        return url

    def stopReviewStation(self):
        """Stop the review station's server, if one was started."""
        if self.reviewJob is not None:
            self.reviewJob.cancel()
            self.reviewJob = None


#
# DeepDosimetricsWidget
#
class DeepDosimetricsWidget(JobPanel):
    """The module panel; the .ui, parameter node and job plumbing are ``mrml.panel.JobPanel``'s."""

    def setup(self) -> None:
        self.setupPanel(DeepDosimetricsLogic(), (
            ("loadPatientButton", self.onLoadPatient),
            ("radiomicsButton", self.onRadiomics),
            ("dvhButton", self.onDoseVolumeMetrics),
            ("trainButton", self.onTrain),
            ("encodeButton", self.onEncode),
            ("encodeSceneButton", self.onEncodeScene),
            ("reviewButton", self.onReview),
        ))

    def cleanup(self) -> None:
        if self.logic is not None:
            self.logic.stopReviewStation()
        JobPanel.cleanup(self)

    def initializeParameterNode(self) -> None:
        """The parameter node, with the scene's CT and dose as default inputs."""
        JobPanel.initializeParameterNode(self)
        ct, dose = mrml.volumes.default_inputs(slicer.mrmlScene)
        if not self._parameterNode.ctVolume and ct is not None:
            self._parameterNode.ctVolume = ct
        if not self._parameterNode.doseVolume and dose is not None:
            self._parameterNode.doseVolume = dose

    def _checkCanApply(self, caller=None, event=None) -> None:
        JobPanel._checkCanApply(self)
        p, busy = self._parameterNode, self.busy
        hasCt, hasSeg, hasDose = bool(p and p.ctVolume), bool(p and p.segmentation), bool(p and p.doseVolume)
        cohort, model, out = (bool(p and is_set(getattr(p, f))) for f in ("cohortFolder", "modelFolder", "outputFolder"))
        encoder = model or bool(p and p.pretrainedModel in shipped_models())
        self.ui.radiomicsButton.enabled = hasSeg and (hasDose if p and p.radiomicsOnDose else hasCt)
        self.ui.dvhButton.enabled = hasSeg and hasDose
        self.ui.trainButton.enabled = not busy and cohort and model
        self.ui.encodeButton.enabled = not busy and cohort and encoder and out
        self.ui.encodeSceneButton.enabled = not busy and hasCt and encoder
        self.ui.reviewButton.enabled = cohort and out

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
        spec = str(p.radiomicsParameterFile) if is_set(p.radiomicsParameterFile) else p.radiomicsPreset
        with slicer.util.tryWithErrorDisplay("Radiomics failed.", waitCursor=True):
            self.logic.ensureRequirements()
            table = self.logic.computeRadiomics(p.doseVolume if p.radiomicsOnDose else p.ctVolume, p.segmentation,
                                                spec)
            self.log(f"Radiomics table '{table.GetName()}' computed through {self.logic.lastRadiomicsPath}.")
            mrml.tables.show_table(table)  # a layout with a table view first, then the selection

    def onDoseVolumeMetrics(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Dose-volume metrics failed.", waitCursor=True):
            self.logic.ensureRequirements()
            table, chart = self.logic.computeDoseVolumeMetrics(p.doseVolume, p.segmentation, p.ctVolume,
                                                               spatial=p.dvhSpatial)
            self.log(f"DVH table '{table.GetName()}' and chart '{chart.GetName()}' added.")
            slicer.modules.plots.logic().ShowChartInLayout(chart)

    def onTrain(self) -> None:
        p = self._parameterNode
        self.startCommand(lambda: self.logic.trainArguments(p.cohortFolder, p.modelFolder, p.channels,
                                                            p.trainingSteps, p.device))

    def onEncode(self) -> None:
        p = self._parameterNode
        encoder = self.logic.encoderFor(p.pretrainedModel, p.modelFolder)
        self.startCommand(lambda: self.logic.encodeArguments(encoder, p.cohortFolder, p.outputFolder,
                                                             p.reconstruct, p.overlap, p.device))

    def onEncodeScene(self) -> None:
        p = self._parameterNode
        nodes, out = (p.ctVolume, p.segmentation, p.doseVolume), p.outputFolder if is_set(p.outputFolder) else None
        encoder = self.logic.encoderFor(p.pretrainedModel, p.modelFolder)
        self.startJob(lambda: self.logic.encodeNodes(*nodes, encoder, out, p.reconstruct, p.overlap, p.device,
                                                     blocking=False),
                      onFinished=lambda job: self._loadSceneEncoding(job, *nodes), failure="Encoding failed.")

    def _loadSceneEncoding(self, job, ctNode, segmentationNode, doseNode) -> None:
        outputFolder = job.arguments[job.arguments.index("--out") + 1]
        added = self.logic.loadEncodingResults(outputFolder, ctNode, job.patientId, doseNode, segmentationNode)
        self.log("Added: " + ", ".join(node.GetName() for node in added.values()))

    def onReview(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not start the review station.", waitCursor=True):
            self.logic.ensureRequirements(groups=(None, "review"))
            encoder = self.logic.encoderFor(p.pretrainedModel, p.modelFolder)
            url = self.logic.startReviewStation(p.outputFolder, p.cohortFolder, encoder, onLine=self.log)
            self.log(f"Review station: {url}")
            qt.QDesktopServices.openUrl(qt.QUrl(url))


#
# DeepDosimetricsTest
#
class DeepDosimetricsTest(ModuleTest):
    """Runs a small phantom patient through the Logic (in Slicer: Reload and Test; headless: pytest). Each
    test gets a clean scene and ``self.workdir`` (``mrml.panel.ModuleTest``)."""

    def test_DeepDosimetrics_phantom(self):
        from DeepDosimetricsLib.data.patient import Patient
        from DeepDosimetricsLib.data.phantoms import PhantomConfig, synthesize_patient

        self.delayDisplay("Loading a phantom patient (the library's generator)")
        folder = synthesize_patient(self.workdir, 0, PhantomConfig(shape=(32, 32, 24)))
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
        written = logic.saveSnapshots(self.workdir / "snap", nodes.ct, nodes.dose)
        self.assertEqual(sorted(written), ["axial", "coronal", "sagittal"])
        self.delayDisplay("Test passed")
