"""DeepDosimetricsOutcome: do DVH, radiomics or deep features add predictive value to the clinical variables?

The second module of the DeepDosimetrics extension (module, parameter node, widget, logic and test). It
shares the extension's one library, ``DeepDosimetricsLib`` (Slicer puts the extension's module folders on
``sys.path``): the analysis is ``analysis.job.predict_outcome`` (the ``deepdosimetrics predict`` command), the
results become nodes through ``mrml.results.load_prediction_results``, and the job Logic and panel bases
(background job, log, progress, Cancel) are ``mrml.panel``'s, as in the DeepDosimetrics module.
"""

from pathlib import Path
from typing import Annotated, Dict, Mapping, Union

import slicer
from DeepDosimetricsLib import mrml
from DeepDosimetricsLib.analysis.protocol import MODELS, ProtocolSettings
from DeepDosimetricsLib.analysis.tables import parse_feature_spec
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
)
from DeepDosimetricsLib.runtime.errors import InputError
from DeepDosimetricsLib.runtime.jobs import cli_arguments

DEFAULT_PROTOCOL = ProtocolSettings()  # the panel's defaults are the library's


#
# DeepDosimetricsOutcome
#
class DeepDosimetricsOutcome(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DeepDosimetrics Outcome"
        self.parent.categories = ["Radiotherapy"]
        self.parent.dependencies = []  # DeepDosimetricsLib ships with this extension: no module to wait for
        self.parent.contributors = ["DeepDosimetrics developers (INFN Firenze)"]
        self.parent.helpText = (
            "Outcome analysis of a cohort: does a set of features (dose-volume metrics, radiomics, the deep "
            "features of the DeepDosimetrics module) add predictive value to the clinical variables? Nested, "
            "repeated stratified cross-validation with the preprocessing (and optional ComBat harmonisation) "
            "inside the folds; AUC or C-index with bootstrap intervals and paired increments. The summary "
            "becomes a table, the ROC curves a chart, and report.html is written to the output folder. Also "
            "available from the Python console (DeepDosimetricsOutcomeLogic) and as "
            "<tt>deepdosimetrics predict</tt>."
        )
        self.parent.acknowledgementText = "Built on 3D Slicer, scikit-learn, scikit-survival and neuroCombat."


#
# Parameter node
#
@parameterNodeWrapper
class DeepDosimetricsOutcomeParameterNode:
    """Module state saved with the scene; each field is bound to the widget whose dynamic property
    ``SlicerParameterName`` names it in the .ui."""

    clinicalFile: Path
    outcomeColumn: str = "outcome"
    timeColumn: str = ""
    eventColumn: str = ""
    featureTables: str = ""
    predictModel: Annotated[str, Choice(MODELS)] = DEFAULT_PROTOCOL.model
    folds: Annotated[int, WithinRange(2, 20)] = DEFAULT_PROTOCOL.folds
    repeats: Annotated[int, WithinRange(1, 100)] = DEFAULT_PROTOCOL.repeats
    harmonizeColumn: str = ""
    validateOn: str = ""
    analysisFolder: Path


def parseFeatureTables(tables: Union[str, Mapping[str, str]]) -> Dict[str, str]:
    """``"dvh=dvh.csv radiomics=/data/radiomics.csv"`` (the ``predict --features`` form) or a mapping ->
    {name: path}; names are checked by ``analysis.tables.parse_feature_spec``."""
    items = tables.split() if isinstance(tables, str) else [f"{k}={v}" for k, v in dict(tables).items()]
    parsed: Dict[str, str] = {}
    for item in items:
        name, path = parse_feature_spec(item)
        if name in parsed or not path:
            raise InputError(f"feature table {item!r}: " + ("the set name is given twice" if path else "no table"))
        parsed[name] = path
    return parsed


#
# DeepDosimetricsOutcomeLogic
#
class DeepDosimetricsOutcomeLogic(JobLogic):
    """Outcome analysis from the Python console, headless or from the panel. From ``mrml.panel.JobLogic``:
    ``scene``, ``ensureRequirements``, ``runJob``, ``cancelJob``."""

    def getParameterNode(self):
        """The typed parameter node (application only)."""
        return DeepDosimetricsOutcomeParameterNode(super().getParameterNode())

    @staticmethod
    def predictArguments(clinicalFile, featureTables, outFolder, outcome="outcome", time="", event="",
                         model=DEFAULT_PROTOCOL.model, folds=DEFAULT_PROTOCOL.folds,
                         repeats=DEFAULT_PROTOCOL.repeats, harmonize="", validateOn=""):
        """Command-line arguments of ``deepdosimetrics predict``; ``featureTables`` is {name: table} or the
        text ``"dvh=dvh.csv radiomics=radiomics.csv"``. A time column selects a time-to-event endpoint;
        ``validateOn``: the external site (``--validate-on``, ``analysis.external``)."""
        tables = parseFeatureTables(featureTables)
        return cli_arguments(
            "predict", clinical=clinicalFile, time=str(time) if time else None, event=str(event) if time else None,
            outcome=None if time else str(outcome), features=[f"{name}={path}" for name, path in tables.items()],
            model=model, folds=int(folds), repeats=int(repeats), harmonize=harmonize or None,
            validate_on=validateOn or None, out=outFolder)

    def predictOutcome(self, clinicalFile, featureTables, outFolder, outcome="outcome", time="", event="",
                       model=DEFAULT_PROTOCOL.model, folds=DEFAULT_PROTOCOL.folds, repeats=DEFAULT_PROTOCOL.repeats,
                       harmonize="", validateOn="", blocking=True, showResults=True, **settings):
        """Outcome analysis of the clinical table and the feature tables, results in ``outFolder``.

        Blocking (console, batch): ``analysis.job.predict_outcome`` in this process (``settings``: further
        ``PredictSettings`` fields, e.g. ``jobs``, ``bootstrap``, ``report``); returns its PredictResult, and
        with ``showResults`` adds the summary table and ROC chart (``loadPredictionResults``). Not blocking
        (the panel): ``deepdosimetrics predict`` in a background process; returns the started CliJob; when
        it has finished, call ``loadPredictionResults(outFolder)``.
        """
        if not blocking:
            return self.runJob(self.predictArguments(clinicalFile, featureTables, outFolder, outcome, time, event,
                                                     model, folds, repeats, harmonize, validateOn))
        from DeepDosimetricsLib.analysis.job import PredictSettings, predict_outcome

        result = predict_outcome(PredictSettings(
            clinical=str(clinicalFile), features=parseFeatureTables(featureTables), out=str(outFolder),
            outcome=None if time else outcome, time=time or None, event=event or None, model=model,
            folds=int(folds), repeats=int(repeats), harmonize=harmonize or None, validate_on=validateOn or None,
            **settings))
        if showResults:
            self.loadPredictionResults(outFolder)
        return result

    def loadPredictionResults(self, outFolder):
        """``summary.csv`` as a table node, ROC curves (binary endpoint) as a plot chart: {"summary", "roc"}
        (``mrml.results.load_prediction_results``)."""
        return mrml.results.load_prediction_results(outFolder, self.scene)


#
# DeepDosimetricsOutcomeWidget
#
class DeepDosimetricsOutcomeWidget(JobPanel):
    """The module panel; the .ui, parameter node and job plumbing are ``mrml.panel.JobPanel``'s."""

    def setup(self) -> None:
        self.setupPanel(DeepDosimetricsOutcomeLogic(), (
            ("addFeatureTableButton", self.onAddFeatureTable),
            ("predictButton", self.onPredict),
        ))

    def _checkCanApply(self, caller=None, event=None) -> None:
        JobPanel._checkCanApply(self)
        p = self._parameterNode
        endpoint = bool(p and (p.outcomeColumn or (p.timeColumn and p.eventColumn)))
        files = bool(p and is_set(p.clinicalFile) and is_set(p.analysisFolder))
        self.ui.predictButton.enabled = not self.busy and files and endpoint

    def onAddFeatureTable(self) -> None:
        path = qt.QFileDialog.getOpenFileName(None, "Feature table (radiomics, dvh or encode features.csv)", "",
                                              "CSV tables (*.csv)")
        if path:
            name = Path(path).stem.replace("features", "deep") or "table"
            self._parameterNode.featureTables = f"{self._parameterNode.featureTables.strip()} {name}={path}".strip()

    def onPredict(self) -> None:
        p = self._parameterNode
        out = p.analysisFolder
        self.startJob(
            lambda: self.logic.predictOutcome(p.clinicalFile, p.featureTables, out, p.outcomeColumn, p.timeColumn,
                                              p.eventColumn, p.predictModel, p.folds, p.repeats, p.harmonizeColumn,
                                              p.validateOn.strip(), blocking=False),
            groups=(None, "analysis"), onFinished=lambda job: self._showPrediction(out))

    def _showPrediction(self, out) -> None:
        added = self.logic.loadPredictionResults(out)
        mrml.tables.show_table(added["summary"])
        if added["roc"] is not None:
            slicer.modules.plots.logic().ShowChartInLayout(added["roc"])
        self.log(f"Outcome analysis: {Path(str(out)) / 'report.html'}")


#
# DeepDosimetricsOutcomeTest
#
class DeepDosimetricsOutcomeTest(ModuleTest):
    """A small simulated cohort with a known signal through the Logic (in Slicer: Reload and Test; headless:
    pytest). Each test gets a clean scene and ``self.workdir`` (``mrml.panel.ModuleTest``)."""

    def test_DeepDosimetricsOutcome_known_signal(self):
        import numpy as np
        import pandas as pd

        self.delayDisplay("A clinical table and a feature table that predicts the outcome")
        rng = np.random.default_rng(0)
        ids = [f"pt{i:03d}" for i in range(60)]
        outcome = rng.permutation(np.tile([0, 1], 30))
        pd.DataFrame({"patient": ids, "age": rng.normal(60, 5, 60), "outcome": outcome}).to_csv(
            self.workdir / "clinical.csv", index=False)
        pd.DataFrame({"patient": ids, "Dmean": outcome + rng.normal(scale=0.5, size=60)}).to_csv(
            self.workdir / "dvh.csv", index=False)

        self.delayDisplay("Outcome analysis")
        logic = DeepDosimetricsOutcomeLogic()
        result = logic.predictOutcome(self.workdir / "clinical.csv", f"dvh={self.workdir / 'dvh.csv'}",
                                      self.workdir / "analysis", folds=3, repeats=1, bootstrap=100, report=False)
        auc = result.summary.set_index(["feature_set", "metric"])["estimate"]
        self.assertGreater(auc[("dvh", "auc")], 0.75)
        added = logic.loadPredictionResults(self.workdir / "analysis")
        self.assertEqual(added["summary"].GetNumberOfRows(), len(result.summary))
        self.assertIsNotNone(added["roc"])
        self.delayDisplay("Test passed")
