"""The analysis report: ``figures/*.png`` (matplotlib, Agg) and one self-contained ``report.html`` with
the same figures embedded as base64 PNGs, the summary and increment tables, the top features, the cohort
counts and the exact settings.

Figures: ``roc.png`` (binary: ROC of each set from the out-of-fold predictions averaged over repeats),
``calibration.png`` (observed vs predicted risk by fifths of the prediction), ``increments.png`` (forest
plot of delta AUC / delta C over the base with 95% CIs), ``km.png`` (time-to-event: Kaplan-Meier curves of
the risk groups of repeat 1, groups defined inside the folds by the training median); with an external
validation, ``roc_external.png`` (binary: ROC of each set on the held-out site) and its tables.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Dict

import numpy as np


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> bytes:
    from DeepDosimetricsLib.runtime.atomic import write_bytes_atomic

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    data = buffer.getvalue()
    write_bytes_atomic(path, lambda handle: handle.write(data), sync=False)
    return data


def _mean_prediction(matrix: np.ndarray) -> np.ndarray:
    return np.nanmean(matrix, axis=0)


def _rows(frame, validation: str = "cv"):
    """The rows of one validation (``cv`` or ``external:SITE``) of summary/comparison."""
    if "validation" not in frame.columns:
        return frame
    return frame[frame["validation"].fillna("cv") == validation]


def roc_figure(context, plt):
    from sklearn.metrics import roc_curve

    y = context["target"]["outcome"].to_numpy(dtype=int)
    summary = _rows(context["summary"])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, matrix in context["predictions"].items():
        fpr, tpr, _ = roc_curve(y, _mean_prediction(matrix))
        row = summary[(summary.feature_set == name) & (summary.metric == "auc")].iloc[0]
        ax.plot(fpr, tpr, lw=1.6, label=f"{name}: AUC {row.estimate:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}]")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (out-of-fold, mean over repeats)")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def external_roc_figure(context, plt):
    """ROC of each set on the external site (one prediction per patient: the model fitted on the others)."""
    from sklearn.metrics import roc_curve

    external = context["external"]
    y = external["target"]["outcome"].to_numpy(dtype=int)
    summary = _rows(context["summary"], external["label"])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, result in external["results"].items():
        fpr, tpr, _ = roc_curve(y, result.prediction)
        row = summary[(summary.feature_set == name) & (summary.metric == "auc")].iloc[0]
        ax.plot(fpr, tpr, lw=1.6, label=f"{name}: AUC {row.estimate:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}]")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    split = external["split"]
    ax.set(xlabel="1 - specificity", ylabel="sensitivity",
           title=f"ROC on the external site ({split.column} = {split.site})")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def calibration_figure(context, plt):
    y = context["target"]["outcome"].to_numpy(dtype=int)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, matrix in context["predictions"].items():
        p = _mean_prediction(matrix)
        edges = np.quantile(p, np.linspace(0, 1, 6))
        groups = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 4)
        xs = [p[groups == g].mean() for g in range(5) if (groups == g).any()]
        ys = [y[groups == g].mean() for g in range(5) if (groups == g).any()]
        ax.plot(xs, ys, marker="o", lw=1.2, label=name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1),
           title="Calibration (fifths of the prediction)")
    ax.legend(fontsize=7)
    return fig


def increments_figure(context, plt):
    comparison = _rows(context["comparison"])
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * max(1, len(comparison))))
    rows = list(comparison.itertuples(index=False))[::-1]
    for i, row in enumerate(rows):
        ax.errorbar(row.delta, i, xerr=[[row.delta - row.ci_low], [row.ci_high - row.delta]], fmt="o",
                    color="C0", capsize=3)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)), [f"{r.feature_set} (p={r.p_value:.3f})" for r in rows], fontsize=8)
    metric = "AUC" if context["kind"] == "binary" else "C-index"
    ax.set(xlabel=f"delta {metric} over {context['base']} (95% CI)", title="Increments over the base set")
    return fig


def km_figure(context, plt):
    from DeepDosimetricsLib.analysis.survival import kaplan_meier, risk_groups

    time = context["target"]["time"].to_numpy(dtype=float)
    event = context["target"]["event"].to_numpy(dtype=int)
    names = list(context["results"])
    cols = min(3, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        groups = risk_groups(context["results"][name], len(time), repeat=0)
        for curve in kaplan_meier(time, event, groups):
            ax.step(curve["time"], curve["survival"], where="post", label=f"{curve['label']} (n={curve['n']})")
            p = curve["logrank_p"]
        ax.set(title=f"{name} (log-rank p={p:.3g})", xlabel="time", ylabel="survival", ylim=(0, 1.02))
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _table_html(frame, digits: int = 3) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.{digits}f}", na_rep="", border=0,
                         classes="table", escape=True)


def write_report(out: Path, context: dict) -> Dict[str, Path]:
    """Write figures/*.png and report.html; returns their paths."""
    from DeepDosimetricsLib.runtime.atomic import write_text_atomic

    plt = _figure()
    figures = out / "figures"
    makers = [("increments", increments_figure)]
    if context["kind"] == "binary":
        makers = [("roc", roc_figure), ("calibration", calibration_figure)] + makers
    else:
        makers = [("km", km_figure)] + makers
    if not len(_rows(context["comparison"])):
        makers = [m for m in makers if m[0] != "increments"]
    external = context.get("external")
    if external is not None and context["kind"] == "binary":
        makers.append(("roc_external", external_roc_figure))
    paths: Dict[str, Path] = {}
    images = []
    for name, maker in makers:
        fig = maker(context, plt)
        data = _save(fig, figures / f"{name}.png")
        plt.close(fig)
        paths[f"figures/{name}.png"] = figures / f"{name}.png"
        images.append((name, base64.b64encode(data).decode("ascii")))

    settings = context["settings"]
    endpoint = context["endpoint"]
    selected = context["selected"]
    top = selected.groupby("feature_set", sort=False).head(10) if len(selected) else selected
    describe = (
        f"binary endpoint <code>{html.escape(endpoint.outcome)}</code> (AUC, Brier score, calibration)"
        if endpoint.kind == "binary"
        else f"time-to-event endpoint <code>{html.escape(endpoint.time)}</code> / "
        f"<code>{html.escape(endpoint.event)}</code> (Harrell's C, Kaplan-Meier risk groups)"
    )
    body = [
        "<h1>DeepDosimetrics outcome analysis</h1>",
        f"<p>{describe}; model <b>{html.escape(settings.model)}</b>; {settings.repeats} x repeated stratified "
        f"{settings.folds}-fold cross-validation, nested ({settings.inner_folds}-fold inner CV for feature "
        "selection and the penalty); imputation, one-hot encoding, "
        + ("ComBat by <code>" + html.escape(settings.harmonize) + "</code>, " if settings.harmonize else "")
        + "constant and correlated (|r| &gt; 0.95) feature removal and scaling fitted on each training fold "
        f"only; 95% CIs from {settings.bootstrap} bootstrap resamples of patients; increments are paired "
        f"differences against <b>{html.escape(context['base'])}</b> on the same folds.</p>",
        "<h2>Performance</h2>", _table_html(_rows(context["summary"])),
    ]
    if len(_rows(context["comparison"])):
        body += ["<h2>Increments over the base</h2>", _table_html(_rows(context["comparison"]))]
    if external is not None:
        split = external["split"]
        body += [
            f"<h2>External validation: {html.escape(split.column)} = {html.escape(split.site)}</h2>",
            f"<p>The cross-validation above ran on the {len(split.development)} development patients (the other "
            f"sites). Each set's whole pipeline (preprocessing, inner-CV selection and penalty, refit) was then "
            f"fitted once on all of them and tested on the {len(split.external)} patients of the held-out site "
            f"({external['n_events']} events); nothing was fitted on that site"
            + (" (ComBat included: the external site's features enter unadjusted)" if settings.harmonize else "")
            + f". 95% CIs from {settings.bootstrap} bootstrap resamples of the external patients; increments "
            "are paired on them.</p>",
            _table_html(_rows(context["summary"], external["label"])),
        ]
        if len(_rows(context["comparison"], external["label"])):
            body += ["<h3>Increments over the base on the external site</h3>",
                     _table_html(_rows(context["comparison"], external["label"]))]
    for name, data in images:
        body.append(f'<h2>{name}</h2><img alt="{name}" src="data:image/png;base64,{data}">')
    body += [
        "<h2>Top features (selection frequency across outer folds)</h2>", _table_html(top),
        "<h2>Cohort</h2>", _table_html(context["cohort"], 0),
        "<h2>Settings</h2>", f"<pre>{html.escape(json.dumps(settings.to_json(), indent=2))}</pre>",
    ]
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>DeepDosimetrics outcome analysis</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #ddd}"
        "img{max-width:100%}code,pre{background:#f5f5f5}</style></head><body>\n"
        + "\n".join(body) + "\n</body></html>\n"
    )
    paths["report.html"] = write_text_atomic(out / "report.html", page)
    return paths


__all__ = ["write_report"]
