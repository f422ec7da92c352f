"""Outcome analysis (`predict`, issue 10): no leakage, known signal, harmonisation, time-to-event, bad input.

Small data (100-200 patients, 2 repeats, 3-5 folds, 200-500 bootstrap resamples) keeps the file fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("sklearn")
pytest.importorskip("sksurv")

from DeepDosimetricsLib.analysis import stats  # noqa: E402
from DeepDosimetricsLib.analysis.job import PredictSettings, predict_outcome  # noqa: E402
from DeepDosimetricsLib.analysis.protocol import (  # noqa: E402
    ProtocolSettings,
    SetData,
    oof_matrix,
    run_protocol,
)
from DeepDosimetricsLib.runtime.errors import InputError  # noqa: E402


def _noise_set(X: np.ndarray, name: str = "noise") -> SetData:
    return SetData(name, X, [f"f{i}" for i in range(X.shape[1])], None, [], np.ones(X.shape[1], dtype=bool))


def _mean_auc(X: np.ndarray, y: np.ndarray, model: str, repeats: int = 2, folds: int = 3) -> float:
    settings = ProtocolSettings(model=model, folds=folds, repeats=repeats, forest_trees=25)
    results = run_protocol([_noise_set(X)], y, y, None, settings, "binary")
    predictions = oof_matrix(results["noise"], len(y), repeats)
    return float(stats.pair_index(predictions, stats.binary_pairs(y)).mean())


def _write_tables(folder: Path, clinical: pd.DataFrame, features: dict) -> dict:
    clinical.to_csv(folder / "clinical.csv", index=False)
    paths = {}
    for name, frame in features.items():
        paths[name] = str(folder / f"{name}.csv")
        frame.to_csv(paths[name], index=False)
    return paths


def _ids(n: int) -> list:
    return [f"pt{i:03d}" for i in range(n)]


# ------------------------------------------------------------------------------------------ leakage
@pytest.mark.parametrize("model", ["logistic", "elasticnet", "forest"])
def test_noise_features_give_chance_auc_for_every_model(model):
    rng = np.random.default_rng(11)
    X = rng.normal(size=(100, 2000))
    y = rng.permutation(np.repeat([0, 1], 50))
    auc = _mean_auc(X, y, model)
    assert 0.35 <= auc <= 0.65, f"{model}: AUC {auc:.3f} on pure noise"


def test_selecting_features_before_the_split_fails_the_leakage_check():
    """The same noise, but the top features are chosen on ALL patients before cross-validation (the classic
    mistake): the AUC is optimistic far beyond chance. The honest protocol above passes the check."""
    from sklearn.feature_selection import f_classif

    rng = np.random.default_rng(11)
    X = rng.normal(size=(100, 2000))
    y = rng.permutation(np.repeat([0, 1], 50))
    scores, _ = f_classif(X, y)
    leaky = X[:, np.argsort(scores)[::-1][:20]]
    auc = _mean_auc(leaky, y, "logistic")
    assert not (0.35 <= auc <= 0.65), f"the leaky pipeline should fail the check, AUC {auc:.3f}"
    assert auc > 0.75


# ------------------------------------------------------------------------------------------ signal
def test_known_signal_approaches_the_oracle_and_the_increment_is_positive(tmp_path):
    rng = np.random.default_rng(3)
    n, p = 120, 300
    signal = rng.normal(size=n)
    probability = 1 / (1 + np.exp(-2.0 * signal))
    y = (rng.uniform(size=n) < probability).astype(int)
    oracle = stats.pair_index(probability[None], stats.binary_pairs(y))[0]
    ids = _ids(n)
    clinical = pd.DataFrame({"patient": ids, "age": rng.normal(60, 8, n).round(), "outcome": y})
    features = pd.DataFrame(rng.normal(size=(n, p)), columns=[f"n{j:03d}" for j in range(p)])
    features.insert(7, "informative", signal)
    features.insert(0, "patient", ids)
    paths = _write_tables(tmp_path, clinical, {"image": features})
    result = predict_outcome(PredictSettings(
        clinical=str(tmp_path / "clinical.csv"), outcome="outcome", features=paths, out=str(tmp_path / "out"),
        folds=4, repeats=2, bootstrap=500, report=False,
    ))
    summary = result.summary.set_index(["feature_set", "metric"])
    auc = summary.loc[("clinical+image", "auc"), "estimate"]
    assert auc > 0.7 and auc > oracle - 0.1, (auc, oracle)
    assert summary.loc[("clinical", "auc"), "estimate"] < 0.65  # age is noise
    increment = result.comparison.set_index("feature_set").loc["clinical+image"]
    assert increment["ci_low"] > 0 and increment["p_value"] < 0.05
    selected = pd.read_csv(tmp_path / "out" / "selected_features.csv")
    top = selected[selected.feature_set == "image"].iloc[0]
    assert top["feature"] == "image:informative" and top["selection_frequency"] == 1.0


# ------------------------------------------------------------------------------------------ ComBat
def test_combat_removes_an_injected_site_offset_without_removing_signal():
    from DeepDosimetricsLib.analysis.harmonize import ComBat, batch_association

    rng = np.random.default_rng(5)
    n, p = 240, 40
    site = rng.choice(["A", "B", "C"], size=n)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, p))
    X[:, 0] += 1.2 * y  # the signal, independent of the site
    offset = {"A": -1.5, "B": 0.0, "C": 2.0}
    scale = {"A": 1.0, "B": 2.0, "C": 0.7}
    shifted = np.array([X[i] * scale[s] + offset[s] for i, s in enumerate(site)])
    train, test = np.arange(n) < 160, np.arange(n) >= 160
    combat = ComBat().fit(shifted[train], site[train])
    harmonised = combat.transform(shifted[test], site[test])
    before = batch_association(shifted[test], site[test])
    after = batch_association(harmonised, site[test])
    assert before > 20 and after < 2.5, (before, after)
    # the site no longer predicts from the features (test fold, fitted on the training fold)
    from sklearn.linear_model import LogisticRegression

    train_h = combat.transform(shifted[train], site[train])
    clf = LogisticRegression(max_iter=2000).fit(train_h, site[train])
    assert clf.score(harmonised, site[test]) < 0.55  # chance is about 1/3
    signal_before = stats.pair_index(X[test][:, 0][None], stats.binary_pairs(y[test]))[0]
    signal_after = stats.pair_index(harmonised[:, 0][None], stats.binary_pairs(y[test]))[0]
    assert signal_after > 0.7 and signal_after > signal_before - 0.05


def test_predict_with_harmonize_keeps_the_signal(tmp_path):
    rng = np.random.default_rng(8)
    n = 120
    ids = _ids(n)
    site = rng.choice(["s1", "s2"], size=n)
    signal = rng.normal(size=n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-2.5 * signal))).astype(int)
    X = rng.normal(size=(n, 30))
    X[:, 0] = signal
    X += np.where(site == "s1", 3.0, -3.0)[:, None]
    features = pd.DataFrame(X, columns=[f"f{j}" for j in range(30)])
    features.insert(0, "patient", ids)
    clinical = pd.DataFrame({"patient": ids, "site": site, "outcome": y})
    paths = _write_tables(tmp_path, clinical, {"rad": features})
    result = predict_outcome(PredictSettings(
        clinical=str(tmp_path / "clinical.csv"), outcome="outcome", features=paths, out=str(tmp_path / "o"),
        covariates=[], base="rad", harmonize="site", harmonize_sets=["rad"], folds=3, repeats=2, bootstrap=200,
        report=False,
    ))
    auc = result.summary.set_index(["feature_set", "metric"]).loc[("rad", "auc"), "estimate"]
    assert auc > 0.75
    cohort = pd.read_csv(tmp_path / "o" / "cohort.csv")
    assert {"site = s1", "site = s2"} <= set(cohort["what"])
    trace = [w for w in cohort["what"] if w.startswith("table rad: mean F")]
    before, after = (float(v) for v in trace[0].rsplit(":", 1)[1].split("/"))
    assert before > 50 and after < 2, trace
    with pytest.raises(InputError, match="--harmonize-sets: no feature table named dvh"):
        predict_outcome(PredictSettings(
            clinical=str(tmp_path / "clinical.csv"), outcome="outcome", features=paths, out=str(tmp_path / "o"),
            harmonize="site", harmonize_sets=["dvh"],
        ))


# ------------------------------------------------------------------------------------------ survival
def test_c_index_ci_covers_the_oracle_on_simulated_survival(tmp_path):
    rng = np.random.default_rng(21)
    n = 200
    x = rng.normal(size=n)
    hazard_ratio = 2.0  # per standard deviation of x
    risk = np.log(hazard_ratio) * x
    event_time = rng.exponential(1.0 / (0.1 * np.exp(risk)))
    censor_time = rng.uniform(0, 25, size=n)
    time = np.minimum(event_time, censor_time)
    event = (event_time <= censor_time).astype(int)
    oracle = stats.pair_index(risk[None], stats.survival_pairs(time, event))[0]
    ids = _ids(n)
    clinical = pd.DataFrame({"patient": ids, "time": time.round(4), "event": event})
    features = pd.DataFrame(rng.normal(size=(n, 10)), columns=[f"n{j}" for j in range(10)])
    features["x"] = x
    features.insert(0, "patient", ids)
    paths = _write_tables(tmp_path, clinical, {"img": features})
    result = predict_outcome(PredictSettings(
        clinical=str(tmp_path / "clinical.csv"), time="time", event="event", features=paths, covariates=[],
        out=str(tmp_path / "out"), folds=4, repeats=2, bootstrap=500,
    ))
    row = result.summary.set_index("feature_set").loc["img"]
    assert row["metric"] == "c_index"
    assert row["ci_low"] <= oracle <= row["ci_high"], (row.to_dict(), oracle)
    assert row["estimate"] > 0.6
    assert (tmp_path / "out" / "figures" / "km.png").stat().st_size > 1000
    predictions = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert {"risk_group", "time", "event"} <= set(predictions.columns)


def test_pairwise_indices_agree_with_scikit_learn_and_scikit_survival():
    from sklearn.metrics import roc_auc_score
    from sksurv.metrics import concordance_index_censored

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 80)
    p = rng.normal(size=80).round(1)  # with ties
    assert stats.pair_index(p[None], stats.binary_pairs(y))[0] == pytest.approx(roc_auc_score(y, p))
    time, event, risk = rng.exponential(size=80), rng.integers(0, 2, 80).astype(bool), rng.normal(size=80)
    expected = concordance_index_censored(event, time, risk)[0]
    assert stats.pair_index(risk[None], stats.survival_pairs(time, event))[0] == pytest.approx(expected)


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def small_tables(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    ids = _ids(n)
    clinical = pd.DataFrame({"patient": ids, "age": rng.normal(60, 5, n), "outcome": np.tile([0, 1], n // 2)})
    features = pd.DataFrame({"patient": ids, "a": rng.normal(size=n), "b": rng.normal(size=n)})
    paths = _write_tables(tmp_path, clinical, {"img": features})
    return tmp_path, clinical, features, paths


def _settings(folder: Path, paths: dict, **kw) -> PredictSettings:
    base = dict(clinical=str(folder / "clinical.csv"), outcome="outcome", features=paths, out=str(folder / "o"),
                folds=3, repeats=1, bootstrap=100, report=False)
    base.update(kw)
    return PredictSettings(**base)


def test_unknown_outcome_column(small_tables):
    folder, _, _, paths = small_tables
    with pytest.raises(InputError, match="no column named 'toxicity'.*columns: age, outcome"):
        predict_outcome(_settings(folder, paths, outcome="toxicity"))


def test_non_binary_outcome(small_tables):
    folder, clinical, _, paths = small_tables
    clinical.assign(outcome=np.arange(len(clinical)) % 3).to_csv(folder / "clinical.csv", index=False)
    with pytest.raises(InputError, match="must be binary.*found values 0, 1, 2"):
        predict_outcome(_settings(folder, paths))


def test_fewer_events_than_folds(small_tables):
    folder, clinical, _, paths = small_tables
    outcome = np.zeros(len(clinical), dtype=int)
    outcome[:2] = 1
    clinical.assign(outcome=outcome).to_csv(folder / "clinical.csv", index=False)
    with pytest.raises(InputError, match="2 patients with outcome=1.*at least 3 of each"):
        predict_outcome(_settings(folder, paths))


def test_table_with_no_patient_in_common(small_tables):
    folder, _, features, paths = small_tables
    features.assign(patient=[f"other{i}" for i in range(len(features))]).to_csv(paths["img"], index=False)
    with pytest.raises(InputError, match="feature table img .*no patient in common"):
        predict_outcome(_settings(folder, paths))


def test_all_features_constant_gives_a_reason_row_or_an_error(small_tables):
    folder, _, features, paths = small_tables
    features.assign(a=1.0, b=2.0).to_csv(paths["img"], index=False)
    result = predict_outcome(_settings(folder, paths))
    row = result.summary.set_index("feature_set").loc["img"]
    assert "constant" in row["reason"] and np.isnan(row["estimate"])
    assert "img" not in set(result.comparison["feature_set"])
    with pytest.raises(InputError, match="no feature set can be fitted.*constant"):
        predict_outcome(_settings(folder, paths, covariates=[], base="img"))


def test_duplicated_patient_ids(small_tables):
    folder, clinical, features, paths = small_tables
    features.assign(patient=["pt000"] + list(features.patient[1:-1]) + ["pt000"]).to_csv(paths["img"], index=False)
    with pytest.raises(InputError, match="feature table img .*duplicated patient ids pt000"):
        predict_outcome(_settings(folder, paths))
    clinical.iloc[[0, 0, 1]].to_csv(folder / "clinical.csv", index=False)
    with pytest.raises(InputError, match="clinical table .*duplicated patient ids pt000"):
        predict_outcome(_settings(folder, paths))


def test_long_table_patients_missing_are_counted(tmp_path):
    rng = np.random.default_rng(4)
    n = 60
    ids = _ids(n)
    y = np.tile([0, 1], n // 2)
    clinical = pd.DataFrame({"patient": ids, "age": rng.normal(60, 5, n), "outcome": y})
    clinical.loc[3, "outcome"] = np.nan
    rows = [(pid, s, "dose", "Dmean_Gy", rng.normal(), "") for pid in ids[5:] for s in ("Heart", "Lung_L")]
    rows.append((ids[6], "Heart", "dose", "", np.nan, "empty structure: Heart is empty"))
    long = pd.DataFrame(rows, columns=["patient", "structure", "image", "feature", "value", "reason"])
    paths = _write_tables(tmp_path, clinical, {"dvh": long})
    result = predict_outcome(_settings(tmp_path, paths))
    cohort = pd.read_csv(tmp_path / "o" / "cohort.csv").set_index("what")
    assert cohort.loc["patients analysed", "count"] == n - 5
    assert cohort.loc["left out: no outcome in the clinical table", "count"] == 1
    assert cohort.loc["left out: missing from table dvh", "count"] == 4  # pt003 has no outcome anyway
    assert any("without a value" in w for w in cohort.index)
    assert result.summary["n_features"].max() == 3  # age + Heart/dose/Dmean_Gy + Lung_L/dose/Dmean_Gy


# ------------------------------------------------------------------------------------------ command line
def test_cli_writes_every_output(tmp_path):
    from DeepDosimetricsLib.cli import main

    rng = np.random.default_rng(9)
    n = 60
    ids = _ids(n)
    y = rng.permutation(np.tile([0, 1], n // 2))
    clinical = pd.DataFrame({"patient": ids, "age": rng.normal(60, 5, n), "stage": rng.choice(["I", "II"], n),
                             "outcome": y})
    wide = pd.DataFrame({"patient": ids, "x": y + rng.normal(scale=0.8, size=n), "z": rng.normal(size=n)})
    paths = _write_tables(tmp_path, clinical, {"dvh": wide})
    out = tmp_path / "analysis"
    code = main(["predict", "--clinical", str(tmp_path / "clinical.csv"), "--outcome", "outcome",
                 "--features", f"dvh={paths['dvh']}", "--folds", "3", "--repeats", "2", "--bootstrap", "200",
                 "--quiet", "--out", str(out)])
    assert code == 0
    for name in ("summary.csv", "comparison.csv", "predictions.csv", "selected_features.csv", "cohort.csv",
                 "report.html", "predict.json", "figures/roc.png", "figures/calibration.png",
                 "figures/increments.png"):
        assert (out / name).is_file(), name
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns[:8]) == ["feature_set", "n_patients", "n_events", "n_features", "metric",
                                         "estimate", "ci_low", "ci_high"]
    assert set(summary.feature_set) == {"clinical", "dvh", "clinical+dvh"}
    assert {"auc", "brier", "calibration_slope", "calibration_intercept"} <= set(summary.metric)
    comparison = pd.read_csv(out / "comparison.csv")
    assert list(comparison.columns) == ["feature_set", "reference", "metric", "delta", "ci_low", "ci_high",
                                        "p_value", "validation"]
    assert set(comparison.validation) == set(summary.validation) == {"cv"}  # no --validate-on: CV rows only
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 3 * 2 * n  # sets x repeats x patients
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "clinical+dvh" in page
    record = json.loads((out / "predict.json").read_text())
    assert record["settings"]["folds"] == 3 and "scikit-learn" in record["versions"]
    assert not list(out.glob(".*.tmp*"))
    bad = main(["predict", "--clinical", str(tmp_path / "clinical.csv"), "--outcome", "nope",
                "--features", f"dvh={paths['dvh']}", "--out", str(out)])
    assert bad == 2


def test_parallel_folds_give_the_same_predictions():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 30))
    y = np.tile([0, 1], 20)
    settings = ProtocolSettings(folds=3, repeats=1, penalty_grid=(0.1,))
    one = run_protocol([_noise_set(X)], y, y, None, settings, "binary", jobs=1)["noise"]
    two = run_protocol([_noise_set(X)], y, y, None, settings, "binary", jobs=2)["noise"]
    assert np.array_equal(oof_matrix(one, 40, 1), oof_matrix(two, 40, 1))


# ------------------------------------------------------------------------------------------ phantoms
def test_phantom_scanner_site_changes_the_ct_only():
    from DeepDosimetricsLib.data.phantoms import SCANNER_SITES, PhantomConfig, generate_patient

    plain = generate_patient(1, PhantomConfig(shape=(32, 32, 24)))
    sited = generate_patient(1, PhantomConfig(shape=(32, 32, 24), sites=3))
    site = sited.parameters["clinical"]["site"]
    assert site in {s.name for s in SCANNER_SITES[:3]} and sited.parameters["scanner"]["name"] == site
    assert np.array_equal(plain.dose, sited.dose)
    assert plain.structures.keys() == sited.structures.keys()
    assert all(np.array_equal(plain.structures[k], sited.structures[k]) for k in plain.structures)
    assert plain.parameters["clinical"]["outcome"] == sited.parameters["clinical"]["outcome"]
    assert sited.parameters["clinical"]["tumour_site"] == plain.parameters["clinical"]["site"]
    if site != "site_A":
        assert not np.array_equal(plain.ct, sited.ct)


@pytest.mark.slow
def test_dvh_beats_clinical_on_the_phantom_cohort(tmp_path):
    """The phantoms' outcome is a logistic model of the organ-at-risk mean dose and the PTV volume
    (cohort.json): the DVH set must predict better than the clinical variables (noise) and its most often
    selected features must come from those structures."""
    from DeepDosimetricsLib.data.phantoms import synthesize_cohort
    from DeepDosimetricsLib.features.dosimetrics import cohort_dvh

    cohort = synthesize_cohort(tmp_path / "cohort", patients=48, shape=(32, 32, 24), seed=1, sites=2,
                               outcome_scale=3.0)
    model = json.loads((cohort / "cohort.json").read_text())["outcome_model"]
    assert model["per_gy_organ_mean_dose"] == pytest.approx(0.45)
    cohort_dvh(cohort, quiet=True).metrics.to_csv(tmp_path / "dvh.csv", index=False)
    result = predict_outcome(PredictSettings(
        clinical=str(cohort / "clinical.csv"), outcome="outcome", features={"dvh": str(tmp_path / "dvh.csv")},
        out=str(tmp_path / "out"), folds=3, repeats=2, bootstrap=300, report=False,
    ))
    auc = result.summary[result.summary.metric == "auc"].set_index("feature_set")["estimate"]
    assert auc["dvh"] > auc["clinical"] + 0.1 and auc["dvh"] > 0.7, auc.to_dict()
    selected = pd.read_csv(tmp_path / "out" / "selected_features.csv")
    top = selected[selected.feature_set == "dvh"].head(3)["feature"].str.split("/").str[0].str.removeprefix("dvh:")
    assert set(top) & {"Heart", "Rectum", "PTV"}, list(top)


def test_structures_match_by_name_or_canonical_synonym(tmp_path):
    """dvh tables keep the patients' structure names, encode's the cache's canonical ones: --structures
    LeftParotid keeps both LeftParotid and Parotid_L columns."""
    from DeepDosimetricsLib.analysis.tables import read_feature_table

    long = pd.DataFrame({"patient": ["p1", "p1", "p1"], "structure": ["LeftParotid", "Parotid_L", "Heart"],
                         "feature": ["Dmean_Gy", "z00_mean", "Dmean_Gy"], "value": [1.0, 2.0, 3.0]})
    long.to_csv(tmp_path / "t.csv", index=False)
    table = read_feature_table(str(tmp_path / "t.csv"), "t", structures=["leftparotid"])
    assert sorted(c.split("/")[0] for c in table.frame.columns) == ["LeftParotid", "Parotid_L"]
    with pytest.raises(InputError, match="no column of the structures"):
        read_feature_table(str(tmp_path / "t.csv"), "t", structures=["Rectum"])
