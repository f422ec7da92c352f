"""Outcome analysis speed (issue 10): `predict` on 300 patients x 3000 features, 5 folds x 10 repeats, nested,
with --jobs 1 and --jobs 2 (each in a fresh process).

The data are synthetic: a clinical table (age, sex, stage and a binary outcome from a logistic model of two
of the features and the age) and one wide feature table of 3000 columns (two informative, the rest noise,
with blocks of correlated columns as radiomics have). Sets compared: clinical, radiomics, clinical+radiomics.

    .venv/bin/python bench/predict_benchmark.py                       # the issue's case (several minutes)
    .venv/bin/python bench/predict_benchmark.py --patients 100 --features 300 --repeats 2   # a quick check

Prints one line per run and, last, a JSON object with the wall times, peak RSS and the speed-up.
Target: under 5 minutes with --jobs 2 and at least 1.7x over --jobs 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_data(work: Path, patients: int, features: int, seed: int) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    ids = [f"p{i:04d}" for i in range(patients)]
    latent = rng.normal(size=(patients, -(-features // 30)))
    X = np.repeat(latent, 30, axis=1)[:, :features] * 0.7 + rng.normal(size=(patients, features)) * 0.7
    age = rng.normal(62, 9, patients)
    logit = 0.9 * X[:, 0] - 0.7 * X[:, 45] + 0.03 * (age - 62)
    y = (rng.uniform(size=patients) < 1 / (1 + np.exp(-logit))).astype(int)
    clinical = pd.DataFrame({"patient": ids, "age": age.round(), "sex": rng.choice(["M", "F"], patients),
                             "stage": rng.choice(["I", "II", "III"], patients), "outcome": y})
    clinical.to_csv(work / "clinical.csv", index=False)
    table = pd.DataFrame(X, columns=[f"f{j:04d}" for j in range(features)])
    table.insert(0, "patient", ids)
    table.to_csv(work / "radiomics.csv", index=False)


def child(args) -> None:
    from benchlib import peak_rss_mb
    from DeepDosimetricsLib.analysis.job import PredictSettings, predict_outcome

    work = Path(args.work)
    start = time.perf_counter()
    result = predict_outcome(PredictSettings(
        clinical=str(work / "clinical.csv"), outcome="outcome", features={"radiomics": str(work / "radiomics.csv")},
        out=str(work / f"out_jobs{args.jobs}"), folds=args.folds, repeats=args.repeats, jobs=args.jobs,
        seed=0, quiet=True,
    ))
    wall = time.perf_counter() - start
    auc = result.summary[result.summary.metric == "auc"].set_index("feature_set")["estimate"].round(3).to_dict()
    print(json.dumps({"jobs": args.jobs, "wall_s": round(wall, 1), "peak_rss_mb": round(peak_rss_mb(), 0),
                      "auc": auc}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--features", type=int, default=3000)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--jobs-list", default="1,2", help="comma-separated --jobs values to time")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--jobs", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.jobs is not None:
        child(args)
        return
    from benchlib import run_script

    work = Path(args.work or tempfile.mkdtemp(prefix="predict-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    make_data(work, args.patients, args.features, seed=1)
    runs = []
    for jobs in [int(j) for j in args.jobs_list.split(",")]:
        run = run_script(__file__, "--work", str(work), "--jobs", str(jobs), "--folds", str(args.folds),
                         "--repeats", str(args.repeats))
        print(f"--jobs {jobs}: {run['wall_s']} s, peak RSS {run['peak_rss_mb']} MB, AUC {run['auc']}", flush=True)
        runs.append(run)
    load = os.getloadavg()
    summary = {
        "patients": args.patients, "features": args.features, "folds": args.folds, "repeats": args.repeats,
        "runs": runs, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_after": [round(v, 2) for v in load], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if len(runs) >= 2:
        summary["speedup"] = round(runs[0]["wall_s"] / runs[-1]["wall_s"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
