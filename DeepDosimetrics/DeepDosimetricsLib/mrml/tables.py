"""Tables and charts: DataFrames <-> table nodes, DVH and ROC curves as plot charts, showing a table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping, Tuple

import numpy as np
import slicer
import vtk

from DeepDosimetricsLib.mrml.display import STRUCTURE_COLORS
from DeepDosimetricsLib.mrml.headless import current_scene
from DeepDosimetricsLib.runtime.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


#: node attribute recording which radiomics path produced a table
RADIOMICS_PATH_ATTRIBUTE = "DeepDosimetrics.RadiomicsPath"


def table_from_dataframe(
    frame: pd.DataFrame, name: str = "Table", scene: Any = None, table_node: Any = None
) -> Any:
    """A table node holding the DataFrame's columns (numbers as doubles/integers, the rest as text)."""
    import pandas as pd

    scene = current_scene(scene if table_node is None else table_node.GetScene())
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = vtk.vtkTable()
    for column in frame.columns:
        values = frame[column]
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_integer_dtype(values):
            array = vtk.vtkLongLongArray() if values.notna().all() else vtk.vtkDoubleArray()
            for value in values:
                array.InsertNextValue(value if pd.notna(value) else float("nan"))
        elif pd.api.types.is_float_dtype(values):
            array = vtk.vtkDoubleArray()
            for value in values.to_numpy(dtype=float):
                array.InsertNextValue(float(value))
        else:
            array = vtk.vtkStringArray()
            for value in values:
                array.InsertNextValue("" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value))
        array.SetName(str(column))
        table.AddColumn(array)
    table_node.SetAndObserveTable(table)
    table_node.Modified()
    return table_node


def dataframe_from_table(table_node: Any) -> pd.DataFrame:
    """The table node's content as a DataFrame (a copy)."""
    return slicer.util.dataframeFromTable(table_node)


def dvh_chart(
    curves: Mapping[str, Tuple[np.ndarray, np.ndarray]],
    name: str = "DVH",
    scene: Any = None,
) -> Tuple[Any, Any]:
    """Cumulative DVH curves (structure -> (dose Gy, volume %)) as a table node and a plot chart node.

    The table has a ``Dose (Gy)`` column and one ``<structure>`` column of volume % per structure,
    all on one dose axis (curves given on different axes are interpolated onto the union).
    """
    import pandas as pd

    scene = current_scene(scene)
    if not curves:
        raise InputError("no DVH curves to plot (no structure overlaps the dose)")
    axes = [np.asarray(dose, dtype=float) for dose, _ in curves.values()]
    same_axis = all(a.shape == axes[0].shape and np.array_equal(a, axes[0]) for a in axes)
    dose_axis = axes[0] if same_axis else np.unique(np.concatenate(axes))
    columns: Dict[str, np.ndarray] = {"Dose (Gy)": dose_axis}
    for structure, (dose, volume) in curves.items():
        dose = np.asarray(dose, dtype=float)
        volume = np.asarray(volume, dtype=float)
        columns[structure] = volume if same_axis else np.interp(dose_axis, dose, volume, right=0.0)
    table_node = table_from_dataframe(pd.DataFrame(columns), f"{name} table", scene)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.SetTitle("Cumulative dose-volume histogram")
    chart.SetXAxisTitle("Dose (Gy)")
    chart.SetYAxisTitle("Volume (%)")
    for index, structure in enumerate(curves):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {structure}")
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName("Dose (Gy)")
        series.SetYColumnName(structure)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetColor(*STRUCTURE_COLORS[index % len(STRUCTURE_COLORS)])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return table_node, chart


def show_table(table_node: Any, scene: Any = None) -> int:
    """Show a table node in a table view; returns the layout shown.

    ``SetActiveTableID`` + ``PropagateTableSelection`` only fill table views that already exist, so the
    layout is first switched to one with a table view (the Tables logic's ``GetLayoutWithTable``, as
    Slicer's own modules do). Headless, the scene's layout node records the layout.
    """
    from DeepDosimetricsLib.mrml.headless import application_logic, in_slicer_application

    scene = current_scene(scene if scene is not None else table_node.GetScene())
    if in_slicer_application():
        manager = slicer.app.layoutManager()
        layout = slicer.vtkSlicerTablesLogic.GetLayoutWithTable(manager.layout)
        manager.setLayout(layout)
    else:
        layout_node = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if layout_node is None:
            layout_node = scene.AddNewNodeByClass("vtkMRMLLayoutNode")
        layout = slicer.vtkSlicerTablesLogic.GetLayoutWithTable(layout_node.GetViewArrangement())
        layout_node.SetViewArrangement(layout)
    app_logic = application_logic(scene)
    app_logic.GetSelectionNode().SetActiveTableID(table_node.GetID())
    app_logic.PropagateTableSelection()
    return layout


#: column names accepted for the truth and the score of a predictions table (first match wins)
TRUTH_COLUMNS = ("outcome", "y_true", "label", "event", "y")
SCORE_COLUMNS = ("prediction", "probability", "score", "risk", "y_pred", "predicted")


def roc_points(truth: np.ndarray, score: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) of the ROC curve, from (0, 0) to (1, 1), ties together."""
    truth = np.asarray(truth, dtype=float)
    score = np.asarray(score, dtype=float)
    keep = np.isfinite(truth) & np.isfinite(score)
    truth, score = truth[keep] > 0.5, score[keep]
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        raise InputError("a ROC curve needs both outcome classes among the predictions")
    order = np.argsort(-score, kind="mergesort")
    truth, score = truth[order], score[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(score)), truth.size - 1]
    tpr = np.r_[0.0, np.cumsum(truth)[last_of_tie] / positives]
    fpr = np.r_[0.0, np.cumsum(~truth)[last_of_tie] / negatives]
    return fpr, tpr


def roc_chart(predictions: pd.DataFrame, name: str = "ROC", scene: Any = None) -> Tuple[Any, Any]:
    """ROC curves of out-of-fold predictions (one per feature set, repeats pooled) as a table and a chart.

    ``predictions`` has a ``feature_set`` column, a truth column (one of :data:`TRUTH_COLUMNS`) and a
    score column (one of :data:`SCORE_COLUMNS`), as ``predict`` writes ``predictions.csv``.
    """
    import pandas as pd

    scene = current_scene(scene)
    truth_column = next((c for c in TRUTH_COLUMNS if c in predictions.columns), None)
    score_column = next((c for c in SCORE_COLUMNS if c in predictions.columns), None)
    if "feature_set" not in predictions.columns or truth_column is None or score_column is None:
        raise InputError(
            f"predictions table has columns {list(predictions.columns)}: a ROC curve needs feature_set, "
            f"a truth column ({', '.join(TRUTH_COLUMNS)}) and a score column ({', '.join(SCORE_COLUMNS)})"
        )
    columns: Dict[str, np.ndarray] = {}
    curves = {}
    for feature_set, rows in predictions.groupby("feature_set", sort=False):
        curves[str(feature_set)] = roc_points(rows[truth_column].to_numpy(), rows[score_column].to_numpy())
    length = max(len(fpr) for fpr, _ in curves.values())
    for feature_set, (fpr, tpr) in curves.items():  # padded with the last point (1, 1)
        columns[f"{feature_set} FPR"] = np.r_[fpr, np.full(length - len(fpr), 1.0)]
        columns[f"{feature_set} TPR"] = np.r_[tpr, np.full(length - len(tpr), 1.0)]
    table_node = table_from_dataframe(pd.DataFrame(columns), f"{name} table", scene)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.SetTitle("ROC curves (out-of-fold, repeats pooled)")
    chart.SetXAxisTitle("False-positive rate")
    chart.SetYAxisTitle("True-positive rate")
    for index, feature_set in enumerate(curves):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {feature_set}")
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName(f"{feature_set} FPR")
        series.SetYColumnName(f"{feature_set} TPR")
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetColor(*STRUCTURE_COLORS[index % len(STRUCTURE_COLORS)])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return table_node, chart
