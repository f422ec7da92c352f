"""The validation protocol: repeated stratified K-fold, nested, every data-dependent step inside the fold.

For each repeat r and outer fold k (the SAME splits for every feature set, so set comparisons are paired):

1. on the outer training patients only, fit the unsupervised preprocessing (:class:`Preprocessor`):
   median imputation, one-hot encoding of categorical covariates, ComBat by batch (image features only),
   removal of constant columns, a correlation filter (|r| > 0.95: the later column of the pair goes) and
   standardisation;
2. tune the supervised steps by an inner stratified K-fold on the outer training patients
   (``GridSearchCV``): univariate feature selection (``SelectKBest``: ANOVA F for a binary endpoint, the
   Cox score statistic for time-to-event) and the model's penalty;
3. refit the best pipeline on all outer training patients and predict the outer test patients.

The supervised steps are refitted in every inner fold; the unsupervised ones are fitted once per outer
training fold (they never see the outer test fold or the outcome, so the outer estimate stays honest;
this is what makes 300 x 3000 x 50 folds fit in minutes).

Models (``--model``), binary endpoint / time-to-event:
  * ``logistic``: L2-penalised logistic regression / Cox regression with a ridge penalty
    (``CoxPHSurvivalAnalysis``);
  * ``elasticnet``: elastic-net logistic regression (saga) / elastic-net Cox (``CoxnetSurvivalAnalysis``);
  * ``forest``: random forest / random survival forest.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

MODELS = ("logistic", "elasticnet", "forest")


@dataclass
class ProtocolSettings:
    """How the models are validated (part of the job's settings)."""

    model: str = "logistic"
    folds: int = 5
    repeats: int = 10
    inner_folds: int = 3
    seed: int = 0
    correlation_threshold: float = 0.95
    #: numbers of features the inner CV chooses from (capped at the columns available)
    k_grid: Sequence[int] = (1, 5, 20)
    #: inverse penalties (logistic C) / penalties (Cox alpha) the inner CV chooses from
    penalty_grid: Sequence[float] = (0.01, 0.1, 1.0)
    forest_trees: int = 200


@dataclass
class SetData:
    """One feature set's matrix over the analysed patients (row order = the cohort's)."""

    name: str
    numeric: np.ndarray  # patients x numeric columns (float, NaN = missing)
    numeric_names: List[str]
    categorical: Optional[np.ndarray]  # patients x categorical columns (object) or None
    categorical_names: List[str]
    #: which numeric columns are image features (ComBat applies to those only)
    image_mask: np.ndarray

    @property
    def n_features(self) -> int:
        return len(self.numeric_names) + len(self.categorical_names)


@dataclass
class FoldResult:
    """What one outer fold gives back."""

    set_name: str
    repeat: int
    fold: int
    test_index: np.ndarray
    prediction: np.ndarray  # probability of outcome 1, or risk score (higher = earlier event)
    train_median: float  # median training prediction (risk groups for Kaplan-Meier)
    best_params: Dict[str, object]
    inner_score: float
    #: feature -> coefficient (or importance) of the refitted model, for the selected features
    selected: Dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ preprocessing
class Preprocessor:
    """Unsupervised preprocessing, fitted on training patients only (see the module docstring)."""

    def __init__(self, correlation_threshold: float = 0.95, harmonize: bool = False) -> None:
        self.correlation_threshold = correlation_threshold
        self.harmonize = harmonize

    def fit_transform(self, data: SetData, rows: np.ndarray, batch: Optional[np.ndarray]) -> np.ndarray:
        self.fit(data, rows, batch)
        return self.transform(data, rows, batch)

    def fit(self, data: SetData, rows: np.ndarray, batch: Optional[np.ndarray]) -> Preprocessor:
        from sklearn.impute import SimpleImputer
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        numeric = data.numeric[rows]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: median of nothing
            self.imputer_ = SimpleImputer(strategy="median", keep_empty_features=True).fit(numeric)
        names = list(data.numeric_names)
        blocks = [self.imputer_.transform(numeric)]
        image = np.asarray(data.image_mask, dtype=bool)
        self.encoder_ = None
        if data.categorical is not None and data.categorical.shape[1]:
            categorical = _fill_categorical(data.categorical[rows])
            self.encoder_ = OneHotEncoder(handle_unknown="ignore", sparse_output=False).fit(categorical)
            encoded = self.encoder_.transform(categorical)
            blocks.append(encoded)
            names += [str(n) for n in self.encoder_.get_feature_names_out(data.categorical_names)]
            image = np.concatenate([image, np.zeros(encoded.shape[1], dtype=bool)])
        matrix = np.hstack(blocks)
        self.combat_ = None
        if self.harmonize and batch is not None and image.any():
            from DeepDosimetricsLib.analysis.harmonize import ComBat

            combat = ComBat()
            matrix[:, image] = combat.fit_transform(matrix[:, image], batch[rows])
            self.combat_ = combat
        keep = np.nanvar(matrix, axis=0) > 1e-12
        keep &= _correlation_keep(matrix, keep, self.correlation_threshold)
        self.keep_ = keep
        self.image_ = image
        self.names_ = [n for n, k in zip(names, keep) if k]
        if not keep.any():
            self.scaler_ = None
            return self
        self.scaler_ = StandardScaler().fit(matrix[:, keep])
        return self

    def transform(self, data: SetData, rows: np.ndarray, batch: Optional[np.ndarray]) -> np.ndarray:
        blocks = [self.imputer_.transform(data.numeric[rows])]
        if self.encoder_ is not None:
            blocks.append(self.encoder_.transform(_fill_categorical(data.categorical[rows])))
        matrix = np.hstack(blocks)
        if self.combat_ is not None:
            matrix[:, self.image_] = self.combat_.transform(matrix[:, self.image_], batch[rows])
        if self.scaler_ is None:  # nothing varies in the training fold: one constant column
            return np.zeros((len(rows), 1))
        return self.scaler_.transform(matrix[:, self.keep_])


def _fill_categorical(values: np.ndarray) -> np.ndarray:
    out = np.array(values, dtype=object, copy=True)
    for j in range(out.shape[1]):
        column = out[:, j]
        missing = np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in column])
        column[missing] = "(missing)"
        out[:, j] = column.astype(str)
    return out


def _correlation_keep(matrix: np.ndarray, candidates: np.ndarray, threshold: float) -> np.ndarray:
    """Columns kept by a greedy correlation filter: going left to right, a column correlated above the
    threshold (absolute Pearson r) with a column already kept is dropped."""
    keep = candidates.copy()
    index = np.flatnonzero(candidates)
    if threshold >= 1.0 or len(index) < 2:
        return keep
    block = matrix[:, index]
    block = (block - block.mean(axis=0)) / block.std(axis=0)
    corr = np.abs(block.T @ block) / block.shape[0]
    np.fill_diagonal(corr, 0.0)
    upper = np.triu(corr > threshold)
    if not upper.any():
        return keep
    alive = np.ones(len(index), dtype=bool)
    for j in range(len(index)):  # only columns with a high correlation loop here
        if alive[j]:
            alive[upper[j] & alive] = False
            alive[j] = True
    keep[index[~alive]] = False
    return keep


# ------------------------------------------------------------------------------------ models
def _logistic(C: float, l1_ratio: float = 0.0, seed: int = 0):
    """A logistic regression with the given penalty mix, for scikit-learn before and after 1.8."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    if l1_ratio == 0.0:
        return LogisticRegression(C=C, max_iter=5000)
    if (major, minor) >= (1, 8):
        return LogisticRegression(C=C, l1_ratio=l1_ratio, solver="saga", max_iter=5000, random_state=seed)
    return LogisticRegression(
        C=C, penalty="elasticnet", l1_ratio=l1_ratio, solver="saga", max_iter=5000, random_state=seed
    )


def build_search(settings: ProtocolSettings, kind: str, n_columns: int, seed: int):
    """The inner-CV search (a ``GridSearchCV`` over selection + model) for ``n_columns`` input columns."""
    from sklearn.feature_selection import SelectKBest, f_classif
    from sklearn.pipeline import Pipeline

    ks = sorted({min(int(k), n_columns) for k in settings.k_grid})
    penalties = list(settings.penalty_grid)
    if kind == "binary":
        select = SelectKBest(f_classif)
        if settings.model == "logistic":
            model = _logistic(1.0)
            grid = {"model__C": penalties}
        elif settings.model == "elasticnet":
            model = _logistic(1.0, 0.5, seed)
            grid = {"model__C": [max(p, 0.05) for p in penalties], "model__l1_ratio": [0.5, 0.9]}
        else:
            from sklearn.ensemble import RandomForestClassifier

            model = RandomForestClassifier(n_estimators=settings.forest_trees, random_state=seed, n_jobs=1)
            grid = {"model__min_samples_leaf": [1, 5]}
            ks = sorted({k for k in ks if k > 1} or set(ks))  # a forest on one feature is a step function
        scoring = "roc_auc"
    else:
        from DeepDosimetricsLib.analysis.survival import cox_model, cox_score

        select = SelectKBest(cox_score)
        model, grid = cox_model(settings, seed)
        scoring = None  # the model's own score: Harrell's C
    grid["select__k"] = ks
    return Pipeline([("select", select), ("model", model)]), grid, scoring


def outer_splits(strata: np.ndarray, folds: int, repeats: int, seed: int) -> List[List[tuple]]:
    """``repeats`` lists of ``folds`` (train, test) index pairs, stratified on ``strata``."""
    from sklearn.model_selection import StratifiedKFold

    out = []
    for repeat in range(repeats):
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed * 1000 + repeat)
        out.append(list(splitter.split(np.zeros(len(strata)), strata)))
    return out


def fit_fold(
    data: SetData,
    target,
    strata: np.ndarray,
    batch: Optional[np.ndarray],
    train: np.ndarray,
    test: np.ndarray,
    settings: ProtocolSettings,
    kind: str,
    repeat: int,
    fold: int,
    harmonize: bool,
) -> FoldResult:
    """One outer fold: preprocessing on train, inner-CV tuning, refit, prediction of the test patients."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    seed = settings.seed * 100003 + repeat * 101 + fold
    prep = Preprocessor(settings.correlation_threshold, harmonize)
    X_train = prep.fit_transform(data, train, batch)
    X_test = prep.transform(data, test, batch)
    names = prep.names_ or ["(constant)"]
    pipeline, grid, scoring = build_search(settings, kind, X_train.shape[1], seed)
    y_train = target[train]
    inner = StratifiedKFold(n_splits=settings.inner_folds, shuffle=True, random_state=seed)
    splits = list(inner.split(X_train, strata[train]))
    search = GridSearchCV(pipeline, grid, cv=splits, scoring=scoring, n_jobs=1, refit=True, error_score=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # e.g. constant features in an inner fold
        warnings.simplefilter("ignore", RuntimeWarning)
        search.fit(X_train, y_train)
        best = search.best_estimator_
        if kind == "binary":
            prediction = best.predict_proba(X_test)[:, 1]
            train_prediction = best.predict_proba(X_train)[:, 1]
        else:
            prediction = best.predict(X_test)
            train_prediction = best.predict(X_train)
    support = best.named_steps["select"].get_support()
    model = best.named_steps["model"]
    weights = _model_weights(model, int(support.sum()))
    selected = {name: float(w) for name, w in zip(np.asarray(names)[support], weights)}
    params = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in search.best_params_.items()}
    return FoldResult(
        set_name=data.name,
        repeat=repeat,
        fold=fold,
        test_index=np.asarray(test),
        prediction=np.asarray(prediction, dtype=float),
        train_median=float(np.median(train_prediction)),
        best_params=params,
        inner_score=float(search.best_score_),
        selected=selected,
    )


def _model_weights(model, n: int) -> np.ndarray:
    """Coefficients of a linear model (standardised features) or impurity importances of a forest."""
    coef = getattr(model, "coef_", None)
    if coef is not None:
        coef = np.asarray(coef, dtype=float)
        return coef[0] if coef.ndim == 2 and coef.shape[0] == 1 else coef.reshape(n, -1)[:, 0]
    try:
        return np.asarray(model.feature_importances_, dtype=float)
    except (AttributeError, NotImplementedError):
        return np.full(n, np.nan)


def run_protocol(
    sets: Sequence[SetData],
    target,
    strata: np.ndarray,
    batch: Optional[np.ndarray],
    settings: ProtocolSettings,
    kind: str,
    harmonize: bool = False,
    jobs: int = 1,
    quiet: bool = True,
) -> Dict[str, List[FoldResult]]:
    """Every (set, repeat, fold) fitted (in ``jobs`` processes); results by set, in (repeat, fold) order."""
    from joblib import Parallel, delayed

    from DeepDosimetricsLib.runtime.progress import emit_progress, progress_bar

    splits = outer_splits(strata, settings.folds, settings.repeats, settings.seed)
    tasks = [
        (data, repeat, fold, train, test)
        for data in sets
        for repeat, folds in enumerate(splits)
        for fold, (train, test) in enumerate(folds)
    ]
    runner = Parallel(n_jobs=max(1, int(jobs)), return_as="generator", batch_size=1)
    results = runner(
        delayed(fit_fold)(data, target, strata, batch, train, test, settings, kind, repeat, fold, harmonize)
        for data, repeat, fold, train, test in tasks
    )
    out: Dict[str, List[FoldResult]] = {data.name: [] for data in sets}
    bar = progress_bar(results, total=len(tasks), desc="predict", quiet=quiet)
    for done, result in enumerate(bar, start=1):
        out[result.set_name].append(result)
        if not quiet and (done % max(1, len(tasks) // 20) == 0 or done == len(tasks)):
            emit_progress("predict", done, len(tasks))
    return out


def oof_matrix(results: Sequence[FoldResult], n_patients: int, repeats: int) -> np.ndarray:
    """Out-of-fold predictions as a repeats x patients matrix."""
    matrix = np.full((repeats, n_patients), np.nan)
    for result in results:
        matrix[result.repeat, result.test_index] = result.prediction
    return matrix


__all__ = [
    "MODELS",
    "FoldResult",
    "Preprocessor",
    "ProtocolSettings",
    "SetData",
    "build_search",
    "fit_fold",
    "oof_matrix",
    "outer_splits",
    "run_protocol",
]
