"""Outcome analysis (`deepdosimetrics predict`, issue 10): do DVH metrics, radiomics or deep features add
predictive value to the clinical variables, and how sure are we?

Entry point (stable; the Slicer module's ``logic.predictOutcome`` and the command call it)::

    from DeepDosimetricsLib.analysis.job import PredictSettings, predict_outcome
    result = predict_outcome(PredictSettings(
        clinical="cohort/clinical.csv", outcome="outcome",           # or time=..., event=...
        features={"dvh": "dvh.csv", "radiomics": "radiomics.csv"},    # long or wide tables
        out="analysis", model="logistic", folds=5, repeats=10, jobs=2, harmonize=None))
    result.summary      # DataFrame = out/summary.csv
    result.comparison   # DataFrame = out/comparison.csv
    result.paths        # {"summary.csv": Path, ..., "report.html": Path, "figures/roc.png": Path, ...}

Modules (one concept each): ``tables`` (clinical and feature tables, patient matching with counts),
``protocol`` (nested repeated stratified CV, preprocessing inside the folds), ``harmonize`` (ComBat fitted
on training folds), ``survival`` (Cox models, risk groups, Kaplan-Meier), ``stats`` (bootstrap CIs over
patients, paired increments), ``report`` (figures and report.html), ``job`` (``predict_outcome``).
Heavy imports (sklearn, sksurv, matplotlib) happen inside functions.
"""
