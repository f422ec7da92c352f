"""``predict_outcome(settings) -> PredictResult``: the whole outcome analysis, from tables to a report.

Reads the clinical table and the feature tables, matches patients, builds the feature sets (each named
set alone, the base, base + each set, everything together as ``all``), validates every set with the same
nested repeated stratified K-fold (:mod:`protocol`), computes metrics with bootstrap CIs and the paired
increments over the base (:mod:`stats`), and writes into ``settings.out``:

``summary.csv``, ``comparison.csv``, ``predictions.csv``, ``selected_features.csv``, ``cohort.csv``,
``report.html`` (+ ``figures/*.png``) and, last, ``predict.json`` (settings, versions, counts, outputs).
Every file is written atomically.

With ``validate_on`` (:mod:`external`), the cross-validation runs on the development sites and every set is
also fitted on all of them and tested once on the held-out site: rows ``validation = external:SITE`` in
``summary.csv``/``comparison.csv`` (the cross-validation's are ``cv``) and ``external_predictions.csv``.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from DeepDosimetricsLib.analysis.tables import ALL, CLINICAL, Endpoint
from DeepDosimetricsLib.runtime.errors import InputError

SUMMARY_COLUMNS = [
    "feature_set", "n_patients", "n_events", "n_features", "metric", "estimate", "ci_low", "ci_high",
    "repeat_sd", "reason", "validation",
]
COMPARISON_COLUMNS = ["feature_set", "reference", "metric", "delta", "ci_low", "ci_high", "p_value", "validation"]


@dataclass
class PredictSettings:
    """Everything ``predict`` needs (saved to predict.json). Paths may be str or Path."""

    clinical: str
    features: Dict[str, str]  # set name -> table path (long or wide)
    out: str
    outcome: Optional[str] = None  # binary endpoint column (0/1)
    time: Optional[str] = None  # time-to-event endpoint: follow-up time column ...
    event: Optional[str] = None  # ... and event column (0/1)
    covariates: Optional[List[str]] = None  # clinical set columns (default: every other column)
    base: Optional[str] = None  # reference set (default: clinical when it has columns)
    structures: Optional[List[str]] = None  # keep these structures' features
    select: Optional[str] = None  # regular expression on feature names
    harmonize: Optional[str] = None  # clinical column of the batch (site/scanner) for ComBat
    harmonize_sets: Optional[List[str]] = None  # feature tables ComBat adjusts (default: every table)
    validate_on: Optional[str] = None  # external validation: the held-out site's value of the site column
    site_column: Optional[str] = None  # the site column (default: the harmonize column, else "site")
    model: str = "logistic"  # logistic | elasticnet | forest
    folds: int = 5
    repeats: int = 10
    inner_folds: int = 3
    seed: int = 0
    jobs: int = 1
    bootstrap: int = 1000
    report: bool = True
    quiet: bool = True

    def to_json(self) -> dict:
        data = asdict(self)
        data["clinical"] = str(self.clinical)
        data["out"] = str(self.out)
        data["features"] = {k: str(v) for k, v in self.features.items()}
        return data


@dataclass
class PredictResult:
    """What ``predict_outcome`` returns (the same as the files it wrote)."""

    out: Path
    summary: object  # pandas DataFrame (summary.csv)
    comparison: object  # pandas DataFrame (comparison.csv)
    counts: dict  # cohort counts
    paths: Dict[str, Path] = field(default_factory=dict)
    elapsed_s: float = 0.0


def _check_settings(settings: PredictSettings) -> None:
    from DeepDosimetricsLib.analysis.protocol import MODELS

    if settings.model not in MODELS:
        raise InputError(f"--model must be one of {', '.join(MODELS)}, got {settings.model!r}")
    for name, low in (("folds", 2), ("repeats", 1), ("inner_folds", 2), ("jobs", 1), ("bootstrap", 100)):
        value = getattr(settings, name)
        if int(value) != value or value < low:
            raise InputError(f"--{name.replace('_', '-')} must be an integer of at least {low}, got {value!r}")
    if not settings.features and settings.base not in (None, CLINICAL):
        raise InputError(f"--base {settings.base}: no feature table of that name")
    if settings.validate_on is not None and not str(settings.validate_on).strip():
        raise InputError("--validate-on needs a site value (e.g. --validate-on B)")
    if settings.site_column and settings.validate_on is None:
        raise InputError("--site-column names the column of --validate-on SITE; give --validate-on too")


def build_sets(clinical, tables, ids, base: Optional[str]):
    """The feature sets to compare, as (name, [parts]) in report order, and the base's name."""
    parts_available = ([CLINICAL] if clinical.covariates.shape[1] else []) + [t.name for t in tables]
    if not parts_available:
        raise InputError("nothing to compare: the clinical table has no covariate and no feature table was given")
    if base is None:
        base = CLINICAL if clinical.covariates.shape[1] else tables[0].name
    if base not in parts_available:
        raise InputError(f"--base {base}: not a feature set (sets: {', '.join(parts_available)})")
    others = [p for p in parts_available if p != base]
    sets = [(base, [base])] + [(name, [name]) for name in others]
    sets += [(f"{base}+{name}", [base, name]) for name in others]
    if len(others) >= 2:
        sets.append((ALL, [base] + others))
    return sets, base


def _set_data(name, parts, clinical, tables_by_name, ids, harmonized=None):
    """The SetData of one set over the patients ``ids`` (None and a reason when it cannot be fitted)."""
    import pandas as pd

    from DeepDosimetricsLib.analysis.protocol import SetData

    numeric_frames, image_flags = [], []
    categorical = None
    categorical_names: List[str] = []
    for part in parts:
        if part == CLINICAL:
            frame = clinical.covariates.loc[ids]
            numeric = frame.drop(columns=clinical.categorical)
            numeric_frames.append(numeric.rename(columns=lambda c: f"clinical/{c}"))
            image_flags.append(np.zeros(numeric.shape[1], dtype=bool))
            if clinical.categorical:
                categorical = frame[clinical.categorical].to_numpy(dtype=object)
                categorical_names = [f"clinical/{c}" for c in clinical.categorical]
        else:
            frame = tables_by_name[part].frame.loc[ids]
            numeric_frames.append(frame.rename(columns=lambda c, p=part: f"{p}:{c}"))
            adjust = harmonized is None or part in harmonized
            image_flags.append(np.full(frame.shape[1], adjust, dtype=bool))
    numeric = pd.concat(numeric_frames, axis=1) if numeric_frames else pd.DataFrame(index=ids)
    values = numeric.to_numpy(dtype=float)
    informative = 0
    if values.shape[1]:
        finite = np.isfinite(values)
        with np.errstate(invalid="ignore"):
            spread = np.nanmax(np.where(finite, values, -np.inf), axis=0) - np.nanmin(
                np.where(finite, values, np.inf), axis=0
            )
        informative += int((finite.any(axis=0) & (spread > 0)).sum())
    if categorical is not None:
        informative += sum(len({str(v) for v in categorical[:, j]}) > 1 for j in range(categorical.shape[1]))
    n_features = values.shape[1] + len(categorical_names)
    data = SetData(
        name=name,
        numeric=values,
        numeric_names=list(numeric.columns),
        categorical=categorical,
        categorical_names=categorical_names,
        image_mask=np.concatenate(image_flags) if image_flags else np.zeros(0, dtype=bool),
    )
    if informative == 0:
        return data, f"all {n_features} features are constant (or missing) over the analysed patients"
    return data, ""


def predict_outcome(settings: PredictSettings) -> PredictResult:
    """Run the outcome analysis and write its outputs (see the module docstring)."""
    import pandas as pd

    from DeepDosimetricsLib.analysis import external as ext
    from DeepDosimetricsLib.analysis import stats
    from DeepDosimetricsLib.analysis.protocol import ProtocolSettings, oof_matrix, run_protocol
    from DeepDosimetricsLib.analysis.tables import match_patients, read_clinical, read_feature_table

    start = time.perf_counter()
    _check_settings(settings)
    endpoint = Endpoint(outcome=settings.outcome, time=settings.time, event=settings.event)
    site_column = None
    if settings.validate_on is not None:
        site_column = settings.site_column or settings.harmonize or ext.DEFAULT_SITE_COLUMN
    clinical = read_clinical(settings.clinical, endpoint, settings.covariates, settings.harmonize, site_column)
    tables = [
        read_feature_table(path, name, settings.structures, settings.select)
        for name, path in settings.features.items()
    ]
    counts = match_patients(clinical, tables)
    ids = counts.analysed
    split = None
    if site_column:  # the cross-validation sees the development sites only
        split = ext.split_by_site(ids, clinical.site, str(settings.validate_on).strip(), site_column,
                                  settings.clinical)
        external_frame = clinical.target.loc[split.external]
        ext.check_external_target(
            endpoint.kind, external_frame["outcome"].to_numpy(dtype=int) if endpoint.kind == "binary"
            else external_frame, split)
        ids = split.development
    target_frame = clinical.target.loc[ids]
    kind = endpoint.kind
    if kind == "binary":
        y = target_frame["outcome"].to_numpy(dtype=int)
        strata = y
        target = y
        n_events, n_others = int(y.sum()), int(len(y) - y.sum())
        if min(n_events, n_others) < settings.folds:
            raise InputError(
                f"clinical table {settings.clinical}: {n_events} patients with {endpoint.outcome}=1 and "
                f"{n_others} with 0 among the {len(y)} analysed; stratified {settings.folds}-fold cross-"
                f"validation needs at least {settings.folds} of each (use fewer --folds or more patients)"
            )
        inner_min = min(n_events, n_others) * (settings.folds - 1) // settings.folds
        if inner_min < settings.inner_folds:
            raise InputError(
                f"too few patients of the rarer class ({min(n_events, n_others)}) for {settings.folds} outer "
                f"x {settings.inner_folds} inner folds; use fewer --folds"
            )
    else:
        from DeepDosimetricsLib.analysis.survival import structured_target

        time_ = target_frame["time"].to_numpy(dtype=float)
        event = target_frame["event"].to_numpy(dtype=int)
        n_events = int(event.sum())
        if n_events < settings.folds or (len(event) - n_events) < settings.folds:
            raise InputError(
                f"clinical table {settings.clinical}: {n_events} events among {len(event)} analysed patients; "
                f"{settings.folds}-fold cross-validation stratified on the event needs at least "
                f"{settings.folds} events and {settings.folds} censored patients (use fewer --folds)"
            )
        strata = event
        target = structured_target(time_, event)
    if len(ids) < 2 * settings.folds:
        raise InputError(f"only {len(ids)} patients analysed: too few for {settings.folds}-fold cross-validation")
    batch = None
    if settings.harmonize:
        batch = np.asarray([str(clinical.batch.loc[i]) for i in ids])

    tables_by_name = {t.name: t for t in tables}
    harmonized = settings.harmonize_sets
    unknown = [name for name in harmonized or [] if name not in tables_by_name]
    if unknown:
        raise InputError(f"--harmonize-sets: no feature table named {', '.join(unknown)} "
                         f"(tables: {', '.join(tables_by_name)})")
    if harmonized and not settings.harmonize:
        raise InputError("--harmonize-sets needs --harmonize COLUMN (the site/scanner column)")
    set_specs, base = build_sets(clinical, tables, ids, settings.base)
    datasets, reasons = [], {}
    for name, parts in set_specs:
        data, reason = _set_data(name, parts, clinical, tables_by_name, ids, harmonized)
        datasets.append(data)
        reasons[name] = reason
    runnable = [d for d in datasets if not reasons[d.name]]
    if not runnable:
        raise InputError("no feature set can be fitted: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()))

    protocol = ProtocolSettings(
        model=settings.model, folds=settings.folds, repeats=settings.repeats,
        inner_folds=settings.inner_folds, seed=settings.seed,
    )
    results = run_protocol(
        runnable, target, strata, batch, protocol, kind, harmonize=bool(settings.harmonize),
        jobs=settings.jobs, quiet=settings.quiet,
    )
    n = len(ids)
    counts_matrix = stats.bootstrap_counts(n, settings.bootstrap, settings.seed)
    predictions = {name: oof_matrix(res, n, settings.repeats) for name, res in results.items()}

    summary_rows = []
    for data in datasets:
        row = {"feature_set": data.name, "n_patients": n, "n_events": n_events, "n_features": data.n_features,
               "validation": ext.CV}
        if reasons[data.name]:
            summary_rows.append({**row, "metric": endpoint.metric, "estimate": np.nan, "ci_low": np.nan,
                                 "ci_high": np.nan, "repeat_sd": np.nan, "reason": reasons[data.name]})
            continue
        if kind == "binary":
            metrics = stats.binary_metrics(predictions[data.name], y, counts_matrix)
        else:
            metrics = stats.survival_metrics(predictions[data.name], time_, event, counts_matrix)
        for metric, value in metrics.items():
            summary_rows.append({**row, "metric": metric, "estimate": value.estimate, "ci_low": value.ci_low,
                                 "ci_high": value.ci_high, "repeat_sd": value.repeat_sd, "reason": ""})

    pairs = stats.binary_pairs(y) if kind == "binary" else stats.survival_pairs(time_, event)
    comparison_rows = []
    if base in predictions:
        for data in runnable:
            if data.name == base:
                continue
            delta, low, high, p = stats.paired_delta(predictions[data.name], predictions[base], pairs, counts_matrix)
            comparison_rows.append({"feature_set": data.name, "reference": base, "metric": endpoint.metric,
                                    "delta": delta, "ci_low": low, "ci_high": high, "p_value": p,
                                    "validation": ext.CV})
    external_context = None
    if split is not None:
        external_context = _external_validation(
            split, runnable, clinical, tables_by_name, harmonized, set_specs, kind, base, endpoint, settings,
            protocol)
        summary_rows += external_context["summary_rows"]
        comparison_rows += external_context["comparison_rows"]
    summary = pd.DataFrame(summary_rows, columns=SUMMARY_COLUMNS)
    comparison = pd.DataFrame(comparison_rows, columns=COMPARISON_COLUMNS)

    prediction_table = _prediction_table(results, ids, target_frame, kind)
    selected = _selected_table(results, settings.folds * settings.repeats, settings.model)
    cohort_rows = counts.rows() + [
        {"what": f"covariate left out: {name} ({why})", "count": 0, "patients": ""}
        for name, why in clinical.dropped_covariates.items()
    ] + [{"what": f"table {t.name}: {note}", "count": 0, "patients": ""} for t in tables for note in t.notes]
    if split is not None:
        cohort_rows += [
            {"what": f"external validation: development patients ({split.column} != {split.site}; the "
             "cross-validation's)", "count": len(split.development), "patients": ""},
            {"what": f"external validation: external patients ({split.column} = {split.site})",
             "count": len(split.external), "patients": ""},
            {"what": "external validation: events among the external patients",
             "count": external_context["n_events"], "patients": ""},
        ]
    if batch is not None:
        values, numbers = np.unique(batch, return_counts=True)
        cohort_rows += [{"what": f"{settings.harmonize} = {v}", "count": int(c), "patients": ""}
                        for v, c in zip(values, numbers)]
        cohort_rows += _site_trace(tables, ids, batch, settings.harmonize, harmonized)
    cohort = pd.DataFrame(cohort_rows, columns=["what", "count", "patients"])

    out = Path(settings.out)
    paths = _write_outputs(out, summary, comparison, prediction_table, selected, cohort)
    if external_context is not None:
        from DeepDosimetricsLib.runtime.atomic import write_csv_atomic

        paths["external_predictions.csv"] = write_csv_atomic(external_context["predictions"],
                                                             out / "external_predictions.csv")
    context = {
        "settings": settings, "endpoint": endpoint, "summary": summary, "comparison": comparison,
        "selected": selected, "cohort": cohort, "predictions": predictions, "results": results, "ids": ids,
        "target": target_frame, "base": base, "kind": kind, "external": external_context,
    }
    if settings.report:
        from DeepDosimetricsLib.analysis.report import write_report

        paths.update(write_report(out, context))
    elapsed = time.perf_counter() - start
    record = {
        "settings": settings.to_json(),
        "endpoint": {"kind": kind, "columns": endpoint.columns, "metric": endpoint.metric},
        "base": base,
        "feature_sets": {name: parts for name, parts in set_specs},
        "protocol": asdict(protocol) | {"k_grid": list(protocol.k_grid), "penalty_grid": list(protocol.penalty_grid)},
        "cohort": cohort_rows,
        "external_validation": None if split is None else {
            "column": split.column, "site": split.site, "development_patients": len(split.development),
            "external_patients": len(split.external), "external_events": external_context["n_events"]},
        "versions": library_versions(),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "elapsed_s": round(elapsed, 2),
        "outputs": {k: str(v.relative_to(out)) if v.is_relative_to(out) else str(v) for k, v in paths.items()},
    }
    from DeepDosimetricsLib.runtime.atomic import write_json_atomic

    paths["predict.json"] = write_json_atomic(out / "predict.json", record)
    return PredictResult(out=out, summary=summary, comparison=comparison, counts=record["cohort"],
                         paths=paths, elapsed_s=elapsed)


def _external_validation(split, runnable, clinical, tables_by_name, harmonized, set_specs, kind, base, endpoint,
                         settings, protocol) -> dict:
    """Every runnable set fitted on the development patients and tested on the external ones
    (:mod:`external`): summary and comparison rows, the external predictions and counts."""
    import pandas as pd

    from DeepDosimetricsLib.analysis import external as ext

    everyone = split.development + split.external
    development = np.arange(len(split.development))
    external = np.arange(len(split.development), len(everyone))
    parts = dict(set_specs)
    sets = [_set_data(data.name, parts[data.name], clinical, tables_by_name, everyone, harmonized)[0]
            for data in runnable]
    frame = clinical.target.loc[everyone]
    if kind == "binary":
        target = frame["outcome"].to_numpy(dtype=int)
        strata = target
        external_target = target[external]
    else:
        from DeepDosimetricsLib.analysis.survival import structured_target

        event = frame["event"].to_numpy(dtype=int)
        target, strata = structured_target(frame["time"].to_numpy(dtype=float), event), event
        external_target = {"time": frame["time"].to_numpy(dtype=float)[external], "event": event[external]}
    batch = None
    if settings.harmonize:
        batch = np.asarray([str(clinical.batch.loc[i]) for i in everyone])
    results = ext.fit_external(sets, target, strata, batch, development, external, protocol, kind,
                               bool(settings.harmonize), settings.jobs)
    metrics, deltas = ext.external_metrics(results, external_target, kind, base, settings.bootstrap, settings.seed)
    label = ext.validation_label(split.site)
    n_events = int(np.sum(external_target if kind == "binary" else external_target["event"]))
    summary_rows, comparison_rows = [], []
    for data in sets:
        row = {"feature_set": data.name, "n_patients": len(external), "n_events": n_events,
               "n_features": data.n_features, "validation": label}
        for metric, value in metrics[data.name].items():
            summary_rows.append({**row, "metric": metric, "estimate": value.estimate, "ci_low": value.ci_low,
                                 "ci_high": value.ci_high, "repeat_sd": np.nan, "reason": ""})
    for name, (delta, low, high, p) in deltas.items():
        comparison_rows.append({"feature_set": name, "reference": base, "metric": endpoint.metric, "delta": delta,
                                "ci_low": low, "ci_high": high, "p_value": p, "validation": label})
    table = pd.concat([
        pd.DataFrame({"patient": split.external, "feature_set": name, "prediction": result.prediction})
        for name, result in results.items()
    ], ignore_index=True)
    table = table.merge(frame.loc[split.external].rename_axis("patient").reset_index(), on="patient", how="left")
    return {"split": split, "label": label, "summary_rows": summary_rows, "comparison_rows": comparison_rows,
            "predictions": table, "results": results, "target": frame.loc[split.external], "n_events": n_events}


def _site_trace(tables, ids, batch, column: str, harmonized) -> List[dict]:
    """Descriptive (not used by the models): how strongly each harmonised table shows the site, as the mean
    ANOVA F of its features across sites, before and after a ComBat fitted on all analysed patients."""
    from DeepDosimetricsLib.analysis.harmonize import ComBat, batch_association

    rows = []
    for table in tables:
        if harmonized is not None and table.name not in harmonized:
            continue
        values = table.frame.loc[ids].to_numpy(dtype=float)
        values = np.where(np.isfinite(values), values, np.nanmedian(values, axis=0))
        keep = np.isfinite(values).all(axis=0) & (np.nanvar(values, axis=0) > 0)
        if not keep.any():
            continue
        try:
            before = batch_association(values[:, keep], batch)
            after = batch_association(ComBat().fit_transform(values[:, keep], batch), batch)
        except (ValueError, np.linalg.LinAlgError):
            continue
        rows.append({"what": f"table {table.name}: mean F of the features across {column}, before / after "
                     f"ComBat on all patients (descriptive): {before:.2f} / {after:.2f}", "count": 0,
                     "patients": ""})
    return rows


def _prediction_table(results, ids, target_frame, kind):
    import pandas as pd

    frames = []
    for name, fold_results in results.items():
        for result in fold_results:
            frame = pd.DataFrame({
                "patient": [ids[i] for i in result.test_index],
                "feature_set": name,
                "repeat": result.repeat,
                "fold": result.fold,
                "prediction": result.prediction,
            })
            if kind == "survival":
                frame["risk_group"] = np.where(result.prediction > result.train_median, "high", "low")
            frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    table = table.merge(target_frame.rename_axis("patient").reset_index(), on="patient", how="left")
    return table.sort_values(["feature_set", "repeat", "patient"], kind="stable").reset_index(drop=True)


def _selected_table(results, n_folds: int, model: str):
    import pandas as pd

    rows = []
    for name, fold_results in results.items():
        weights: Dict[str, List[float]] = {}
        for result in fold_results:
            for feature, w in result.selected.items():
                weights.setdefault(feature, []).append(w)
        for feature, values in weights.items():
            rows.append({
                "feature_set": name,
                "feature": feature,
                "times_selected": len(values),
                "folds": n_folds,
                "selection_frequency": len(values) / n_folds,
                "mean_weight": float(np.nanmean(values)) if np.isfinite(values).any() else np.nan,
                "weight": "importance" if model == "forest" else "coefficient (standardised features)",
            })
    table = pd.DataFrame(rows, columns=["feature_set", "feature", "times_selected", "folds",
                                        "selection_frequency", "mean_weight", "weight"])
    if len(table):
        table["_abs"] = table["mean_weight"].abs()
        table = table.sort_values(["feature_set", "selection_frequency", "_abs"], ascending=[True, False, False])
        table = table.drop(columns="_abs").reset_index(drop=True)
    return table


def _write_outputs(out: Path, summary, comparison, predictions, selected, cohort) -> Dict[str, Path]:
    from DeepDosimetricsLib.runtime.atomic import write_csv_atomic

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    return {
        "summary.csv": write_csv_atomic(summary, out / "summary.csv"),
        "comparison.csv": write_csv_atomic(comparison, out / "comparison.csv"),
        "predictions.csv": write_csv_atomic(predictions, out / "predictions.csv"),
        "selected_features.csv": write_csv_atomic(selected, out / "selected_features.csv"),
        "cohort.csv": write_csv_atomic(cohort, out / "cohort.csv"),
    }


def library_versions() -> Dict[str, str]:
    """Versions of the libraries the analysis depends on."""
    from importlib import metadata

    versions = {}
    for name in ("deepdosimetrics", "numpy", "pandas", "scipy", "scikit-learn", "scikit-survival", "neuroCombat",
                 "joblib", "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def format_summary(summary, comparison) -> str:
    """The summary and comparison as text tables (printed by the command and the demo); with an external
    validation, its rows follow the cross-validation's under their own heading."""
    lines = []
    blocks = ["cv"]
    if "validation" in summary.columns:
        blocks = list(dict.fromkeys(summary["validation"].fillna("cv")))
    for block in blocks:
        rows = summary if "validation" not in summary.columns else summary[summary["validation"].fillna("cv") == block]
        deltas = comparison if "validation" not in comparison.columns else comparison[
            comparison["validation"].fillna("cv") == block]
        if len(blocks) > 1:
            lines += ([""] if lines else []) + [
                "nested cross-validation (development sites):" if block == "cv"
                else f"external validation ({block.split(':', 1)[1]}: trained on the other sites, tested once):"]
        lines += _format_block(rows, deltas)
    return "\n".join(lines)


def _format_block(summary, comparison) -> List[str]:
    lines = []
    main = summary[summary["metric"].isin(["auc", "c_index"])]
    lines.append(f"{'feature set':24s} {'n':>4s} {'events':>6s} {'features':>8s} {'metric':>7s} "
                 f"{'estimate':>8s} {'95% CI':>15s}")
    for row in main.itertuples(index=False):
        if row.reason:
            lines.append(f"{row.feature_set:24s} {row.n_patients:4d} {row.n_events:6d} {row.n_features:8d} "
                         f"{row.metric:>7s}  not fitted: {row.reason}")
            continue
        lines.append(f"{row.feature_set:24s} {row.n_patients:4d} {row.n_events:6d} {row.n_features:8d} "
                     f"{row.metric:>7s} {row.estimate:8.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]")
    if len(comparison):
        lines.append("")
        lines.append(f"{'increment':24s} {'reference':>12s} {'delta':>7s} {'95% CI':>17s} {'p':>7s}")
        for row in comparison.itertuples(index=False):
            lines.append(f"{row.feature_set:24s} {row.reference:>12s} {row.delta:+7.3f} "
                         f"[{row.ci_low:+.3f}, {row.ci_high:+.3f}] {row.p_value:7.3f}")
    return lines


__all__ = ["PredictResult", "PredictSettings", "build_sets", "format_summary", "library_versions",
           "predict_outcome"]
