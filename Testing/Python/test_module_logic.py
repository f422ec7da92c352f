"""The Slicer modules' Logics without the Slicer application (slicer-core only): patients from nodes,
radiomics equal to pyradiomics on the same files, DVH tables and charts, background jobs, outcome analysis
(DeepDosimetricsOutcome), and each module's own Test class."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytestmark = pytest.mark.slicer

try:
    import slicer  # noqa: F401
except ImportError as error:  # pragma: no cover - slicer-core is part of the dev install
    pytest.skip(f"slicer-core is not installed ({error})", allow_module_level=True)

from DeepDosimetricsLib import mrml  # noqa: E402
from DeepDosimetricsLib.data.patient import Patient  # noqa: E402
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError, InputError  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[2] / "DeepDosimetrics"
OUTCOME_DIR = MODULE_DIR.parent / "DeepDosimetricsOutcome"
OPENKBP_STRUCTURES = ("PTV70", "Brainstem", "SpinalCord")


@pytest.fixture(scope="module")
def module():
    """DeepDosimetrics.py imported as Slicer would (its folder on sys.path), without Qt."""
    sys.path.insert(0, str(MODULE_DIR))
    try:
        import DeepDosimetrics

        yield DeepDosimetrics
    finally:
        sys.path.remove(str(MODULE_DIR))


@pytest.fixture(scope="module")
def outcome_module():
    """DeepDosimetricsOutcome.py imported as Slicer would: its folder on sys.path, the Lib beside it."""
    sys.path.insert(0, str(OUTCOME_DIR))
    try:
        import DeepDosimetricsOutcome

        yield DeepDosimetricsOutcome
    finally:
        sys.path.remove(str(OUTCOME_DIR))


@pytest.fixture(scope="module")
def headless():
    wired = mrml.headless.create_headless_scene()
    yield wired
    mrml.headless.close_headless_scene(wired)


@pytest.fixture()
def scene(headless):
    slicer.mrmlScene = headless.scene
    yield headless.scene
    headless.scene.Clear(False)


@pytest.fixture()
def logic(module, scene):
    return module.DeepDosimetricsLogic(scene)


@pytest.fixture(scope="module")
def patient_dir(phantom_cohort) -> Path:
    return sorted(p for p in phantom_cohort.iterdir() if p.is_dir())[0]


def structure_files(folder: Path) -> list[Path]:
    """Structure NRRDs of a canonical (structures/) or flat (OpenKBP) patient folder."""
    if (folder / "structures").is_dir():
        return sorted((folder / "structures").glob("*.nrrd"))
    return sorted(p for p in folder.glob("*.nrrd") if p.stem not in ("ct", "dose", "possible_dose_mask"))


def load_like_slicer(folder: Path, headless, names=None):
    """CT read by Slicer's reader; structures read as labelmaps and imported into one segmentation."""
    volumes = headless.logic("Volumes")
    ct = volumes.AddArchetypeVolume(str(folder / "ct.nrrd"), "CT", 0)
    segmentation = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Structures")
    for path in structure_files(folder):
        if names is not None and path.stem not in names:
            continue
        labelmap = volumes.AddArchetypeVolume(str(path), path.stem, 1)
        assert headless.logic("Segmentations").ImportLabelmapToSegmentationNode(labelmap, segmentation)
        segmentation.GetSegmentation().GetSegment(mrml.segments.segment_ids(segmentation)[-1]).SetName(path.stem)
    return ct, segmentation


def pyradiomics_on_files(image: Path, mask: Path, preset: str) -> dict:
    """Bare pyradiomics on the files, with the preset's parameter file."""
    import radiomics
    from DeepDosimetricsLib.features.radiomics import resolve_parameters
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    radiomics.setVerbosity(logging.ERROR)
    extractor = RadiomicsFeatureExtractor(str(resolve_parameters(preset).path))
    result = extractor.execute(str(image), str(mask))
    return {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}


def assert_table_equals_pyradiomics(table, folder: Path, preset: str, names):
    frame = mrml.tables.dataframe_from_table(table).set_index("Feature")
    assert sorted(frame.columns) == sorted(names)
    for name in names:
        mask = next(p for p in structure_files(folder) if p.stem == name)
        expected = pyradiomics_on_files(folder / "ct.nrrd", mask, preset)
        assert sorted(frame.index) == sorted(expected)
        mismatched = {k: (v, frame.loc[k, name]) for k, v in expected.items() if frame.loc[k, name] != v}
        assert not mismatched, f"{name}: {mismatched}"


# ---------------------------------------------------------------------------------------- import
def test_module_imports_without_qt(module, outcome_module):
    assert module.HAS_SLICER_GUI is False and outcome_module.HAS_SLICER_GUI is False
    assert module.DeepDosimetricsLogic().lastRadiomicsPath is None
    from DeepDosimetricsLib.mrml.panel import JobLogic, JobPanel

    for logic, widget in ((module.DeepDosimetricsLogic, module.DeepDosimetricsWidget),
                          (outcome_module.DeepDosimetricsOutcomeLogic, outcome_module.DeepDosimetricsOutcomeWidget)):
        assert issubclass(logic, JobLogic) and issubclass(widget, JobPanel)
    assert not hasattr(module.DeepDosimetricsLogic, "predictOutcome")


# ---------------------------------------------------------------------------------------- patients
def test_patient_from_nodes_and_load_patient_folder(logic, patient_dir):
    nodes = logic.loadPatientFolder(patient_dir)
    reference = Patient.from_folder(patient_dir)
    patient = logic.patientFromNodes(nodes.ct, nodes.segmentation, doseNode=nodes.dose)
    assert patient.structure_names == reference.structure_names
    np.testing.assert_array_equal(patient.structure("PTV"), reference.structure("PTV"))
    assert mrml.volumes.is_dose_volume(nodes.dose)


# ---------------------------------------------------------------------------------------- radiomics
def test_radiomics_equals_pyradiomics_on_the_files(logic, headless, patient_dir):
    ct, segmentation = load_like_slicer(patient_dir, headless)
    names = [p.stem for p in structure_files(patient_dir)]
    table = logic.computeRadiomics(ct, segmentation, "firstorder")
    assert table.GetAttribute(mrml.tables.RADIOMICS_PATH_ATTRIBUTE) == "pyradiomics"
    assert logic.lastRadiomicsPath == "pyradiomics"
    assert_table_equals_pyradiomics(table, patient_dir, "firstorder", names)
    frame = mrml.tables.dataframe_from_table(table)
    assert len(frame) == 18  # the group's first table: 18 first-order features, one row each


def test_radiomics_all_classes_on_one_structure(logic, headless, patient_dir):
    ct, segmentation = load_like_slicer(patient_dir, headless, names=["PTV"])
    table = logic.computeRadiomics(ct, segmentation, "all", structures=["PTV"])
    assert_table_equals_pyradiomics(table, patient_dir, "all", ["PTV"])


def test_dosiomics_use_the_dose_variant_of_the_preset(logic, headless, patient_dir):
    import radiomics
    from DeepDosimetricsLib.features.radiomics import resolve_parameters
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    dose = headless.logic("Volumes").AddArchetypeVolume(str(patient_dir / "dose.nrrd"), "dose", 0)
    mrml.volumes.mark_dose_volume(dose)
    labelmap = headless.logic("Volumes").AddArchetypeVolume(str(patient_dir / "structures" / "PTV.nrrd"), "PTV", 1)
    table = logic.computeRadiomics(dose, labelmap, "firstorder")
    parameters = resolve_parameters("firstorder", "dose")
    assert parameters.path.name == "firstorder.dose.yaml"
    assert table.GetAttribute("DeepDosimetrics.RadiomicsParameters") == "firstorder"
    radiomics.setVerbosity(logging.ERROR)
    expected = RadiomicsFeatureExtractor(str(parameters.path)).execute(
        str(patient_dir / "dose.nrrd"), str(patient_dir / "structures" / "PTV.nrrd")
    )
    frame = mrml.tables.dataframe_from_table(table).set_index("Feature")
    for name, value in expected.items():
        if not name.startswith("diagnostics_"):
            assert frame.loc[name, "PTV"] == float(value), name


def test_radiomics_on_a_labelmap_node(logic, headless, patient_dir):
    ct = headless.logic("Volumes").AddArchetypeVolume(str(patient_dir / "ct.nrrd"), "CT", 0)
    labelmap = headless.logic("Volumes").AddArchetypeVolume(str(patient_dir / "structures" / "PTV.nrrd"), "PTV", 1)
    table = logic.computeRadiomics(ct, labelmap, "firstorder")
    assert_table_equals_pyradiomics(table, patient_dir, "firstorder", ["PTV"])


def test_radiomics_equals_pyradiomics_on_openkbp(logic, headless, openkbp_train):
    folder = openkbp_train / "pt_1"
    names = [n for n in OPENKBP_STRUCTURES if (folder / f"{n}.nrrd").is_file()]
    ct, segmentation = load_like_slicer(folder, headless, names=names)
    table = logic.computeRadiomics(ct, segmentation, "firstorder")
    assert_table_equals_pyradiomics(table, folder, "firstorder", names)


def test_radiomics_through_slicerradiomics_when_installed(logic, headless, patient_dir, monkeypatch):
    """With SlicerRadiomics importable its logic runs (synchronously, with the parameter file) and its
    table (Image type, Feature Class, Feature Name, <segmentation>_segment_<name>, text values) is
    turned into the module's layout."""
    calls = []

    class FakeSlicerRadiomicsLogic:
        runSync = False

        def runCLIWithParameterFile(self, imageNode, maskNode, tableNode, parameterFilePath):  # noqa: N802
            calls.append((self.runSync, Path(parameterFilePath).is_file()))
            import pandas as pd

            image = mrml.volumes.volume_to_image(imageNode)
            rows = {"Image type": [], "Feature Class": [], "Feature Name": []}
            columns = {}
            for name, mask in mrml.segments.segmentation_to_images(maskNode, imageNode).items():
                from radiomics.featureextractor import RadiomicsFeatureExtractor

                result = RadiomicsFeatureExtractor(parameterFilePath).execute(image, mask)
                columns[f"{maskNode.GetName()}_segment_{name}"] = [str(v) for v in result.values()]
                keys = list(result)
            for key in keys:  # as SlicerRadiomics splits them: diagnostics land in "Image type"
                kind, klass, feature = key.split("_", 2)
                rows["Image type"].append(kind)
                rows["Feature Class"].append(klass)
                rows["Feature Name"].append(feature)
            mrml.tables.table_from_dataframe(pd.DataFrame({**rows, **columns}).astype(str), table_node=tableNode)

    monkeypatch.setitem(sys.modules, "SlicerRadiomics", types.SimpleNamespace(SlicerRadiomicsLogic=FakeSlicerRadiomicsLogic))
    ct, segmentation = load_like_slicer(patient_dir, headless, names=["PTV", "Heart"])
    table = logic.computeRadiomics(ct, segmentation, "firstorder")
    assert calls == [(True, True)]
    assert table.GetAttribute(mrml.tables.RADIOMICS_PATH_ATTRIBUTE) == "SlicerRadiomics"
    assert_table_equals_pyradiomics(table, patient_dir, "firstorder", ["Heart", "PTV"])
    with pytest.raises(InputError, match="SlicerRadiomics is not installed"):
        monkeypatch.delitem(sys.modules, "SlicerRadiomics")
        monkeypatch.setitem(sys.modules, "SlicerRadiomics", None)
        logic.computeRadiomics(ct, segmentation, "firstorder", useSlicerRadiomics=True)


def test_radiomics_bad_input(logic, scene, patient_dir):
    nodes = logic.loadPatientFolder(patient_dir)
    with pytest.raises(InputError, match="no image volume"):
        logic.computeRadiomics(None, nodes.segmentation)
    with pytest.raises(InputError, match="no segmentation or labelmap"):
        logic.computeRadiomics(nodes.ct, None)
    with pytest.raises(InputError, match="unknown radiomics preset 'texture'.*firstorder"):
        logic.computeRadiomics(nodes.ct, nodes.segmentation, "texture")
    with pytest.raises(InputError, match="no segment named Liver"):
        logic.computeRadiomics(nodes.ct, nodes.segmentation, structures=["Liver"])
    with pytest.raises(InputError, match="a segmentation or a labelmap volume is needed"):
        logic.computeRadiomics(nodes.ct, nodes.dose)
    # an empty segment is skipped with its reason, the others are computed
    nodes.segmentation.GetSegmentation().AddEmptySegment("Empty", "Empty")
    table = logic.computeRadiomics(nodes.ct, nodes.segmentation, structures=["PTV", "Empty"])
    assert list(mrml.tables.dataframe_from_table(table).columns) == ["Feature", "PTV"]
    assert "is empty" in json.loads(table.GetAttribute("DeepDosimetrics.SkippedStructures"))["Empty"]


# ---------------------------------------------------------------------------------------- DVH
def test_dose_volume_metrics_equal_the_library_on_the_ct_grid(logic, patient_dir):
    from DeepDosimetricsLib.features.dosimetrics import patient_dvh

    nodes = logic.loadPatientFolder(patient_dir)
    table, chart = logic.computeDoseVolumeMetrics(nodes.dose, nodes.segmentation, nodes.ct)
    frame = mrml.tables.dataframe_from_table(table).set_index("Metric")
    expected = patient_dvh(Patient.from_folder(patient_dir)).metrics
    expected = expected[expected["feature"].astype(str) != ""]
    assert len(expected) == frame.shape[0] * frame.shape[1]
    for row in expected.itertuples():
        assert frame.loc[row.feature, row.structure] == pytest.approx(row.value, rel=1e-9, abs=1e-9), row
    assert chart.GetNumberOfPlotSeriesNodes() == frame.shape[1]
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetXColumnName() == "Dose (Gy)"


def test_dose_volume_metrics_by_hand_on_the_dose_grid(logic, scene):
    """A uniform 2 Gy dose and a linear gradient, segments exported on the dose grid (no CT)."""
    grid = sitk.Image(10, 10, 10, sitk.sitkFloat32)
    grid.SetSpacing((2.0, 2.0, 2.5))  # 10 mm^3 voxels
    uniform = mrml.volumes.array_to_volume(np.full((10, 10, 10), 2.0, np.float32), mrml.volumes.image_to_volume(grid, "g", scene),
                                   "uniform", scene=scene, dose=True)
    box = np.zeros((10, 10, 10), np.uint8)
    box[2:6, 2:7, 3:8] = 1  # 100 voxels = 1 cc
    segmentation = mrml.segments.add_segmentation({"Box": box}, uniform, "seg", scene)
    table, chart = logic.computeDoseVolumeMetrics(uniform, segmentation)
    metrics = mrml.tables.dataframe_from_table(table).set_index("Metric")["Box"]
    assert metrics["volume_cc"] == pytest.approx(1.0)
    for name in ("Dmean_Gy", "Dmin_Gy", "Dmax_Gy", "D98_Gy", "D95_Gy", "D50_Gy", "D2_Gy"):
        assert metrics[name] == pytest.approx(2.0)
    assert metrics["V5Gy_pct"] == 0.0
    gradient = np.broadcast_to(np.arange(10, dtype=np.float32)[None, None, :] * 10.0, (10, 10, 10)).copy()
    linear = mrml.volumes.array_to_volume(gradient, uniform, "linear", scene=scene, dose=True)
    table, _ = logic.computeDoseVolumeMetrics(linear, segmentation)
    metrics = mrml.tables.dataframe_from_table(table).set_index("Metric")["Box"]
    assert metrics["Dmean_Gy"] == pytest.approx(50.0)  # x = 3..7 -> 30..70 Gy, 20 voxels each
    table, _ = logic.computeDoseVolumeMetrics(linear, segmentation, spatial=True)  # the panel's checkbox
    metrics = mrml.tables.dataframe_from_table(table).set_index("Metric")["Box"]
    assert metrics["dose_gradient_lr_gy_per_mm"] == pytest.approx(5.0)  # 10 Gy per 2 mm column, towards the left
    assert metrics["Dmean_left_half_Gy"] == pytest.approx((70 + 60 + 0.5 * 50) / 2.5)  # columns 7, 6 and half of 5
    assert metrics["Dmean_right_half_Gy"] == pytest.approx((30 + 40 + 0.5 * 50) / 2.5)
    assert metrics["V40Gy_pct"] == pytest.approx(80.0)
    assert metrics["V70Gy_pct"] == pytest.approx(20.0)


def test_dose_volume_metrics_bad_input(logic, scene, patient_dir):
    nodes = logic.loadPatientFolder(patient_dir)
    with pytest.raises(InputError, match="no dose volume"):
        logic.computeDoseVolumeMetrics(None, nodes.segmentation)
    with pytest.raises(InputError, match="no segmentation"):
        logic.computeDoseVolumeMetrics(nodes.dose, None)


# ---------------------------------------------------------------------------------------- jobs
def python_job(module, code: str, **kwargs):
    from DeepDosimetricsLib.runtime.jobs import CliJob

    return CliJob(["script"], command=[sys.executable, "-c", textwrap.dedent(code)], **kwargs)


def test_job_parses_progress_and_log_lines(module):
    progress, lines = [], []
    job = python_job(module, """
        import json, sys
        for i in range(3):
            print("@progress " + json.dumps({"task": "train", "done": i + 1, "total": 3, "loss": 0.5 / (i + 1)}))
        print("epoch done")
        print("tqdm 10%\\rtqdm 100%", file=sys.stderr)
        """, on_progress=progress.append, on_line=lines.append).start()
    assert job.wait(timeout=60) == 0
    assert [p["done"] for p in progress] == [1, 2, 3] and progress[-1]["total"] == 3
    assert job.progress["loss"] == pytest.approx(0.5 / 3)
    assert lines == ["epoch done", "tqdm 100%"]


def test_cancel_ends_the_whole_process_tree(module, tmp_path):
    import psutil

    job = python_job(module, """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print("child", child.pid, flush=True)
        time.sleep(120)
        """).start()
    deadline = time.monotonic() + 30
    child = None
    while child is None and time.monotonic() < deadline:
        job.poll()
        child = next((int(line.split()[1]) for line in job.log_lines if line.startswith("child ")), None)
        time.sleep(0.05)
    assert child is not None, job.log_lines
    parent = job._process.pid
    job.cancel(grace_seconds=5)
    assert job.wait(timeout=30) != 0 and job.cancelled
    for pid in (parent, child):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_blocking_cli_job_runs_and_reports_errors(logic, tmp_path):
    job = logic.runJob(["synth", "--out", str(tmp_path / "cohort"), "--patients", "1", "--shape", "24", "24", "12"],
                       blocking=True, timeout=240)
    assert job.returncode == 0
    assert (tmp_path / "cohort").is_dir() and any((tmp_path / "cohort").iterdir())
    with pytest.raises(DeepDosimetricsError, match=r"dvh failed: .*nowhere"):
        logic.runJob(["dvh", "--cohort", str(tmp_path / "nowhere"), "--out", str(tmp_path / "dvh.csv")],
                     blocking=True, timeout=240)


def test_blocking_job_that_left_patients_out_returns_and_names_them(logic, phantom_cohort, tmp_path, caplog):
    """Exit code 1 (the contract: done, some patients left out, named last) is not a failure: the job comes
    back, with what it left out in the log."""
    import shutil

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    pid = sorted(p.name for p in phantom_cohort.iterdir() if p.is_dir())[0]
    shutil.copytree(phantom_cohort / pid, cohort / pid)
    (cohort / "pt_loop").symlink_to(cohort / "pt_loop")  # an entry that cannot be read
    with caplog.at_level(logging.WARNING):
        job = logic.runJob(["cache", "--cohort", str(cohort), "--cache", str(tmp_path / "cache"), "--quiet"],
                           blocking=True, timeout=240)
    assert job.returncode == 1 and job.finished
    message = job.left_out_message()
    assert message.startswith("left out 1 patient(s)") and "pt_loop" in message and pid not in message
    assert "pt_loop" in caplog.text


def test_module_test_base_runs_every_test_in_a_clean_scene(headless):
    """mrml.panel.ModuleTest (the base of both modules' Test classes): runTest runs each test_* method between
    setUp (a new scene, a work folder) and tearDown (the folder removed)."""
    from DeepDosimetricsLib.mrml.panel import ModuleTest

    seen = []

    class Case(ModuleTest):
        def test_adds_a_node(self):
            seen.append((self.workdir, slicer.mrmlScene, self.workdir.is_dir()))
            slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")

        def test_sees_no_node(self):
            seen.append((self.workdir, slicer.mrmlScene, self.workdir.is_dir()))
            assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0

        def helper(self):  # not a test
            raise AssertionError("not run")

    try:
        Case().runTest()
    finally:
        slicer.mrmlScene = headless.scene
    assert len(seen) == 2 and all(existed for _, _, existed in seen)
    assert seen[0][0] != seen[1][0] and not any(folder.exists() for folder, _, _ in seen)
    assert seen[0][1] is not seen[1][1] and headless.scene not in (seen[0][1], seen[1][1])


def test_job_arguments(module):
    logic = module.DeepDosimetricsLogic
    assert logic.trainArguments("C", "M", "full", 10, "cpu") == [
        "train", "--cohort", "C", "--out", "M", "--channels", "full", "--steps", "10", "--device", "cpu"]
    assert logic.encodeArguments("M", "C", "O", True, 0.25, "auto")[-1] == "--reconstruct"


def test_a_second_job_is_refused_while_one_runs(logic):
    logic.currentJob = types.SimpleNamespace(running=True)
    with pytest.raises(DeepDosimetricsError, match="already running"):
        logic.runJob(["synth"])


# ---------------------------------------------------------------------------------------- outcome analysis
def test_predict_arguments_and_feature_tables(outcome_module):
    logic = outcome_module.DeepDosimetricsOutcomeLogic
    arguments = logic.predictArguments("c.csv", "dvh=d.csv deep=/x/features.csv", "out", folds=3, harmonize="site")
    assert arguments == ["predict", "--clinical", "c.csv", "--outcome", "outcome", "--features", "dvh=d.csv",
                         "deep=/x/features.csv", "--model", "logistic", "--folds", "3", "--repeats", "10",
                         "--harmonize", "site", "--out", "out"]
    external = logic.predictArguments("c.csv", "dvh=d.csv", "out", harmonize="site", validateOn="C")
    assert external[-6:] == ["--harmonize", "site", "--validate-on", "C", "--out", "out"]  # the panel's External site
    survival = logic.predictArguments("c.csv", {"dvh": "d.csv"}, "out", time="months", event="dead")
    assert survival[3:7] == ["--time", "months", "--event", "dead"] and "--outcome" not in survival
    parse = outcome_module.parseFeatureTables
    assert parse({"dvh": "d.csv"}) == parse("dvh=d.csv") == {"dvh": "d.csv"}
    for bad, message in (("d.csv", "NAME=TABLE"), ("dvh=a.csv dvh=b.csv", "twice"), ("dvh=", "no table"),
                         ("clinical=c.csv", "feature set name")):
        with pytest.raises(InputError, match=message):
            parse(bad)


def test_predict_outcome_in_the_background_is_the_predict_command(outcome_module, scene, monkeypatch):
    logic = outcome_module.DeepDosimetricsOutcomeLogic(scene)
    started = []
    monkeypatch.setattr(logic, "runJob", lambda arguments: started.append(arguments) or "job")
    assert logic.predictOutcome("c.csv", "dvh=d.csv", "out", repeats=2, blocking=False) == "job"
    assert started == [logic.predictArguments("c.csv", "dvh=d.csv", "out", repeats=2)]
    with pytest.raises(InputError, match="run the outcome analysis first"):
        logic.loadPredictionResults("nowhere")


# ---------------------------------------------------------------------------------------- module Tests
def test_the_module_test_class_passes_headless(module, headless):
    case = module.DeepDosimetricsTest()
    try:
        case.runTest()
    finally:
        slicer.mrmlScene = headless.scene


def test_the_outcome_module_test_class_passes_headless(outcome_module, headless):
    """A simulated cohort with a known signal: predictOutcome (blocking), the summary table and ROC chart."""
    case = outcome_module.DeepDosimetricsOutcomeTest()
    try:
        case.runTest()
    finally:
        slicer.mrmlScene = headless.scene


# ---------------------------------------------------------------------------------------- encoding
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained model (default channels, 16^3 tiles, 4 features): enough to test the plumbing."""
    import torch
    from DeepDosimetricsLib.deep.channels import parse_channels
    from DeepDosimetricsLib.deep.model import ModelConfig, TileAutoencoder, save_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    config = ModelConfig(channels=[s.label for s in parse_channels("default")], tile=16, features=4)
    save_model(folder, TileAutoencoder(config), config)
    return folder


@pytest.mark.slow
def test_encode_nodes_adds_features_and_reconstruction_overlay(logic, scene, patient_dir, tiny_model, tmp_path):
    nodes = logic.loadPatientFolder(patient_dir)
    added = logic.encodeNodes(nodes.ct, nodes.segmentation, nodes.dose, tiny_model, tmp_path / "out", device="cpu")
    assert logic.currentJob.returncode == 0 and logic.currentJob.workFolder is None
    features = mrml.tables.dataframe_from_table(added["features"])
    assert {"PTV", "BODY"} <= set(features["structure"]) and "z00_mean" in set(features["feature"])
    recon, residual = added["window_soft_tissue"], added["window_soft_tissue_residual"]
    for node in (recon, residual, added["dose"]):
        assert node.GetImageData().GetDimensions() == nodes.ct.GetImageData().GetDimensions()
        np.testing.assert_allclose(
            slicer.util.arrayFromVTKMatrix(_ijk_to_ras(node)), slicer.util.arrayFromVTKMatrix(_ijk_to_ras(nodes.ct)),
            atol=1e-6,
        )
    composite = mrml.slices.composite_nodes(scene)[0]
    assert composite.GetBackgroundVolumeID() == nodes.ct.GetID()
    assert composite.GetForegroundVolumeID() == recon.GetID()
    display = residual.GetDisplayNode()
    assert display.GetWindowLevelMin() == pytest.approx(-display.GetWindowLevelMax())
    assert added["mask_PTV_label"].IsA("vtkMRMLLabelMapVolumeNode")


def test_encode_nodes_bad_input(logic, scene, patient_dir, tiny_model, tmp_path):
    nodes = logic.loadPatientFolder(patient_dir)
    with pytest.raises(InputError, match="model folder .*missing.* does not exist"):
        logic.encodeNodes(nodes.ct, nodes.segmentation, nodes.dose, tmp_path / "missing")
    with pytest.raises(InputError, match="no CT volume node"):
        logic.encodeNodes(None, nodes.segmentation, nodes.dose, tiny_model)


def _ijk_to_ras(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix
