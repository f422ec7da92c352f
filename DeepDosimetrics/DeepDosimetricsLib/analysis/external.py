"""External validation (``predict --validate-on SITE``): develop on some sites, test once on a held-out one.

Cross-validation reuses one cohort's case mix, scanners and contouring habits; a model that survives a site
it never saw is the result that counts (Chu et al. 2025, IJROBP: deep features beat the mean dose internally
and lost externally). With ``--validate-on SITE`` the patients whose site column (``--site-column``, default
the ``--harmonize`` column, else ``site``) equals SITE are the **external** set; the others are the
**development** set. Then:

1. the nested repeated cross-validation runs on the development patients only (the usual ``cv`` rows);
2. each feature set's whole pipeline is fitted ONCE on all development patients, exactly as in an outer
   training fold (imputation, one-hot encoding, ComBat, constant/correlation filters, scaling; the inner
   CV choosing the number of features and the penalty; the refit), and predicts the external patients;
3. the external predictions give each set's AUC (Brier, calibration) or Harrell's C with a bootstrap CI over
   the external patients, and the paired delta of each set over the base on the same external patients and
   resamples (``external:SITE`` rows of ``summary.csv`` and ``comparison.csv``; ``external_predictions.csv``).

Nothing is fitted on the external site: no estimate of the preprocessing, the model or the inner CV sees its
features or outcomes. Each external patient's prediction is a function of the development data and of that
patient's own features only.

**Harmonisation and an unseen site.** ComBat removes each TRAINING site's location and scale shift towards
their pooled reference; its estimates exist only for sites it was fitted on. A new site's shift could only be
estimated from that site's own patients (a "transductive" ComBat on the external features): that fits a step
on the external set, makes every external prediction depend on the other external patients and on their case
mix (a site that treats more patients to a high dose would see its dose features pulled towards the training
mean), and cannot be done for a patient who arrives alone. So the external site is NOT harmonised: its
features enter as measured (ComBat's transform leaves a batch it was not fitted on unchanged), and the
external AUC tells how a model developed on harmonised features fares on a new site's raw features, which is
what a deployed model meets. When ``--harmonize`` names another column than the site (a scanner seen at
several sites), the external patients of a scanner ComBat was fitted on get that scanner's development
estimates: still nothing fitted on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

from DeepDosimetricsLib.runtime.errors import InputError

#: the clinical column of the site when neither --site-column nor --harmonize names one
DEFAULT_SITE_COLUMN = "site"
#: the ``validation`` value of the cross-validation rows of summary.csv and comparison.csv
CV = "cv"


def validation_label(site: str) -> str:
    """The ``validation`` value of the external rows: ``external:SITE``."""
    return f"external:{site}"


@dataclass
class ExternalSplit:
    """The development and external patients (ids, in cohort order)."""

    column: str
    site: str
    development: List[str]
    external: List[str]


def split_by_site(ids: Sequence[str], sites, site: str, column: str, path: str) -> ExternalSplit:
    """Development (site != ``site``) and external (site == ``site``) patients among ``ids``.

    ``sites``: the site of each patient (a mapping id -> label). Unknown site values and a site holding every
    patient raise InputError naming the values found.
    """
    labels = {i: str(sites[i]) for i in ids}
    found = sorted(set(labels.values()))
    if site not in found:
        raise InputError(
            f"--validate-on {site}: no analysed patient of the clinical table {path} has {column} = {site!r} "
            f"(values found: {', '.join(found)})"
        )
    development = [i for i in ids if labels[i] != site]
    external = [i for i in ids if labels[i] == site]
    if not development:
        raise InputError(f"--validate-on {site}: every analysed patient is at that site; nothing to develop on")
    return ExternalSplit(column, site, development, external)


def check_external_target(kind: str, target: np.ndarray, split: ExternalSplit) -> None:
    """The external patients must allow the metric: both outcome classes (AUC), an event with a later
    follow-up (Harrell's C). InputError otherwise."""
    where = f"--validate-on {split.site}: the {len(split.external)} external patients ({split.column} = {split.site})"
    if kind == "binary":
        events = int(np.sum(target))
        if events == 0 or events == len(target):
            raise InputError(
                f"{where} all have outcome {int(events > 0)}: the external AUC needs patients of both classes"
            )
        return
    time, event = np.asarray(target["time"], dtype=float), np.asarray(target["event"], dtype=bool)
    comparable = any((time > time[i]).any() for i in np.flatnonzero(event))
    if not comparable:
        raise InputError(f"{where} have no event followed by a longer follow-up: Harrell's C is not defined")


def fit_external(sets, target, strata, batch, development: np.ndarray, external: np.ndarray, settings,
                 kind: str, harmonize: bool, jobs: int = 1) -> Dict[str, object]:
    """Each set's pipeline fitted on the development rows (as one outer training fold of
    :func:`~.protocol.fit_fold`: preprocessing, inner-CV tuning, refit) and applied to the external rows.

    Returns set name -> :class:`~.protocol.FoldResult` (``test_index`` = the external rows).
    """
    from joblib import Parallel, delayed

    from DeepDosimetricsLib.analysis.protocol import fit_fold

    # repeat number one past the cross-validation's: its own inner-CV seed, the same for every set
    runner = Parallel(n_jobs=max(1, int(jobs)), batch_size=1)
    results = runner(
        delayed(fit_fold)(data, target, strata, batch, development, external, settings, kind, settings.repeats, 0,
                          harmonize)
        for data in sets
    )
    return {result.set_name: result for result in results}


def external_metrics(results, target, kind: str, base: str, bootstrap: int, seed: int):
    """(metrics by set, deltas over the base by set, the pairs) of the external predictions, bootstrapped
    over the external patients (the same resamples for every set)."""
    from DeepDosimetricsLib.analysis import stats

    n = len(next(iter(results.values())).prediction) if results else 0
    counts = stats.bootstrap_counts(n, bootstrap, seed + 7919)
    metrics, deltas = {}, {}
    for name, result in results.items():
        matrix = np.asarray(result.prediction, dtype=float)[None, :]
        if kind == "binary":
            metrics[name] = stats.binary_metrics(matrix, target, counts)
        else:
            metrics[name] = stats.survival_metrics(matrix, target["time"], target["event"], counts)
    pairs = stats.binary_pairs(target) if kind == "binary" else stats.survival_pairs(target["time"], target["event"])
    if base in results:
        reference = np.asarray(results[base].prediction, dtype=float)[None, :]
        for name, result in results.items():
            if name != base:
                deltas[name] = stats.paired_delta(np.asarray(result.prediction, dtype=float)[None, :], reference,
                                                  pairs, counts)
    return metrics, deltas


__all__ = ["CV", "DEFAULT_SITE_COLUMN", "ExternalSplit", "check_external_target", "external_metrics",
           "fit_external", "split_by_site", "validation_label"]
