"""DeepDosimetrics: deep-learning dosimetrics in 3D Slicer (module, widget, logic and test).

The module is thin: the computation lives in ``DeepDosimetricsLib`` (a Slicer-free library with the
``deepdosimetrics`` command line) and the MRML conversions in ``DeepDosimetricsLib.mrml.scene``. The Logic
works from the Python console and headless (``slicer-core``): the Qt/CTK imports below are guarded,
so this file imports where only the MRML classes exist.
"""

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, List, Optional, Sequence

import slicer
import vtk

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
    vtkMRMLScalarVolumeNode = getattr(slicer, "vtkMRMLScalarVolumeNode", object)
    vtkMRMLSegmentationNode = getattr(slicer, "vtkMRMLSegmentationNode", object)

    def parameterNodeWrapper(cls):
        """Headless stand-in: the class is left as it is."""
        return cls

    def Choice(choices):
        return ("Choice", tuple(choices))

    def WithinRange(minimum, maximum):
        return ("WithinRange", minimum, maximum)

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            logging.info(message)

    class VTKObservationMixin:
        def __init__(self):
            pass

        def removeObservers(self, *args):
            pass


log = logging.getLogger("DeepDosimetrics")

RADIOMICS_PRESETS = ("firstorder", "all", "ibsi")
DEVICES = ("auto", "cpu", "cuda", "mps")
CHANNEL_SETS = ("default", "full")


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
            "(SlicerRadiomics or pyradiomics) and dose-volume metrics per structure. Long jobs (training, "
            "cohort encoding) run in a background process with progress and Cancel. Everything is also "
            "available from the Python console through DeepDosimetricsLogic and from the "
            "<tt>deepdosimetrics</tt> command line."
        )
        self.parent.acknowledgementText = (
            "Built on 3D Slicer, pyradiomics/SlicerRadiomics, SimpleITK and PyTorch. Phantom cohort and "
            "OpenKBP data (Babier et al., Med Phys 2021) are used in the tests."
        )


#
# Parameter node
#
@parameterNodeWrapper
class DeepDosimetricsParameterNode:
    """Module state saved with the scene; each field is bound to the widget of the same name in the .ui
    (dynamic property ``SlicerParameterName``)."""

    ctVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    doseVolume: vtkMRMLScalarVolumeNode
    radiomicsPreset: Annotated[str, Choice(RADIOMICS_PRESETS)] = "firstorder"
    radiomicsParameterFile: Path
    radiomicsOnDose: bool = False
    cohortFolder: Path
    modelFolder: Path
    outputFolder: Path
    channels: Annotated[str, Choice(CHANNEL_SETS)] = "default"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    trainingSteps: Annotated[int, WithinRange(1, 10_000_000)] = 2000
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5
    reconstruct: bool = True


#
# Background jobs
#
def python_for_jobs() -> str:
    """The Python that runs library jobs: Slicer's ``PythonSlicer`` inside the application, else this one."""
    if getattr(slicer, "app", None) is not None:
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


class CliJob:
    """A ``deepdosimetrics`` command in a background process, its output read by a thread.

    Lines ``@progress {json}`` update :attr:`progress`; other lines go to :attr:`log_lines`. Callers poll
    with :meth:`poll` (the widget, from a QTimer) or block with :meth:`wait` (console and batch use).
    :meth:`cancel` ends the process and all its children.
    """

    def __init__(
        self,
        arguments: Sequence[str],
        on_line: Optional[Callable[[str], None]] = None,
        on_progress: Optional[Callable[[dict], None]] = None,
        python: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        command: Optional[Sequence[str]] = None,
    ):
        self.arguments = [str(a) for a in arguments]
        if command is None:  # `deepdosimetrics <arguments>` in a separate Python
            command = [python or python_for_jobs(), "-u", "-m", "DeepDosimetricsLib.cli", *self.arguments]
        self.command = [str(c) for c in command]
        self.on_line = on_line
        self.on_progress = on_progress
        self.progress: Optional[dict] = None
        self.log_lines: List[str] = []
        self.returncode: Optional[int] = None
        self.cancelled = False
        self.patientId: Optional[str] = None  # set by encodeNodes: the patient encoded from the scene
        self.workFolder: Optional[Path] = None  # set by encodeNodes: its temporary folder, to remove
        self._env = env
        self._lines: queue.Queue = queue.Queue()
        self._process: Optional[subprocess.Popen] = None
        self._reader: Optional[threading.Thread] = None

    def start(self) -> "CliJob":
        """Start the process (its library found beside this file) and the reader thread."""
        env = dict(os.environ if self._env is None else self._env)
        module_dir = str(Path(__file__).resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (module_dir, env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        log.info("running: %s", " ".join(self.command))
        self._process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=(os.name == "posix"),
        )
        self._reader = threading.Thread(target=self._read, name="DeepDosimetricsJobReader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        import io

        assert self._process is not None and self._process.stdout is not None
        # newline="": a lone carriage return (a tqdm redraw) ends a piece without becoming a newline
        stream = io.TextIOWrapper(self._process.stdout, encoding="utf-8", errors="replace", newline="")
        for piece in stream:
            if piece.endswith("\r"):
                continue  # an intermediate progress-bar state, redrawn by the next piece
            line = piece.rstrip("\r\n").rstrip()
            if line:
                self._lines.put(line)
        stream.close()

    @property
    def running(self) -> bool:
        """True until the process has ended and every line has been handled."""
        if self._process is None:
            return False
        return self._process.poll() is None or (self._reader is not None and self._reader.is_alive()) or (
            not self._lines.empty()
        )

    def poll(self) -> List[str]:
        """Handle the lines read so far; returns them. Sets :attr:`returncode` once the job has ended."""
        from DeepDosimetricsLib.runtime.progress import parse_progress

        handled = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            handled.append(line)
            record = parse_progress(line)
            if record is not None:
                self.progress = record
                if self.on_progress:
                    self.on_progress(record)
            else:
                self.log_lines.append(line)
                if self.on_line:
                    self.on_line(line)
        if self._process is not None and not self.running and self.returncode is None:
            self.returncode = self._process.wait()
        return handled

    def wait(self, timeout: Optional[float] = None, interval: float = 0.1) -> int:
        """Block until the job ends (handling its lines); returns the exit code."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                break
            time.sleep(interval)
        self.poll()
        return self.returncode if self.returncode is not None else -1

    def cancel(self, grace_seconds: float = 3.0) -> None:
        """End the process and every process it started (terminate, then kill what remains)."""
        import psutil

        if self._process is None or self._process.poll() is not None:
            return
        self.cancelled = True
        try:
            descendants = psutil.Process(self._process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        for process in descendants:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        self._process.terminate()
        try:  # the direct child is reaped by Popen, so that its exit status is kept
            self._process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        _, alive = psutil.wait_procs(descendants, timeout=grace_seconds)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=grace_seconds)
        log.info("job cancelled: %s", " ".join(self.arguments))

    def error_message(self) -> str:
        """The job's ``error: ...`` line (or its last line) for a failed job."""
        for line in reversed(self.log_lines):
            if line.startswith("error:"):
                return line[len("error:"):].strip()
        return self.log_lines[-1] if self.log_lines else f"exit code {self.returncode}"


#
# DeepDosimetricsLogic
#
class DeepDosimetricsLogic(ScriptedLoadableModuleLogic):
    """All behaviour of the module, usable from the Python console and headless (no Qt needed).

    Node conversions go through ``DeepDosimetricsLib.mrml.scene``; computations through the library.
    """

    def __init__(self, scene: Any = None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.lastRadiomicsPath: Optional[str] = None
        self.currentJob: Optional[CliJob] = None

    # ------------------------------------------------------------------ helpers
    @property
    def scene(self) -> Any:
        """The MRML scene the logic adds nodes to."""
        from DeepDosimetricsLib.mrml import scene as mrml

        return mrml.current_scene(self._scene)

    def getParameterNode(self):
        """The typed parameter node (application only)."""
        return DeepDosimetricsParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ patients
    def patientFromNodes(
        self, ctNode, segmentationNode=None, labelmapNodes=(), doseNode=None, patientId=None
    ):
        """The library's Patient built from scene nodes (segments exported on the CT geometry)."""
        from DeepDosimetricsLib.mrml import scene as mrml

        return mrml.patient_from_nodes(ctNode, segmentationNode, labelmapNodes, doseNode, patientId)

    def loadPatientFolder(self, path):
        """Load a patient folder into CT, segmentation and dose nodes; returns scene.PatientNodes."""
        from DeepDosimetricsLib.mrml import scene as mrml

        nodes = mrml.load_patient_folder(path, self.scene)
        mrml.show_reconstruction(nodes.ct, None, None, nodes.dose, nodes.segmentation)
        return nodes

    # ------------------------------------------------------------------ radiomics
    @staticmethod
    def slicerRadiomicsLogic():
        """SlicerRadiomics' logic when that extension is installed, else None."""
        try:
            from SlicerRadiomics import SlicerRadiomicsLogic
        except ImportError:
            return None
        return SlicerRadiomicsLogic()

    def computeRadiomics(
        self, volumeNode, maskNode, presetOrParameterFile="firstorder", tableNode=None, structures=None,
        useSlicerRadiomics=None,
    ):
        """Radiomics per structure -> table node: one row per feature (column ``Feature``, pyradiomics
        names such as ``original_firstorder_Mean``), one column per structure.

        ``maskNode`` is a segmentation (each segment on the volume's geometry) or a labelmap (each label
        value). Runs through SlicerRadiomics (``runCLIWithParameterFile``, synchronous) when it is
        installed, else pyradiomics directly with the same parameter file; the path used is logged and
        stored in the table's attribute ``DeepDosimetrics.RadiomicsPath``. A dose volume (attribute
        ``DicomRtImport.DoseVolume``) gets a preset's dose variant.
        """
        from DeepDosimetricsLib.features.radiomics import resolve_parameters
        from DeepDosimetricsLib.mrml import scene as mrml
        from DeepDosimetricsLib.runtime.errors import InputError

        if volumeNode is None:
            raise InputError("no image volume selected for radiomics")
        if maskNode is None:
            raise InputError("no segmentation or labelmap selected for radiomics")
        image = "dose" if mrml.is_dose_volume(volumeNode) else "ct"
        params = resolve_parameters(presetOrParameterFile, image)
        if tableNode is None:
            tableNode = self.scene.AddNewNodeByClass(
                "vtkMRMLTableNode", f"{volumeNode.GetName()} radiomics ({params.name if params.path is None else Path(params.name).stem})"
            )
        radiomicsLogic = self.slicerRadiomicsLogic() if useSlicerRadiomics in (None, True) else None
        if useSlicerRadiomics and radiomicsLogic is None:
            raise InputError("SlicerRadiomics is not installed: install it from the Extensions Manager")
        if radiomicsLogic is not None:
            frame, skipped = self._radiomicsThroughSlicerRadiomics(
                radiomicsLogic, volumeNode, maskNode, params, tableNode, structures
            )
            path = "SlicerRadiomics"
        else:
            frame, skipped = self._radiomicsThroughPyradiomics(volumeNode, maskNode, params, structures)
            path = "pyradiomics"
        mrml.table_from_dataframe(frame, table_node=tableNode)
        tableNode.SetAttribute(mrml.RADIOMICS_PATH_ATTRIBUTE, path)
        tableNode.SetAttribute("DeepDosimetrics.RadiomicsParameters", str(params.name))
        tableNode.SetAttribute("DeepDosimetrics.SkippedStructures", json.dumps(skipped))
        self.lastRadiomicsPath = path
        log.info(
            "radiomics of %s on %d structures through %s (%s)",
            volumeNode.GetName(), frame.shape[1] - 1, path, params.name,
        )
        for name, reason in skipped.items():
            log.warning("radiomics: structure %s skipped: %s", name, reason)
        return tableNode

    def _radiomicsMasks(self, volumeNode, maskNode, structures):
        """Structure name -> mask (sitk) for radiomics, and name -> reason for structures skipped."""
        from DeepDosimetricsLib.mrml import scene as mrml
        from DeepDosimetricsLib.runtime.errors import InputError

        masks, skipped = {}, {}
        if maskNode.IsA("vtkMRMLSegmentationNode"):
            segmentation = maskNode.GetSegmentation()
            names = [segmentation.GetSegment(i).GetName() for i in mrml.segment_ids(maskNode)]
            if structures is not None:
                unknown = sorted(set(structures) - set(names))
                if unknown:
                    raise InputError(
                        f"segmentation '{maskNode.GetName()}' has no segment named {', '.join(unknown)}"
                    )
                names = [n for n in names if n in set(structures)]
            for name in names:
                try:
                    masks.update(mrml.segmentation_to_images(maskNode, volumeNode, [name]))
                except InputError as error:
                    skipped[name] = str(error)
        elif maskNode.IsA("vtkMRMLLabelMapVolumeNode"):
            masks = mrml.labelmap_to_images(maskNode)
            if structures is not None:
                masks = {n: m for n, m in masks.items() if n in set(structures)}
        else:
            raise InputError(
                f"mask node '{maskNode.GetName()}' is a {maskNode.GetClassName()}: "
                "a segmentation or a labelmap volume is needed"
            )
        return masks, skipped

    def _radiomicsThroughPyradiomics(self, volumeNode, maskNode, params, structures):
        from DeepDosimetricsLib.features.radiomics import structure_features
        from DeepDosimetricsLib.features.tables import StructureSkipped
        from DeepDosimetricsLib.mrml import scene as mrml

        image = mrml.volume_to_image(volumeNode, "image")
        masks, skipped = self._radiomicsMasks(volumeNode, maskNode, structures)
        columns: Dict[str, Dict[str, float]] = {}
        for name, mask in masks.items():
            try:
                columns[name] = structure_features(image, mask, params)
            except StructureSkipped as error:
                skipped[name] = str(error)
        return self._featureFrame(columns, list(masks)), skipped

    @staticmethod
    def _featureFrame(columns: Dict[str, Dict[str, float]], order: List[str]):
        import pandas as pd

        features: List[str] = []
        for values in columns.values():
            features.extend(f for f in values if f not in features)
        frame = pd.DataFrame({"Feature": features})
        for name in order:
            values = columns.get(name, {})
            frame[name] = [values.get(f, float("nan")) for f in features]
        return frame

    def _radiomicsThroughSlicerRadiomics(self, radiomicsLogic, volumeNode, maskNode, params, tableNode, structures):
        """Run SlicerRadiomics' CLI synchronously, then turn its table into the module's layout."""
        from DeepDosimetricsLib.mrml import scene as mrml

        radiomicsLogic.runSync = True
        parameterFile = params.parameter_file(tempfile.mkdtemp(prefix="DeepDosimetrics-radiomics-"))
        radiomicsLogic.runCLIWithParameterFile(volumeNode, maskNode, tableNode, str(parameterFile))
        raw = mrml.dataframe_from_table(tableNode)
        keys = {"Image type", "Feature Class", "Feature Name"}
        if not keys.issubset(raw.columns) or raw.empty:
            from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError

            raise DeepDosimetricsError(
                "SlicerRadiomics returned no features (an empty table); run with useSlicerRadiomics=False "
                "to use pyradiomics directly"
            )
        raw = raw[raw["Feature Class"].astype(str) != "diagnostics"]
        prefixes = (f"{maskNode.GetName()}_segment_", f"{maskNode.GetName()}_label_")
        columns: Dict[str, Dict[str, float]] = {}
        for column in raw.columns:
            if column in keys:
                continue
            name = column
            for prefix in prefixes:
                if column.startswith(prefix):
                    name = column[len(prefix):] if prefix.endswith("segment_") else f"{maskNode.GetName()}_label_{column[len(prefix):]}"
            if structures is not None and name not in structures:
                continue
            values = {}
            for _, row in raw.iterrows():
                feature = f"{row['Image type']}_{row['Feature Class']}_{row['Feature Name']}"
                try:
                    values[feature] = float(row[column])
                except (TypeError, ValueError):
                    values[feature] = float("nan")
            columns[name] = values
        return self._featureFrame(columns, list(columns)), {}

    # ------------------------------------------------------------------ DVH
    def computeDoseVolumeMetrics(
        self, doseNode, segmentationNode, ctNode=None, tableNode=None, binWidthGy=0.1, structures=None
    ):
        """Dose-volume metrics per structure -> (table node, plot chart node of the cumulative DVHs).

        With ``ctNode`` the dose is resampled onto the CT grid (as the ``dvh`` command does); without it
        the segments are exported on the dose grid. The table has a ``Metric`` column (``volume_cc``,
        ``Dmean_Gy``, ``D95_Gy``, ``V20Gy_pct``...) and one column per structure.
        """
        import numpy as np
        from DeepDosimetricsLib.features import dosimetrics
        from DeepDosimetricsLib.features.tables import StructureSkipped
        from DeepDosimetricsLib.mrml import scene as mrml
        from DeepDosimetricsLib.runtime.errors import InputError

        if doseNode is None:
            raise InputError("no dose volume selected")
        if segmentationNode is None:
            raise InputError("no segmentation selected for the dose-volume metrics")
        metrics: Dict[str, Dict[str, float]] = {}
        curves: Dict[str, tuple] = {}
        skipped: Dict[str, str] = {}
        if ctNode is not None:
            patient = mrml.patient_from_nodes(ctNode, segmentationNode, dose_node=doseNode)
            dose = patient.dose()
            voxel_cc = float(np.prod(patient.ct_image().GetSpacing())) / 1000.0
            names = patient.structure_names if structures is None else list(structures)
            masks = {}
            for name in names:
                masks[name] = patient.structure(name)
        else:
            dose = mrml.volume_to_array(doseNode).astype(np.float32)
            voxel_cc = float(np.prod(doseNode.GetSpacing())) / 1000.0
            masks = {}
            segmentation = segmentationNode.GetSegmentation()
            names = [segmentation.GetSegment(i).GetName() for i in mrml.segment_ids(segmentationNode)]
            for name in names if structures is None else list(structures):
                try:
                    masks.update(mrml.segmentation_to_arrays(segmentationNode, doseNode, [name]))
                except InputError as error:
                    skipped[name] = str(error)
        for name, mask in masks.items():
            try:
                metrics[name] = dosimetrics.dose_volume_metrics(dose, mask, voxel_cc)
                curves[name] = dosimetrics.cumulative_dvh(dose, mask, binWidthGy)
            except StructureSkipped as error:
                skipped[name] = str(error)
        if not metrics:
            raise InputError(
                f"no structure of segmentation '{segmentationNode.GetName()}' overlaps the dose "
                f"'{doseNode.GetName()}': " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
            )
        frame = self._featureFrame(metrics, list(metrics)).rename(columns={"Feature": "Metric"})
        if tableNode is None:
            tableNode = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{doseNode.GetName()} DVH metrics")
        mrml.table_from_dataframe(frame, table_node=tableNode)
        tableNode.SetAttribute("DeepDosimetrics.SkippedStructures", json.dumps(skipped))
        _, chartNode = mrml.dvh_chart(curves, f"{doseNode.GetName()} DVH", self.scene)
        for name, reason in skipped.items():
            log.warning("DVH: structure %s skipped: %s", name, reason)
        return tableNode, chartNode

    # ------------------------------------------------------------------ long jobs
    def runJob(self, arguments, blocking=False, onLine=None, onProgress=None, timeout=None):
        """Run ``deepdosimetrics <arguments>`` in a background process.

        Non-blocking (the widget): returns the started CliJob; poll it, cancel it with cancelJob().
        Blocking (console, batch): waits, returns the CliJob, raises DeepDosimetricsError if it failed.
        """
        from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError

        if self.currentJob is not None and self.currentJob.running:
            raise DeepDosimetricsError("a job is already running: cancel it or wait for it to finish")
        job = CliJob(arguments, on_line=onLine, on_progress=onProgress)
        self.currentJob = job.start()
        if not blocking:
            return job
        code = job.wait(timeout=timeout)
        if code != 0 and not job.cancelled:
            raise DeepDosimetricsError(f"deepdosimetrics {arguments[0]} failed: {job.error_message()}")
        return job

    def cancelJob(self):
        """Cancel the running job (the whole process tree)."""
        if self.currentJob is not None:
            self.currentJob.cancel()

    @staticmethod
    def trainArguments(cohortFolder, modelFolder, channels="default", steps=2000, device="auto"):
        """Command-line arguments of a training job."""
        return ["train", "--cohort", str(cohortFolder), "--out", str(modelFolder), "--channels", str(channels),
                "--steps", str(int(steps)), "--device", str(device)]

    @staticmethod
    def encodeArguments(modelFolder, cohortFolder, outputFolder, reconstruct=True, overlap=0.5, device="auto"):
        """Command-line arguments of a cohort encoding job."""
        arguments = ["encode", "--model", str(modelFolder), "--cohort", str(cohortFolder), "--out", str(outputFolder),
                     "--overlap", str(float(overlap)), "--device", str(device)]
        if reconstruct:
            arguments.append("--reconstruct")
        return arguments

    # ------------------------------------------------------------------ encoding and reconstruction
    def exportPatientFolder(self, ctNode, segmentationNode=None, doseNode=None, folder=None, patientId=None):
        """Write the nodes as one patient in the canonical layout (ct.nrrd, structures/, dose.nrrd)
        under ``folder`` (a new temporary cohort by default); returns the patient folder."""
        import SimpleITK as sitk

        patient = self.patientFromNodes(ctNode, segmentationNode, (), doseNode, patientId)
        cohort = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="DeepDosimetrics-cohort-"))
        import re

        target = cohort / (re.sub(r"[^A-Za-z0-9_.+-]+", "_", patient.id).strip("_") or "patient")
        (target / "structures").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(patient.ct_image(), str(target / "ct.nrrd"), True)
        for name in patient.structure_names:
            sitk.WriteImage(patient.structure_image(name), str(target / "structures" / f"{name}.nrrd"), True)
        if patient.has_dose:
            sitk.WriteImage(patient.dose_image(), str(target / "dose.nrrd"), True)
        return target

    def encodeNodes(
        self, ctNode, segmentationNode=None, doseNode=None, modelFolder=None, outputFolder=None,
        reconstruct=True, overlap=0.5, device="auto", blocking=True,
    ):
        """Encode the patient in the scene with a trained model (``deepdosimetrics encode``).

        The nodes are written as a one-patient cohort in a temporary folder (with its own
        preprocessing cache) and encoded in a background process. Blocking, the features table and
        (with ``reconstruct``) the reconstruction and residual volumes are added to the scene and shown
        over the CT, the temporary folder is removed, and a dict name -> added node is returned. Not
        blocking, the started CliJob is returned: when it has finished, call
        ``loadEncodingResults(outputFolder, ctNode, job.patientId, ...)``.
        """
        from DeepDosimetricsLib.runtime.errors import InputError

        if modelFolder is None or not Path(modelFolder).is_dir():
            raise InputError(f"model folder {modelFolder} does not exist")
        work = Path(tempfile.mkdtemp(prefix="DeepDosimetrics-encode-"))
        try:
            patientFolder = self.exportPatientFolder(ctNode, segmentationNode, doseNode, work / "cohort")
            outputFolder = Path(outputFolder) if outputFolder else work / "out"
            arguments = self.encodeArguments(
                modelFolder, patientFolder.parent, outputFolder, reconstruct, overlap, device
            ) + ["--cache", str(work / "cache")]
            job = self.runJob(arguments, blocking=blocking)
            job.patientId = patientFolder.name
            if not blocking:
                job.workFolder = work
                return job
            return self.loadEncodingResults(outputFolder, ctNode, patientFolder.name, doseNode, segmentationNode)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            if blocking:
                shutil.rmtree(work, ignore_errors=True)

    def loadEncodingResults(self, outputFolder, ctNode, patientId, doseNode=None, segmentationNode=None):
        """Add one patient's encoding results to the scene and overlay them on the CT.

        Reads ``<out>/<patient>/features.csv`` (a table node) and, when reconstructed,
        ``<out>/<patient>/recon/<channel>.nrrd`` (reconstruction), ``<channel>_residual.nrrd`` (residual,
        diverging colours) and ``<channel>_label.nrrd`` (thresholded structure channels, labelmaps).
        The shown channel is the soft-tissue window when the model has it (as in the snapshots).
        """
        import pandas as pd
        import SimpleITK as sitk
        from DeepDosimetricsLib.mrml import scene as mrml
        from DeepDosimetricsLib.mrml.snapshots import PREFERRED_WINDOWS
        from DeepDosimetricsLib.runtime.errors import InputError

        patientFolder = Path(outputFolder) / str(patientId)
        if not patientFolder.is_dir():
            skipped = Path(outputFolder) / "skipped.csv"
            if skipped.is_file():
                reasons = pd.read_csv(skipped, dtype=str)
                reasons = reasons[reasons["patient"] == str(patientId)]
                if len(reasons):
                    raise InputError(f"patient {patientId} was not encoded: {reasons['reason'].iloc[0]}")
            raise InputError(f"encoding output {patientFolder} does not exist")
        added: Dict[str, Any] = {}
        features = patientFolder / "features.csv"
        if features.is_file():
            added["features"] = mrml.table_from_dataframe(
                pd.read_csv(features), f"{ctNode.GetName()} deep features", self.scene
            )
        reconstructions, residuals = {}, {}
        for path in sorted((patientFolder / "recon").glob("*.nrrd")):
            stem = path.name[: -len(".nrrd")]
            image = sitk.ReadImage(str(path))
            if stem.endswith("_label"):
                added[stem] = mrml.image_to_volume(image, f"{ctNode.GetName()} recon {stem}", self.scene, labelmap=True)
            elif stem.endswith("_residual"):
                node = mrml.image_to_volume(image, f"{ctNode.GetName()} residual {stem[: -len('_residual')]}", self.scene)
                mrml.set_residual_display(node)
                residuals[stem[: -len("_residual")]] = added[stem] = node
            else:
                node = mrml.image_to_volume(image, f"{ctNode.GetName()} recon {stem}", self.scene)
                if stem == "dose":
                    mrml.set_dose_display(node)
                reconstructions[stem] = added[stem] = node
        preferred = [label.replace(":", "_") for label in PREFERRED_WINDOWS]
        shown = next((s for s in preferred if s in reconstructions), None)
        shown = shown or next((s for s in reconstructions if s.startswith("window")), None)
        shown = shown or next(iter(reconstructions), None)
        if shown is not None:
            self.showReconstruction(ctNode, reconstructions[shown], residuals.get(shown), doseNode, segmentationNode)
        return added

    def showReconstruction(self, ctNode, reconNode=None, residualNode=None, doseNode=None, segmentationNode=None, opacity=0.5):
        """CT background, reconstruction foreground at ``opacity``, residual with a diverging map symmetric
        around zero, dose with a dose map hiding zero, structures as outlines."""
        from DeepDosimetricsLib.mrml import scene as mrml

        mrml.show_reconstruction(ctNode, reconNode, residualNode, doseNode, segmentationNode, opacity)

    def saveSnapshots(self, outPrefix, ctNode, foregroundNode=None, rasPoint=None, opacity=0.5, labelNode=None):
        """Axial, coronal and sagittal PNG snapshots (``<prefix>_<view>.png``) through ``rasPoint``."""
        from DeepDosimetricsLib.mrml import scene as mrml

        return mrml.write_snapshots(outPrefix, ctNode, rasPoint, foregroundNode, opacity, labelNode)

    def saveSceneBundle(self, path):
        """Write the scene as a Slicer data bundle (.mrb)."""
        if getattr(slicer, "app", None) is not None:
            if not slicer.util.saveScene(str(path)):
                from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError

                raise DeepDosimetricsError(f"could not save the scene to {path}")
            return Path(path)
        from DeepDosimetricsLib.mrml import scene as mrml

        return mrml.save_scene_bundle(path, self.scene)


#
# DeepDosimetricsWidget
#
class DeepDosimetricsWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs, radiomics/DVH, training/encoding with progress, log and Cancel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._jobTimer = None
        self._sceneEncoding = None

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

        self.ui.loadPatientButton.connect("clicked(bool)", self.onLoadPatient)
        self.ui.radiomicsButton.connect("clicked(bool)", self.onRadiomics)
        self.ui.dvhButton.connect("clicked(bool)", self.onDoseVolumeMetrics)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.encodeButton.connect("clicked(bool)", self.onEncode)
        self.ui.encodeSceneButton.connect("clicked(bool)", self.onEncodeScene)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.cancelButton.enabled = False

        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(200)
        self._jobTimer.connect("timeout()", self.onJobTimer)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self.logic is not None:
            self.logic.cancelJob()
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
        """Parameter node of the module, with sensible default inputs."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.ctVolume:
            from DeepDosimetricsLib.mrml import scene as mrml

            volumes = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if not mrml.is_dose_volume(n)]
            if volumes:
                self._parameterNode.ctVolume = volumes[0]
        if not self._parameterNode.doseVolume:
            from DeepDosimetricsLib.mrml import scene as mrml

            doses = mrml.find_dose_volumes(slicer.mrmlScene)
            if doses:
                self._parameterNode.doseVolume = doses[0]

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
        self.ui.radiomicsButton.enabled = hasSeg and (hasDose if p and p.radiomicsOnDose else hasCt)
        self.ui.dvhButton.enabled = hasSeg and hasDose
        self.ui.trainButton.enabled = not busy and bool(p and _isSet(p.cohortFolder) and _isSet(p.modelFolder))
        self.ui.encodeButton.enabled = not busy and bool(
            p and _isSet(p.cohortFolder) and _isSet(p.modelFolder) and _isSet(p.outputFolder)
        )
        self.ui.encodeSceneButton.enabled = not busy and hasCt and bool(p and _isSet(p.modelFolder))
        self.ui.cancelButton.enabled = busy

    # ------------------------------------------------------------------ actions
    def onLoadPatient(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, "Patient folder (ct.nrrd, structures, dose.nrrd)")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Failed to load the patient folder.", waitCursor=True):
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
            table = self.logic.computeRadiomics(volume, p.segmentation, spec)
            self._log(f"Radiomics table '{table.GetName()}' computed through {self.logic.lastRadiomicsPath}.")
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()

    def onDoseVolumeMetrics(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Dose-volume metrics failed.", waitCursor=True):
            table, chart = self.logic.computeDoseVolumeMetrics(p.doseVolume, p.segmentation, p.ctVolume)
            self._log(f"DVH table '{table.GetName()}' and chart '{chart.GetName()}' added.")
            slicer.modules.plots.logic().ShowChartInLayout(chart)

    def onTrain(self) -> None:
        p = self._parameterNode
        self._startJob(self.logic.trainArguments(p.cohortFolder, p.modelFolder, p.channels, p.trainingSteps, p.device))

    def onEncode(self) -> None:
        p = self._parameterNode
        self._startJob(self.logic.encodeArguments(
            p.modelFolder, p.cohortFolder, p.outputFolder, p.reconstruct, p.overlap, p.device
        ))

    def onEncodeScene(self) -> None:
        p = self._parameterNode
        self.ui.progressBar.value = 0
        with slicer.util.tryWithErrorDisplay("Encoding failed.", waitCursor=True):
            job = self.logic.encodeNodes(
                p.ctVolume, p.segmentation, p.doseVolume, p.modelFolder,
                p.outputFolder if _isSet(p.outputFolder) else None, p.reconstruct, p.overlap, p.device,
                blocking=False,
            )
            job.on_line, job.on_progress = self._log, self._onProgress
            self._sceneEncoding = (job, job.arguments[job.arguments.index("--out") + 1], p.ctVolume, p.doseVolume,
                                   p.segmentation)
            self._log("$ deepdosimetrics " + " ".join(job.arguments))
            self._jobTimer.start()
        self._checkCanApply()

    def _finishSceneEncoding(self, job) -> None:
        pending = getattr(self, "_sceneEncoding", None)
        if not pending or pending[0] is not job:
            return
        self._sceneEncoding = None
        _, outputFolder, ctNode, doseNode, segmentationNode = pending
        try:
            if job.returncode == 0 and not job.cancelled:
                with slicer.util.tryWithErrorDisplay("Could not load the encoding results.", waitCursor=True):
                    added = self.logic.loadEncodingResults(outputFolder, ctNode, job.patientId, doseNode, segmentationNode)
                    self._log("Added: " + ", ".join(node.GetName() for node in added.values()))
        finally:
            if job.workFolder is not None:
                shutil.rmtree(job.workFolder, ignore_errors=True)

    def onCancel(self) -> None:
        self.logic.cancelJob()
        self._log("Cancelled.")

    def _startJob(self, arguments) -> None:
        self.ui.progressBar.value = 0
        self._log("$ deepdosimetrics " + " ".join(arguments))
        with slicer.util.tryWithErrorDisplay("Could not start the job."):
            self.logic.runJob(arguments, blocking=False, onLine=self._log, onProgress=self._onProgress)
            self._jobTimer.start()
        self._checkCanApply()

    def onJobTimer(self) -> None:
        job = self.logic.currentJob
        if job is None:
            self._jobTimer.stop()
            return
        job.poll()
        if not job.running:
            self._jobTimer.stop()
            if job.cancelled:
                self._log("Job cancelled.")
            elif job.returncode == 0:
                self.ui.progressBar.value = 100
                self._log("Job finished.")
            else:
                self._log(f"Job failed: {job.error_message()}")
                slicer.util.errorDisplay(f"deepdosimetrics {job.arguments[0]} failed: {job.error_message()}")
            self._finishSceneEncoding(job)
            self._checkCanApply()

    def _onProgress(self, record: dict) -> None:
        done, total = record.get("done") or 0, record.get("total")
        if total:
            self.ui.progressBar.value = int(100 * done / total)
        extra = ", ".join(f"{k}={v}" for k, v in record.items() if k not in ("task", "done", "total"))
        self.ui.progressBar.setFormat(f"{record.get('task', '')} %p% {extra}".strip())

    def _log(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(str(line))


def _isSet(path) -> bool:
    """Whether a Path parameter holds a real path (an unset one reads as '' or '.')."""
    return path is not None and str(path) not in ("", ".")


#
# DeepDosimetricsTest
#
class DeepDosimetricsTest(ScriptedLoadableModuleTest):
    """Runs a small phantom through the Logic (in Slicer: Reload and Test; headless: pytest)."""

    def setUp(self):
        """A clean scene: Slicer's own, or a new headless one."""
        from DeepDosimetricsLib.mrml import scene as mrml

        if getattr(slicer, "app", None) is not None:
            slicer.mrmlScene.Clear()
            self._headless = None
        else:
            self._headless = mrml.create_headless_scene()
        self._workdir = Path(tempfile.mkdtemp(prefix="DeepDosimetricsTest-"))

    def tearDown(self):
        from DeepDosimetricsLib.mrml import scene as mrml

        if getattr(self, "_headless", None) is not None:
            mrml.close_headless_scene(self._headless)
        shutil.rmtree(getattr(self, "_workdir", ""), ignore_errors=True)

    def runTest(self):
        self.setUp()
        try:
            self.test_DeepDosimetrics_phantom()
        finally:
            self.tearDown()

    def _phantomPatientFolder(self) -> Path:
        """A small deterministic patient folder (CT with a body and a PTV, dose peaked on the PTV)."""
        import numpy as np
        import SimpleITK as sitk

        folder = self._workdir / "phantom"
        (folder / "structures").mkdir(parents=True)
        z, y, x = np.mgrid[0:16, 0:24, 0:24]
        body = ((x - 12) ** 2 / 100 + (y - 12) ** 2 / 64) <= 1
        ct = np.where(body, 40, -1000).astype(np.int16) + ((x + 2 * y + 3 * z) % 7).astype(np.int16)
        ptv = (((x - 12) ** 2 + (y - 12) ** 2 + (z - 8) ** 2) <= 16).astype(np.uint8)
        dose = (60.0 * np.exp(-(((x - 12) ** 2 + (y - 12) ** 2 + (z - 8) ** 2) / 50.0)) * body).astype(np.float32)
        for array, name in ((ct, "ct.nrrd"), (ptv, "structures/PTV.nrrd"), (body.astype(np.uint8), "structures/BODY.nrrd"),
                            (dose, "dose.nrrd")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((2.0, 2.0, 2.5))
            image.SetOrigin((-24.0, -30.0, 10.0))
            sitk.WriteImage(image, str(folder / name))
        return folder

    def test_DeepDosimetrics_phantom(self):
        from DeepDosimetricsLib.mrml import scene as mrml

        self.delayDisplay("Loading a phantom patient")
        logic = DeepDosimetricsLogic()
        nodes = logic.loadPatientFolder(self._phantomPatientFolder())
        self.assertTrue(mrml.is_dose_volume(nodes.dose))
        self.assertEqual(nodes.segmentation.GetSegmentation().GetNumberOfSegments(), 2)

        self.delayDisplay("Patient from nodes")
        patient = logic.patientFromNodes(nodes.ct, nodes.segmentation, doseNode=nodes.dose)
        self.assertEqual(sorted(patient.structure_names), ["BODY", "PTV"])
        self.assertEqual(int(patient.structure("PTV").sum()), 257)

        self.delayDisplay("Radiomics")
        table = logic.computeRadiomics(nodes.ct, nodes.segmentation, "firstorder", useSlicerRadiomics=False)
        frame = mrml.dataframe_from_table(table)
        self.assertIn("original_firstorder_Mean", list(frame["Feature"]))
        self.assertEqual(table.GetAttribute(mrml.RADIOMICS_PATH_ATTRIBUTE), "pyradiomics")

        self.delayDisplay("Dose-volume metrics")
        dvhTable, chart = logic.computeDoseVolumeMetrics(nodes.dose, nodes.segmentation, nodes.ct)
        metrics = mrml.dataframe_from_table(dvhTable).set_index("Metric")
        self.assertGreater(metrics.loc["Dmean_Gy", "PTV"], metrics.loc["Dmean_Gy", "BODY"])
        self.assertEqual(chart.GetNumberOfPlotSeriesNodes(), 2)

        self.delayDisplay("Overlay and snapshots")
        logic.showReconstruction(nodes.ct, None, None, nodes.dose, nodes.segmentation)
        written = logic.saveSnapshots(self._workdir / "snap", nodes.ct, nodes.dose)
        self.assertEqual(sorted(written), ["axial", "coronal", "sagittal"])
        self.delayDisplay("Test passed")
