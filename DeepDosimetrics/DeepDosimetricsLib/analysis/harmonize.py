"""ComBat harmonisation by site/scanner, as a transformer fitted on training folds only.

The estimates come from ``neuroCombat`` (Fortin et al. 2017/2018; the empirical-Bayes location/scale
ComBat of Johnson et al. 2007, parametric priors): the grand mean and pooled variance of each feature and
the shrunken per-batch shifts ``gamma*`` and scales ``delta*``. neuroCombat fits and adjusts the SAME
samples; applying the training estimates to a test fold is done here with the standard ComBat formula

    x' = ((x - mean) / sqrt(var_pooled) - gamma*[batch]) / sqrt(delta*[batch]) * sqrt(var_pooled) + mean

(what neuroCombat's own ``neuroCombatFromTraining`` computes, without its 'under development' caveats:
it prints, and converts arrays to int in a way NumPy deprecates). No biological covariate is protected: in
a prediction study the outcome is not known for the test fold, and protecting it in the training fold only
would make the two folds be adjusted differently. Harmonisation therefore assumes that the batch is not
confounded with the outcome (check the cohort counts per site).

Samples of a batch the training fold did not see (or saw fewer than two times) are left unadjusted.
"""

from __future__ import annotations

import contextlib
import io
from typing import Optional, Sequence

import numpy as np

#: fewest training samples of a batch for ComBat to estimate its location and scale
MIN_BATCH = 2


class ComBat:
    """Fit ComBat on training samples (``fit(X, batch)``) and apply it to any samples (``transform``)."""

    def __init__(self, eb: bool = True, parametric: bool = True) -> None:
        self.eb = eb
        self.parametric = parametric

    def fit(self, X: np.ndarray, batch: Sequence) -> ComBat:
        """X: samples x features (no missing value); batch: one label per sample."""
        import pandas as pd
        from neuroCombat import neuroCombat

        X = np.asarray(X, dtype=float)
        labels = np.asarray([str(b) for b in batch])
        self.n_features_ = X.shape[1]
        levels, counts = np.unique(labels, return_counts=True)
        usable = levels[counts >= MIN_BATCH]
        self.batches_ = []
        self.columns_ = np.zeros(X.shape[1], dtype=bool)
        inside = np.isin(labels, usable)
        if len(usable) < 2:  # nothing to harmonise between
            return self
        data = X[inside]
        variance = data.var(axis=0)
        # a feature constant within a batch gives a zero scale: leave it as it is
        within = np.stack([data[labels[inside] == level].var(axis=0) for level in usable])
        columns = (variance > 0) & (within > 0).all(axis=0)
        if not columns.any():
            return self
        covars = pd.DataFrame({"batch": labels[inside]})
        with contextlib.redirect_stdout(io.StringIO()):
            result = neuroCombat(
                dat=data[:, columns].T, covars=covars, batch_col="batch", eb=self.eb, parametric=self.parametric
            )
        estimates = result["estimates"]
        self.batches_ = [str(b) for b in estimates["batches"]]
        self.columns_ = columns
        self.mean_ = np.asarray(estimates["stand.mean"])[:, 0]
        self.scale_ = np.sqrt(np.asarray(estimates["var.pooled"]).ravel())
        self.gamma_ = np.asarray(estimates["gamma.star"], dtype=float)
        self.delta_ = np.asarray(estimates["delta.star"], dtype=float)
        return self

    def transform(self, X: np.ndarray, batch: Sequence) -> np.ndarray:
        """The harmonised copy of X (unseen batches and unadjustable columns unchanged)."""
        X = np.array(X, dtype=float, copy=True)
        if not self.batches_:
            return X
        labels = np.asarray([str(b) for b in batch])
        block = X[:, self.columns_]
        standard = (block - self.mean_) / self.scale_
        for index, level in enumerate(self.batches_):
            rows = labels == level
            if rows.any():
                standard[rows] = (standard[rows] - self.gamma_[index]) / np.sqrt(self.delta_[index])
        adjusted = standard * self.scale_ + self.mean_
        seen = np.isin(labels, self.batches_)
        block[seen] = adjusted[seen]
        X[:, self.columns_] = block
        return X

    def fit_transform(self, X: np.ndarray, batch: Sequence) -> np.ndarray:
        return self.fit(X, batch).transform(X, batch)


def batch_association(X: np.ndarray, batch: Sequence, columns: Optional[np.ndarray] = None) -> float:
    """Mean one-way ANOVA F statistic of the features across batches (how strongly the batch shows).

    About 1 when the batch leaves no trace in the features; used by tests and the report.
    """
    from sklearn.feature_selection import f_classif

    X = np.asarray(X, dtype=float)
    if columns is not None:
        X = X[:, columns]
    keep = X.var(axis=0) > 0
    f, _ = f_classif(X[:, keep], np.asarray([str(b) for b in batch]))
    return float(np.nanmean(f))


__all__ = ["ComBat", "batch_association", "MIN_BATCH"]
