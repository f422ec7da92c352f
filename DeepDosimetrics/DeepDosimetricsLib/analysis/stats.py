"""Metrics of out-of-fold predictions, bootstrap CIs over patients, and paired increments.

Predictions are a ``repeats x patients`` matrix (one out-of-fold prediction per patient and repeat).
A metric's estimate is the mean over repeats of the metric of each repeat; ``repeat_sd`` is its standard
deviation across repeats (the spread due to the random splits).

AUC and Harrell's C are both concordance fractions over pairs of patients: (event, non-event) pairs for
the AUC, (i, j) with time_i < time_j and an event for i for Harrell's C (ties in the prediction count
1/2; equal times are not comparable). Writing them over pairs makes the bootstrap exact and fast: a
bootstrap resample of patients weighs each pair by the product of its two patients' counts, and the
mean over repeats is one dot product. Every set is resampled with the SAME patients, so an increment
(delta = set - reference) is a paired difference: its CI is the percentile interval of the bootstrap
deltas and its two-sided p-value ``2 min(P*(delta <= 0), P*(delta >= 0))`` (with the +1 correction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np


@dataclass
class Pairs:
    """The comparable pairs of a cohort: the first patient should get the higher prediction."""

    first: np.ndarray
    second: np.ndarray


def binary_pairs(y: np.ndarray) -> Pairs:
    """(event, non-event) pairs."""
    y = np.asarray(y)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    return Pairs(np.repeat(pos, len(neg)), np.tile(neg, len(pos)))


def survival_pairs(time: np.ndarray, event: np.ndarray) -> Pairs:
    """Harrell's comparable pairs: i had an event and j was followed longer (time_i < time_j)."""
    time, event = np.asarray(time, dtype=float), np.asarray(event, dtype=bool)
    first, second = [], []
    for i in np.flatnonzero(event):
        later = np.flatnonzero(time > time[i])
        first.append(np.full(len(later), i))
        second.append(later)
    if not first:
        return Pairs(np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    return Pairs(np.concatenate(first), np.concatenate(second))


def concordance(predictions: np.ndarray, pairs: Pairs) -> np.ndarray:
    """Per pair and repeat: 1 when the first patient is ranked higher, 1/2 on a tie, else 0 (R x P)."""
    p = np.atleast_2d(predictions)
    a, b = p[:, pairs.first], p[:, pairs.second]
    return (a > b).astype(np.float32) + 0.5 * (a == b).astype(np.float32)


def pair_index(predictions: np.ndarray, pairs: Pairs) -> np.ndarray:
    """The AUC / Harrell's C of each repeat (a vector of length R)."""
    if len(pairs.first) == 0:
        return np.full(np.atleast_2d(predictions).shape[0], np.nan)
    return concordance(predictions, pairs).mean(axis=1, dtype=float)


def bootstrap_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """``resamples x n`` counts of each patient in each bootstrap resample (fixed by the seed)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def bootstrap_pair_index(mean_concordance: np.ndarray, pairs: Pairs, counts: np.ndarray) -> np.ndarray:
    """Bootstrap distribution of a pair index, for one or several sets at once.

    ``mean_concordance``: P (one set) or P x S (several), the concordance averaged over repeats.
    Returns B (or B x S) values.
    """
    out = []
    for start in range(0, len(counts), 64):
        chunk = counts[start:start + 64]
        weights = chunk[:, pairs.first] * chunk[:, pairs.second]
        total = weights.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = (weights @ mean_concordance) / (total if mean_concordance.ndim == 1 else total[:, None])
        out.append(values)
    return np.concatenate(out, axis=0)


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_p_value(deltas: np.ndarray) -> float:
    """Two-sided bootstrap p-value of delta = 0."""
    deltas = np.asarray(deltas, dtype=float)
    deltas = deltas[np.isfinite(deltas)]
    if not len(deltas):
        return float("nan")
    below, above = int((deltas <= 0).sum()), int((deltas >= 0).sum())
    return float(min(1.0, 2.0 * (min(below, above) + 1) / (len(deltas) + 1)))


# ------------------------------------------------------------------------------ calibration, Brier
def brier(predictions: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Brier score of each repeat."""
    return ((np.atleast_2d(predictions) - np.asarray(y, dtype=float)) ** 2).mean(axis=1)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def calibration(p: np.ndarray, y: np.ndarray, weights: Optional[np.ndarray] = None) -> tuple:
    """Calibration slope (logistic regression of y on logit p) and intercept (calibration-in-the-large:
    the intercept with the slope fixed at 1), by Newton's method, optionally with case weights."""
    with np.errstate(over="ignore"):  # exp of a large logit: mu is 0 or 1, as it should be
        return _calibration(p, y, weights)


def _calibration(p: np.ndarray, y: np.ndarray, weights: Optional[np.ndarray]) -> tuple:
    x = _logit(np.asarray(p, dtype=float))
    y = np.asarray(y, dtype=float)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    beta = np.zeros(2)
    design = np.column_stack([np.ones_like(x), x])
    for _ in range(50):
        mu = 1 / (1 + np.exp(-(design @ beta)))
        gradient = design.T @ (w * (y - mu))
        hessian = (design * (w * mu * (1 - mu))[:, None]).T @ design + 1e-9 * np.eye(2)
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            return float("nan"), float("nan")
        beta += step
        if np.abs(step).max() < 1e-8:
            break
    intercept = 0.0
    for _ in range(50):
        mu = 1 / (1 + np.exp(-(intercept + x)))
        step = (w * (y - mu)).sum() / max((w * mu * (1 - mu)).sum(), 1e-12)
        intercept += step
        if abs(step) < 1e-10:
            break
    return float(beta[1]), float(intercept)


@dataclass
class MetricSummary:
    estimate: float
    ci_low: float
    ci_high: float
    repeat_sd: float


def summarise(per_repeat: np.ndarray, bootstrap: np.ndarray) -> MetricSummary:
    per_repeat = np.asarray(per_repeat, dtype=float)
    low, high = percentile_ci(bootstrap)
    sd = float(np.nanstd(per_repeat, ddof=1)) if np.isfinite(per_repeat).sum() > 1 else 0.0
    return MetricSummary(float(np.nanmean(per_repeat)), low, high, sd)


def binary_metrics(
    predictions: np.ndarray, y: np.ndarray, counts: np.ndarray, calibration_resamples: int = 200
) -> Dict[str, MetricSummary]:
    """AUC, Brier score, calibration slope and intercept of one set (R x n predictions)."""
    pairs = binary_pairs(y)
    conc = concordance(predictions, pairs)
    auc_boot = bootstrap_pair_index(conc.mean(axis=0, dtype=float), pairs, counts)
    squared = ((predictions - y) ** 2).mean(axis=0)
    brier_boot = counts @ squared / counts.sum(axis=1)
    slopes, intercepts = zip(*(calibration(p, y) for p in predictions))
    cal_boot = np.array(
        [
            np.nanmean([calibration(p, y, c) for p in predictions], axis=0)
            for c in counts[:calibration_resamples]
        ]
    ).reshape(-1, 2)
    return {
        "auc": summarise(conc.mean(axis=1, dtype=float), auc_boot),
        "brier": summarise(brier(predictions, y), brier_boot),
        "calibration_slope": summarise(np.array(slopes), cal_boot[:, 0]),
        "calibration_intercept": summarise(np.array(intercepts), cal_boot[:, 1]),
    }


def survival_metrics(predictions: np.ndarray, time: np.ndarray, event: np.ndarray, counts: np.ndarray):
    """Harrell's C of one set (R x n risk scores)."""
    pairs = survival_pairs(time, event)
    conc = concordance(predictions, pairs)
    boot = bootstrap_pair_index(conc.mean(axis=0, dtype=float), pairs, counts)
    return {"c_index": summarise(conc.mean(axis=1, dtype=float), boot)}


def paired_delta(
    predictions: np.ndarray, reference: np.ndarray, pairs: Pairs, counts: np.ndarray
) -> tuple:
    """(delta, ci_low, ci_high, p_value) of the pair index of ``predictions`` minus ``reference``,
    both R x n on the same patients and splits."""
    conc = concordance(predictions, pairs).mean(axis=0, dtype=float)
    ref = concordance(reference, pairs).mean(axis=0, dtype=float)
    delta = float(conc.mean() - ref.mean())
    boot = bootstrap_pair_index(np.column_stack([conc, ref]), pairs, counts)
    deltas = boot[:, 0] - boot[:, 1]
    low, high = percentile_ci(deltas)
    return delta, low, high, bootstrap_p_value(deltas)


__all__ = [
    "MetricSummary",
    "Pairs",
    "binary_metrics",
    "binary_pairs",
    "bootstrap_counts",
    "bootstrap_p_value",
    "brier",
    "calibration",
    "concordance",
    "pair_index",
    "paired_delta",
    "percentile_ci",
    "survival_metrics",
    "survival_pairs",
]
