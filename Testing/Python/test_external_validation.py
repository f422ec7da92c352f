"""External validation in `predict` (`--validate-on SITE`, analysis/external.py): nothing fitted on the held-out
site (ComBat included), a known signal that transfers, and bad input.

Small data (3 sites x 50 patients, 3 folds x 1 repeat, 200 bootstrap resamples) keeps the file fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("sklearn")

from DeepDosimetricsLib.analysis import stats  # noqa: E402
from DeepDosimetricsLib.analysis.job import PredictSettings, format_summary, predict_outcome  # noqa: E402
from DeepDosimetricsLib.cli import main  # noqa: E402
from DeepDosimetricsLib.runtime.errors import InputError  # noqa: E402

SITES = ("A", "B", "C")


def _cohort(seed: int = 6, per_site: int = 50, shift: float = 1.5):
    """Three sites; an image feature carries the outcome, with a site (scanner) offset on every image
    feature; age is noise. Returns (clinical, image features, the generating probability)."""
    rng = np.random.default_rng(seed)
    n = per_site * len(SITES)
    ids = [f"pt{i:03d}" for i in range(n)]
    site = np.repeat(SITES, per_site)
    signal = rng.normal(size=n)
    probability = 1 / (1 + np.exp(-2.5 * signal))
    y = (rng.uniform(size=n) < probability).astype(int)
    offset = np.select([site == "B", site == "C"], [shift, -shift], 0.0)
    image = pd.DataFrame(rng.normal(size=(n, 12)), columns=[f"noise{j:02d}" for j in range(12)])
    image.insert(3, "informative", signal)
    image = image + offset[:, None]
    image.insert(0, "patient", ids)
    clinical = pd.DataFrame({"patient": ids, "age": rng.normal(60, 8, n).round(), "site": site, "outcome": y})
    return clinical, image, probability


def _run(folder: Path, clinical, image, **options):
    folder.mkdir(parents=True, exist_ok=True)
    clinical.to_csv(folder / "clinical.csv", index=False)
    image.to_csv(folder / "image.csv", index=False)
    settings = dict(clinical=str(folder / "clinical.csv"), outcome="outcome", features={"image": str(folder / "image.csv")},
                    out=str(folder / "out"), folds=3, repeats=1, bootstrap=200, report=False)
    settings.update(options)
    return predict_outcome(PredictSettings(**settings))


def _external(result, site="C"):
    summary = result.summary[result.summary["validation"] == f"external:{site}"]
    return summary[summary.metric == "auc"].set_index("feature_set")


@pytest.mark.parametrize("harmonize", [None, "site"])
def test_a_signal_that_transfers_gives_a_high_external_auc(tmp_path, harmonize):
    clinical, image, probability = _cohort()
    result = _run(tmp_path, clinical, image, validate_on="C", harmonize=harmonize)
    external = _external(result)
    held_out = clinical["site"].to_numpy() == "C"
    y = clinical["outcome"].to_numpy()[held_out]
    oracle = stats.pair_index(probability[held_out][None], stats.binary_pairs(y))[0]
    assert external.loc["image", "estimate"] > 0.8 and external.loc["image", "estimate"] > oracle - 0.1
    assert external.loc["image", "n_patients"] == held_out.sum() and external.loc["image", "n_events"] == y.sum()
    assert external.loc["image", "ci_low"] < external.loc["image", "estimate"] < external.loc["image", "ci_high"]
    assert external.loc["clinical", "estimate"] < 0.7  # age is noise
    # the cross-validation ran on the development sites only
    cv = result.summary[(result.summary.validation == "cv") & (result.summary.metric == "auc")]
    assert (cv["n_patients"] == (~held_out).sum()).all()
    # the paired increment on the external site
    delta = result.comparison[(result.comparison.validation == "external:C")].set_index("feature_set")
    assert delta.loc["image", "ci_low"] > 0 and delta.loc["image", "reference"] == "clinical"
    predictions = pd.read_csv(tmp_path / "out" / "external_predictions.csv", dtype={"patient": str})
    assert set(predictions["patient"]) == set(clinical["patient"][held_out])
    assert "external validation (C" in format_summary(result.summary, result.comparison)


def test_nothing_is_fitted_on_the_external_site(tmp_path):
    """Leakage check (ComBat on): change the external patients' outcomes and every external patient's features
    but one. The cross-validation, and that one patient's external prediction, do not move by a bit."""
    clinical, image, _ = _cohort(seed=8)
    first = _run(tmp_path / "one", clinical, image, validate_on="C", harmonize="site")
    held_out = np.flatnonzero(clinical["site"].to_numpy() == "C")
    kept = clinical["patient"].iloc[held_out[0]]
    rng = np.random.default_rng(0)
    changed_clinical = clinical.copy()
    changed_clinical.loc[held_out, "outcome"] = rng.permutation(clinical.loc[held_out, "outcome"].to_numpy())
    changed_image = image.copy()
    columns = [c for c in image.columns if c != "patient"]
    changed_image.loc[held_out[1:], columns] = rng.normal(5.0, 3.0, size=(len(held_out) - 1, len(columns)))
    second = _run(tmp_path / "two", changed_clinical, changed_image, validate_on="C", harmonize="site")
    cv_columns = ["feature_set", "metric", "estimate", "ci_low", "ci_high"]
    pd.testing.assert_frame_equal(first.summary[first.summary.validation == "cv"][cv_columns],
                                  second.summary[second.summary.validation == "cv"][cv_columns])
    read = [pd.read_csv(r.out / "external_predictions.csv", dtype={"patient": str}).set_index(["feature_set", "patient"])
            for r in (first, second)]
    for name in ("clinical", "image", "clinical+image"):
        assert read[0].loc[(name, kept), "prediction"] == read[1].loc[(name, kept), "prediction"]
    assert not np.allclose(read[0]["prediction"].to_numpy(), read[1]["prediction"].to_numpy())


def test_bad_input(tmp_path):
    clinical, image, _ = _cohort(seed=2)
    with pytest.raises(InputError, match=r"site = 'D'.*values found: A, B, C"):
        _run(tmp_path, clinical, image, validate_on="D")
    one_class = clinical.copy()
    one_class.loc[one_class.site == "C", "outcome"] = 1
    with pytest.raises(InputError, match="external AUC needs patients of both classes"):
        _run(tmp_path, one_class, image, validate_on="C")
    with pytest.raises(InputError, match="no column named 'hospital'"):
        _run(tmp_path, clinical, image, validate_on="C", site_column="hospital")
    with pytest.raises(InputError, match="give --validate-on too"):
        _run(tmp_path, clinical, image, site_column="site")
    with pytest.raises(InputError, match="every analysed patient is at that site"):
        _run(tmp_path, clinical.assign(site="C"), image, validate_on="C")


def test_predict_command_with_validate_on(tmp_path, capsys):
    clinical, image, _ = _cohort(seed=4)
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    image.to_csv(tmp_path / "image.csv", index=False)
    arguments = ["predict", "--clinical", str(tmp_path / "clinical.csv"), "--outcome", "outcome", "--features",
                 f"image={tmp_path / 'image.csv'}", "--folds", "3", "--repeats", "1", "--bootstrap", "200",
                 "--quiet", "--out", str(tmp_path / "out")]
    assert main(arguments + ["--validate-on", "B"]) == 0
    assert "external validation (B" in capsys.readouterr().out
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert set(summary["validation"]) == {"cv", "external:B"}
    assert "External validation: site = B" in (tmp_path / "out" / "report.html").read_text()
    assert (tmp_path / "out" / "figures" / "roc_external.png").is_file()
    assert main(arguments + ["--validate-on", "Z"]) == 2
    assert "error: --validate-on Z" in capsys.readouterr().err
