"""A known signal on real anatomy (issue 10): a xerostomia-like outcome simulated from the mean parotid dose
of the OpenKBP patients (Lyman-Kutcher-Burman NTCP), then `predict` on the DVH set (and radiomics / deep
features when given) against noise clinical covariates. How much of the oracle AUC does each set recover?

    NTCP = Phi((D - TD50) / (m * TD50)),  D = mean dose of both parotids (volume-weighted; LKB with n = 1)

TD50 is the cohort's median D and m is chosen so that the 10th and 90th percentiles of D map to NTCP 0.1 and
0.9 (ANALYSIS.md: probabilities spanning the cohort, a high oracle AUC). The outcome is one Bernoulli draw
per patient (--seed). The clinical table holds the outcome and two noise covariates (age, sex): OpenKBP has
no clinical data. The oracle AUC is the AUC of the generating NTCP on the drawn outcomes; each set's
"recovered" fraction is (AUC - 0.5) / (oracle - 0.5).

    .venv/bin/python bench/predict_openkbp.py --work bench/results/predict_openkbp            # runs dvh first
    .venv/bin/python bench/predict_openkbp.py --work DIR --dvh DVH.csv --radiomics RAD.csv --deep features.csv

Given tables are reused (the deep features of `encode` are the fidelity work's: pass its features.csv).
Prints a line per set and, last, a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COHORT = REPO.parent / "shared" / "data" / "openkbp" / "train"


def parotid_mean_dose(dvh_csv: Path):
    """Volume-weighted mean dose of the parotids per patient (Series), from a long dvh table."""
    import pandas as pd

    table = pd.read_csv(dvh_csv, dtype={"patient": str})
    parotid = table[table["structure"].astype(str).str.lower().str.contains("parotid")]
    wide = parotid.pivot_table(index=["patient", "structure"], columns="feature", values="value")
    wide = wide.dropna(subset=["Dmean_Gy", "volume_cc"])
    weighted = (wide["Dmean_Gy"] * wide["volume_cc"]).groupby(level=0).sum()
    volume = wide["volume_cc"].groupby(level=0).sum()
    return (weighted / volume).rename("parotid_mean_gy")


def simulate(dose, seed: int):
    """LKB NTCP (n = 1) with TD50 = median dose and m spreading the 10-90th percentiles to NTCP 0.1-0.9."""
    import numpy as np
    from scipy.stats import norm

    td50 = float(np.median(dose))
    d90 = float(np.percentile(dose, 90))
    m = max((d90 - td50) / (norm.ppf(0.9) * td50), 0.02)
    ntcp = norm.cdf((dose.to_numpy() - td50) / (m * td50))
    rng = np.random.default_rng(seed)
    outcome = (rng.uniform(size=len(ntcp)) < ntcp).astype(int)
    return ntcp, outcome, {"TD50_gy": round(td50, 2), "m": round(m, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, default=DEFAULT_COHORT)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--dvh", type=Path, default=None, help="dvh table of the cohort (default: computed)")
    parser.add_argument("--radiomics", type=Path, default=None, help="radiomics table (optional)")
    parser.add_argument("--deep", type=Path, default=None, help="encode features.csv (optional)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import pandas as pd
    from DeepDosimetricsLib.analysis import stats
    from DeepDosimetricsLib.analysis.job import PredictSettings, format_summary, predict_outcome
    from DeepDosimetricsLib.cli import main as cli

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    dvh = args.dvh or work / "dvh.csv"
    start = time.perf_counter()
    if not dvh.exists():
        code = cli(["dvh", "--cohort", str(args.cohort), "--jobs", str(args.jobs), "--quiet", "--out", str(dvh)])
        if code not in (0, 1):
            raise SystemExit(f"dvh failed with exit code {code}")
    dvh_s = time.perf_counter() - start
    dose = parotid_mean_dose(dvh)
    ntcp, outcome, model = simulate(dose, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    clinical = pd.DataFrame({"patient": dose.index, "age": rng.normal(60, 9, len(dose)).round(),
                             "sex": rng.choice(["M", "F"], len(dose)), "xerostomia": outcome})
    clinical.to_csv(work / "clinical.csv", index=False)
    oracle = float(stats.pair_index(ntcp[None], stats.binary_pairs(outcome))[0])
    features = {"dvh": str(dvh)}
    if args.radiomics:
        features["radiomics"] = str(args.radiomics)
    if args.deep:
        features["deep"] = str(args.deep)
    start = time.perf_counter()
    result = predict_outcome(PredictSettings(
        clinical=str(work / "clinical.csv"), outcome="xerostomia", features=features, out=str(work / "analysis"),
        folds=args.folds, repeats=args.repeats, jobs=args.jobs, seed=args.seed, quiet=True,
    ))
    predict_s = time.perf_counter() - start
    print(format_summary(result.summary, result.comparison))
    auc = result.summary[result.summary.metric == "auc"].set_index("feature_set")
    recovered = {name: round((row.estimate - 0.5) / (oracle - 0.5), 3) for name, row in auc.iterrows()
                 if np.isfinite(row.estimate)}
    print(f"\noracle AUC {oracle:.3f} (LKB TD50 {model['TD50_gy']} Gy, m {model['m']}; "
          f"{int(outcome.sum())} events / {len(outcome)} patients); recovered fraction: {recovered}")
    print(json.dumps({
        "patients": len(outcome), "events": int(outcome.sum()), "lkb": model, "oracle_auc": round(oracle, 3),
        "auc": {k: [round(r.estimate, 3), round(r.ci_low, 3), round(r.ci_high, 3)] for k, r in auc.iterrows()},
        "recovered_fraction": recovered, "folds": args.folds, "repeats": args.repeats, "jobs": args.jobs,
        "dvh_s": round(dvh_s, 1), "predict_s": round(predict_s, 1), "cpus": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }))


if __name__ == "__main__":
    sys.exit(main())
