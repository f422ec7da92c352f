"""`make demo`: the whole pipeline on the embedded phantom cohort, printing where each output is.

Steps: phantom cohort (80 small phantoms from 3 scanner sites) -> radiomics and DVH tables -> small
autoencoder training -> deep features of every patient, and reconstruction, metrics, Slicer scenes and
snapshots of the first six -> outcome analysis (`predict`: clinical vs DVH vs radiomics vs deep features,
then the same with ComBat harmonisation by site). Each step is the same `deepdosimetrics` sub-command a
user would run; re-running reuses what is already done.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List

from DeepDosimetricsLib.cli import main as cli_main

#: the phantom cohort: enough patients for an outcome analysis, on a coarse grid (8.3 mm, 10-mm slices), with
#: the outcome coefficients doubled (oracle AUC about 0.83 instead of 0.69 for 80 patients)
COHORT_ARGS = ["--shape", "48", "48", "32", "--sites", "3", "--outcome-scale", "2", "--seed", "0"]
#: the training step (one place: the fidelity work may change it)
TRAIN_ARGS = ["--channels", "default", "--tile", "16", "--batch", "16", "--features", "10", "--widths", "16", "32"]
#: patients that get reconstructions, scenes, snapshots and a latent traversal
SHOWCASE = 6
#: the outcome analysis: nested CV folds and repeats
PREDICT_ARGS = ["--folds", "5", "--repeats", "3", "--bootstrap", "1000"]


def run_step(title: str, argv: List[str]) -> None:
    """Run one CLI step, stopping the demo with its exit code when it fails."""
    print(f"\n=== {title}\n$ deepdosimetrics {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    code = cli_main(argv)
    if code != 0:
        print(f"demo: step '{title}' ended with exit code {code}", file=sys.stderr)
        sys.exit(code)
    print(f"--- {title}: {time.perf_counter() - start:.0f} s", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    parser.add_argument("--patients", type=int, default=80, help="phantom patients")
    parser.add_argument("--steps", type=int, default=1500, help="training steps")
    parser.add_argument("--jobs", type=int, default=2, help="parallel workers for radiomics/DVH/cache")
    args = parser.parse_args(argv)
    out: Path = args.out
    cohort = out / "cohort"
    cache = out / "cache"
    model = out / "model"
    encoded = out / "encoding"
    deep = out / "deep_features"
    analysis = out / "analysis"
    analysis_combat = out / "analysis_harmonized"
    start = time.perf_counter()

    if not (cohort / "clinical.csv").exists():
        run_step("phantom cohort", ["synth", "--out", str(cohort), "--patients", str(args.patients), "--quiet",
                                    *COHORT_ARGS])
    run_step("radiomics (CT, first-order)", ["radiomics", "--cohort", str(cohort), "--preset", "firstorder",
                                             "--jobs", str(args.jobs), "--out", str(out / "radiomics_ct.csv")])
    run_step("dosiomics (dose, first-order)", ["radiomics", "--cohort", str(cohort), "--image", "dose",
                                               "--jobs", str(args.jobs), "--out", str(out / "radiomics_dose.csv")])
    run_step("dose-volume metrics", ["dvh", "--cohort", str(cohort), "--jobs", str(args.jobs),
                                     "--out", str(out / "dvh.csv"), "--dvh-curves", str(out / "dvh_curves.csv")])
    run_step("training", ["train", "--cohort", str(cohort), "--cache", str(cache), "--out", str(model),
                          *TRAIN_ARGS, "--steps", str(args.steps), "--resume"])
    run_step("deep features (every patient)", ["encode", "--model", str(model), "--cohort", str(cohort),
                                               "--cache", str(cache), "--out", str(deep), "--jobs", str(args.jobs),
                                               "--resume", "--quiet"])
    showcase = ",".join(f"phantom_{i:03d}" for i in range(min(SHOWCASE, args.patients)))
    run_step("encoding and reconstruction", ["encode", "--model", str(model), "--cohort", str(cohort),
                                             "--cache", str(cache), "--out", str(encoded), "--reconstruct",
                                             "--patients", showcase,
                                             "--scene", "--snapshots", "--traverse", "z00", "--sigmas=-2,2",
                                             "--resume"])
    tables = ["--features", f"dvh={out / 'dvh.csv'}", f"radiomics={out / 'radiomics_ct.csv'}",
              f"deep={deep / 'features.csv'}"]
    predict = ["predict", "--clinical", str(cohort / "clinical.csv"), "--outcome", "outcome", *tables,
               *PREDICT_ARGS, "--jobs", str(args.jobs), "--quiet"]
    run_step("outcome analysis (does imaging add to the clinical variables?)", [*predict, "--out", str(analysis)])
    run_step("outcome analysis with ComBat harmonisation by scanner site",
             [*predict, "--harmonize", "site", "--harmonize-sets", "radiomics,deep", "--out", str(analysis_combat)])
    print(f"\nDemo done in {time.perf_counter() - start:.0f} s. Outputs:")
    for label, path in [
        ("phantom cohort", cohort),
        ("radiomics (CT)", out / "radiomics_ct.csv"),
        ("radiomics (dose)", out / "radiomics_dose.csv"),
        ("DVH metrics", out / "dvh.csv"),
        ("DVH curves", out / "dvh_curves.csv"),
        ("model", model),
        ("loss curve", model / "loss_curve.png"),
        ("features", encoded / "features.csv"),
        ("reconstruction metrics", encoded / "metrics.csv"),
        ("reconstructions, scenes, snapshots", encoded),
        ("deep features of every patient", deep / "features.csv"),
        ("outcome analysis report", analysis / "report.html"),
        ("  summary / increments", analysis / "summary.csv"),
        ("  with ComBat by site", analysis_combat / "report.html"),
    ]:
        print(f"  {label:36s} {path}{'' if path.exists() else '  (missing)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
