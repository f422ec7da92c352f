"""Time-to-event pieces of the analysis (scikit-survival): the target, penalised Cox models, the
univariate Cox score used for feature selection, risk groups and Kaplan-Meier curves.

Harrell's C of the out-of-fold risk scores is computed in :mod:`stats` (pairwise, for the bootstrap); it
equals scikit-survival's ``concordance_index_censored`` on data without tied times (a test checks).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np


def structured_target(time: np.ndarray, event: np.ndarray):
    """scikit-survival's structured array (fields ``event``, ``time``)."""
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(event, dtype=bool), time=np.asarray(time, dtype=float))


def cox_model(settings, seed: int) -> Tuple[object, Dict[str, list]]:
    """The survival model of ``settings.model`` and its inner-CV grid (``model__`` parameters).

    logistic -> Cox with a ridge penalty alpha = 1 / C (``CoxPHSurvivalAnalysis``);
    elasticnet -> elastic-net Cox (``CoxnetSurvivalAnalysis``, one penalty per grid point);
    forest -> random survival forest.
    """
    if settings.model == "logistic":
        from sksurv.linear_model import CoxPHSurvivalAnalysis

        return CoxPHSurvivalAnalysis(ties="breslow"), {
            "model__alpha": [1.0 / max(p, 1e-6) for p in settings.penalty_grid]
        }
    if settings.model == "elasticnet":
        from sksurv.linear_model import CoxnetSurvivalAnalysis

        return CoxnetSurvivalAnalysis(l1_ratio=0.5, alphas=[0.1], max_iter=100000), {
            "model__alphas": [[0.02], [0.1], [0.3]],
            "model__l1_ratio": [0.5, 0.9],
        }
    from sksurv.ensemble import RandomSurvivalForest

    trees = max(50, settings.forest_trees // 2)
    return RandomSurvivalForest(n_estimators=trees, random_state=seed, n_jobs=1), {
        "model__min_samples_leaf": [3, 10]
    }


def cox_score(X: np.ndarray, y) -> tuple:
    """Univariate Cox score statistics (U^2 / I) of each column, with chi-square(1) p-values.

    ``y``: a structured array with fields event and time (scikit-survival's ``Surv``). Ties are handled
    by Breslow's convention. Used as ``SelectKBest``'s score function for time-to-event endpoints.
    """
    from scipy.stats import chi2

    names = y.dtype.names
    event = np.asarray(y[names[0]], dtype=bool)
    time = np.asarray(y[names[1]], dtype=float)
    order = np.argsort(-time, kind="stable")
    X = np.asarray(X, dtype=float)[order]
    t, e = time[order], event[order]
    # risk-set sums (patients with time >= t_i); equal times share the risk set of their group
    cum_n = np.arange(1, len(t) + 1, dtype=float)
    cum_x = np.cumsum(X, axis=0)
    cum_x2 = np.cumsum(X * X, axis=0)
    last = np.searchsorted(-t, -t, side="right") - 1  # last index of each time's tie group
    n_risk = cum_n[last][:, None]
    mean = cum_x[last] / n_risk
    var = cum_x2[last] / n_risk - mean**2
    U = ((X - mean) * e[:, None]).sum(axis=0)
    information = (var * e[:, None]).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(information > 0, U**2 / information, 0.0)
    return score, chi2.sf(score, 1)


def risk_groups(results, n_patients: int, repeat: int = 0) -> np.ndarray:
    """High (1) / low (0) risk of each patient in one repeat: above the median prediction of the training
    patients of its own fold (groups defined inside the folds)."""
    groups = np.full(n_patients, -1)
    for result in results:
        if result.repeat == repeat:
            groups[result.test_index] = (result.prediction > result.train_median).astype(int)
    return groups


def kaplan_meier(time: np.ndarray, event: np.ndarray, groups: np.ndarray) -> List[dict]:
    """Kaplan-Meier curve of each risk group, and the log-rank p-value between them."""
    from sksurv.compare import compare_survival
    from sksurv.nonparametric import kaplan_meier_estimator

    curves = []
    for group, label in ((0, "low risk"), (1, "high risk")):
        rows = groups == group
        if rows.sum() == 0:
            continue
        t, s = kaplan_meier_estimator(np.asarray(event, dtype=bool)[rows], np.asarray(time, dtype=float)[rows])
        curves.append({"label": label, "time": t, "survival": s, "n": int(rows.sum())})
    p_value = float("nan")
    valid = groups >= 0
    if len(curves) == 2:
        try:
            _, p_value = compare_survival(structured_target(time[valid], event[valid]), groups[valid])
        except (ValueError, np.linalg.LinAlgError):
            pass
    for curve in curves:
        curve["logrank_p"] = float(p_value)
    return curves


__all__ = ["cox_model", "cox_score", "kaplan_meier", "risk_groups", "structured_target"]
