"""Where learned features must win (issue 18): outcomes simulated on real OpenKBP anatomy from WHERE the dose
falls inside the parotids, and `predict` on clinical, DVH, spatial DVH, dosiomics and deep features.

Patients: /work/shared/data/openkbp/train (../shared/data from the repository), those with a dose and both
parotids. Per patient, from its own dose and masks (numpy here, independent of the library's descriptors),
with D = the volume-weighted mean dose of both parotids:

  (a) control      NTCP = Phi((D - TD50) / (m TD50)): Lyman-Kutcher-Burman with n = 1 (the mean dose);
                   TD50 = the cohort's median D, m maps its 10th-90th percentiles to NTCP 0.1-0.9.
  (b) sub-region   the same LKB on D_sub = the volume-weighted mean dose of the voxels lying in the cranial
                   40% of each gland's cranio-caudal EXTENT (a stem-cell-region-like sub-volume; not one of
                   the descriptors' equal-volume halves or thirds).
  (c) pattern      s = the mean over both glands of the least-squares slope of the dose along the
                   cranio-caudal axis (Gy/mm, univariate); r = s minus its ordinary-least-squares prediction
                   from D over the cohort (so r is uncorrelated with the mean dose), z-scored;
                   P = 1 / (1 + exp(-K r)) with K = --strength (2.5: odds x 12 per SD).
  (d) pattern, AP  the same with s = the mean over both glands of the anterior-posterior offset (mm) of the
                   dose-weighted centroid from the gland's centroid (where the hot spot lies), residualised
                   against D and z-scored.

One Bernoulli draw per patient (--seed); clinical covariates age and sex are noise. The oracle AUC is the
AUC of the generating probability on the drawn outcomes. Feature tables (cached under --work, parotids only):

  dvh        `dvh` whole-organ metrics (volume, Dmean/min/max, D98..D2, V5..V70)
  spatial    `dvh --spatial`: the same plus the spatial descriptors (sub-volume means, dose centroid offset,
             spread, gradient)
  dosiomics  `radiomics --image dose --preset firstorder`
  deep       `encode` features.csv of --model (unsupervised: the encoder never sees an outcome): pooled codes,
             centred-tile codes, per-half pooled codes and the decoded dose's descriptors
  deep13     the same table without the issue-18 pooling (zNN_mean/std/ctr, dose_rec_mean/max_gy only)

Each rule runs `analysis.job.predict_outcome` (the `predict` command's library call: nested repeated
stratified CV, univariate selection + L2 logistic regression, bootstrap CIs, paired deltas over clinical) with
every set, base+set unions and `all`; further paired deltas (deep - dvh, spatial - dvh, ...) are computed here
from its out-of-fold predictions with the same bootstrap resamples (analysis.stats.paired_delta).

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/spatial_outcome.py --model MODEL_DIR
    # reruns reuse the cached DVH, radiomics and encoding tables under --work (default bench/results/spatial_outcome)

Prints a markdown table and, last, a JSON object (also written to <work>/<model>/spatial_outcome.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "DeepDosimetrics"))
DEFAULT_COHORT = REPO.parent / "shared" / "data" / "openkbp" / "train"
PAROTIDS = ("LeftParotid", "RightParotid")
RULES = ("a_mean", "b_subregion", "c_gradient_cc", "d_hotspot_ap")
#: the deep table's columns before issue 18 (deep13)
DEEP13 = re.compile(r"(z\d\d_(mean|std|ctr)|dose_rec_(mean|max)_gy)$")


# ------------------------------------------------------------------------------------------ the rules
def gland_quantities(dose: np.ndarray, mask: np.ndarray, image) -> dict:
    """Per gland: volume (voxels), mean dose, cranial-40%-of-extent mean dose, CC slope, AP hot-spot offset.

    Positions are LPS mm from SimpleITK's own index-to-physical transform (z cranial, y posterior).
    """
    index = np.argwhere(mask > 0)  # (z, y, x)
    matrix = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps = index[:, ::-1] @ matrix.T + np.asarray(image.GetOrigin())
    d = dose[mask > 0].astype(np.float64)
    z, y = lps[:, 2], lps[:, 1]
    cranial = z >= z.min() + 0.6 * (z.max() - z.min())
    zc = z - z.mean()
    slope = float((zc * (d - d.mean())).sum() / (zc ** 2).sum()) if (zc ** 2).sum() > 0 else 0.0
    weight = np.clip(d, 0, None)
    offset_ap = float((weight * (y - y.mean())).sum() / weight.sum()) if weight.sum() > 0 else 0.0
    return {"voxels": int(d.size), "mean": float(d.mean()), "cranial40_sum": float(d[cranial].sum()),
            "cranial40_voxels": int(cranial.sum()), "slope_cc": slope, "hotspot_ap": offset_ap}


def rule_drivers(cohort: Path, cache_csv: Path):
    """One row per usable patient: D, D_sub, s_cc, s_ap (cached in ``cache_csv``)."""
    import pandas as pd
    import SimpleITK as sitk

    if cache_csv.is_file():
        return pd.read_csv(cache_csv, dtype={"patient": str}).set_index("patient")
    rows, skipped = [], {}
    for folder in sorted(p for p in cohort.iterdir() if p.is_dir()):
        files = {name: folder / f"{name}.nrrd" for name in ("dose",) + PAROTIDS}
        missing = [name for name, path in files.items() if not path.is_file()]
        if missing:
            skipped[folder.name] = "no " + ", ".join(missing)
            continue
        dose_image = sitk.ReadImage(str(files["dose"]))
        dose = sitk.GetArrayFromImage(dose_image)
        glands = [gland_quantities(dose, sitk.GetArrayFromImage(sitk.ReadImage(str(files[g]))), dose_image)
                  for g in PAROTIDS]
        if min(g["voxels"] for g in glands) == 0:
            skipped[folder.name] = "an empty parotid"
            continue
        voxels = sum(g["voxels"] for g in glands)
        rows.append({
            "patient": folder.name,
            "D": sum(g["mean"] * g["voxels"] for g in glands) / voxels,
            "D_sub": sum(g["cranial40_sum"] for g in glands) / sum(g["cranial40_voxels"] for g in glands),
            "s_cc": float(np.mean([g["slope_cc"] for g in glands])),
            "s_ap": float(np.mean([g["hotspot_ap"] for g in glands])),
        })
    table = pd.DataFrame(rows).set_index("patient")
    table.attrs["skipped"] = skipped
    table.to_csv(cache_csv)
    (cache_csv.with_suffix(".skipped.json")).write_text(json.dumps(skipped, indent=1))
    return table


def lkb(dose: np.ndarray):
    """LKB NTCP (n = 1): TD50 = median, m maps the 10th-90th percentiles to NTCP 0.1-0.9 (predict_openkbp's)."""
    from scipy.stats import norm

    td50 = float(np.median(dose))
    m = max((float(np.percentile(dose, 90)) - td50) / (norm.ppf(0.9) * td50), 0.02)
    return norm.cdf((dose - td50) / (m * td50)), f"LKB n=1, TD50 {td50:.1f} Gy, m {m:.3f}"


def residual_logistic(driver: np.ndarray, mean_dose: np.ndarray, strength: float):
    """P = logistic(K r), r = the driver's OLS residual on the mean dose, z-scored."""
    design = np.column_stack([np.ones_like(mean_dose), mean_dose])
    coef, *_ = np.linalg.lstsq(design, driver, rcond=None)
    residual = driver - design @ coef
    residual = (residual - residual.mean()) / residual.std()
    return 1.0 / (1.0 + np.exp(-strength * residual)), residual


def simulate(drivers, rule: str, strength: float, seed: int):
    """(probability, outcome, description) of one rule over the drivers' patients."""
    D = drivers["D"].to_numpy()
    if rule == "a_mean":
        probability, text = lkb(D)
        text = f"NTCP on the mean parotid dose D: {text}"
    elif rule == "b_subregion":
        probability, text = lkb(drivers["D_sub"].to_numpy())
        text = f"NTCP on the mean dose of the cranial 40% of each gland's extent: {text}"
    else:
        column, what = {"c_gradient_cc": ("s_cc", "cranio-caudal dose slope (Gy/mm)"),
                        "d_hotspot_ap": ("s_ap", "AP offset of the dose-weighted centroid (mm)")}[rule]
        probability, _ = residual_logistic(drivers[column].to_numpy(), D, strength)
        r = np.corrcoef(drivers[column].to_numpy(), D)[0, 1]
        text = (f"logistic(K r), K = {strength:g}, r = z-scored residual of the {what} on D "
                f"(raw correlation with D {r:+.2f}; residual's 0)")
    rng = np.random.default_rng(seed + RULES.index(rule))
    outcome = (rng.uniform(size=len(probability)) < probability).astype(int)
    return probability, outcome, text


# ------------------------------------------------------------------------------------------ the tables
def _run_cli(arguments) -> None:
    from DeepDosimetricsLib.cli import main as cli

    code = cli(arguments)
    if code not in (0, 1):
        raise SystemExit(f"deepdosimetrics {arguments[0]} failed with exit code {code}")


def feature_tables(args, work: Path, ids) -> dict:
    """The cached tables (computed when missing): set name -> long CSV path."""
    import pandas as pd
    from DeepDosimetricsLib.features.dosimetrics import metric_names

    structures = ",".join(PAROTIDS)
    timing = {}
    spatial = work / "dvh_spatial.csv"
    if not spatial.is_file():
        start = time.perf_counter()
        _run_cli(["dvh", "--cohort", str(args.cohort), "--structures", structures, "--spatial",
                  "--jobs", str(args.jobs), "--quiet", "--out", str(spatial)])
        timing["dvh_spatial_s"] = round(time.perf_counter() - start, 1)
    dvh = work / "dvh.csv"
    if not dvh.is_file():
        table = pd.read_csv(spatial, dtype={"patient": str})
        table[table["feature"].isin(metric_names() + ["outside_dose_grid_pct"]) | table["feature"].isna()].to_csv(
            dvh, index=False)
    dosiomics = work / "dosiomics.csv"
    if not dosiomics.is_file():
        start = time.perf_counter()
        _run_cli(["radiomics", "--cohort", str(args.cohort), "--image", "dose", "--preset", "firstorder",
                  "--structures", structures, "--jobs", str(args.jobs), "--quiet", "--out", str(dosiomics)])
        timing["dosiomics_s"] = round(time.perf_counter() - start, 1)
    tables = {"dvh": dvh, "spatial": spatial, "dosiomics": dosiomics}
    if args.model is not None:
        encoding = work / f"encode-{model_digest(args.model)}"
        features = encoding / "features.csv"
        if not features.is_file():
            start = time.perf_counter()
            command = ["encode", "--model", str(args.model), "--cohort", str(args.cohort), "--out", str(encoding),
                       "--patients", ",".join(ids), "--batch", "16", "--device", args.device, "--quiet", "--resume"]
            if args.cache is not None:
                command += ["--cache", str(args.cache)]
            _run_cli(command)
            timing["encode_s"] = round(time.perf_counter() - start, 1)
        deep13 = encoding / "features_deep13.csv"
        if not deep13.is_file():
            table = pd.read_csv(features, dtype={"patient": str})
            table[table["feature"].astype(str).str.match(DEEP13)].to_csv(deep13, index=False)
        tables.update({"deep": features, "deep13": deep13})
    return {name: str(path) for name, path in tables.items()}, timing


def resolve_model(model: str) -> Path:
    """A model folder, or a shipped model's name (resolved by the library when it can)."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from DeepDosimetricsLib.deep.shipped import resolve_model as resolve  # the shipped models (issue 17)
    except ImportError:
        raise SystemExit(f"--model {model}: no such folder") from None
    folder = resolve(model)
    if not (folder / "model.json").is_file():
        raise SystemExit(f"--model {model}: no such folder or shipped model")
    return folder


def model_digest(model_dir: Path) -> str:
    digest = hashlib.sha256((Path(model_dir) / "model.pt").read_bytes()).hexdigest()
    return digest[:12]


def default_model(work: Path) -> Path | None:
    """--model's default: <work>/model (a model trained for this benchmark), else the newest finished model
    (model.json and model.pt, no checkpoint newer than them) under the main checkout's bench/results."""
    if (work / "model" / "model.pt").is_file():
        return work / "model"
    found = [p.parent for p in (REPO.parent / "main" / "bench" / "results").glob("**/model.json")
             if (p.parent / "model.pt").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


# ------------------------------------------------------------------------------------------ the analysis
def extra_deltas(out: Path, y: np.ndarray, ids, pairs_wanted, bootstrap: int, seed: int) -> dict:
    """Paired deltas between any two sets from predict's out-of-fold predictions (same resamples)."""
    import pandas as pd
    from DeepDosimetricsLib.analysis import stats

    table = pd.read_csv(out / "predictions.csv", dtype={"patient": str})
    present = set(table["patient"])
    keep = [i for i, pid in enumerate(ids) if pid in present]  # predict's analysed patients, in clinical order
    ids, y = [ids[i] for i in keep], np.asarray(y)[keep]
    position = {pid: i for i, pid in enumerate(ids)}
    matrices = {}
    for name, rows in table.groupby("feature_set"):
        repeats = int(rows["repeat"].max()) + 1
        matrix = np.full((repeats, len(ids)), np.nan)
        matrix[rows["repeat"].to_numpy(), rows["patient"].map(position).to_numpy()] = rows["prediction"].to_numpy()
        matrices[name] = matrix
    counts = stats.bootstrap_counts(len(ids), bootstrap, seed)  # predict's own resamples (same seed)
    pairs = stats.binary_pairs(y)
    result = {}
    for first, second in pairs_wanted:
        if first in matrices and second in matrices:
            delta, low, high, p = stats.paired_delta(matrices[first], matrices[second], pairs, counts)
            result[f"{first} - {second}"] = [round(delta, 3), round(low, 3), round(high, 3), round(p, 3)]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, default=DEFAULT_COHORT)
    parser.add_argument("--work", type=Path, default=HERE / "results" / "spatial_outcome")
    parser.add_argument("--model", default=None,
                        help="trained encoder folder or shipped model name (default: <work>/model, else the newest "
                        "model under ../main/bench/results); 'none': no deep set")
    parser.add_argument("--cache", type=Path, default=None, help="preprocessing cache of the cohort for encode")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--strength", type=float, default=2.5, help="K of the pattern rules (c), (d)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import pandas as pd
    from DeepDosimetricsLib.analysis import stats
    from DeepDosimetricsLib.analysis.job import PredictSettings, predict_outcome

    started = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        args.model = default_model(work)
    elif args.model == "none":
        args.model = None
    if args.model is not None:
        args.model = resolve_model(args.model)
    if args.cache is None and (work / "cache").is_dir():
        args.cache = work / "cache"
    drivers = rule_drivers(args.cohort, work / "drivers.csv")
    ids = list(drivers.index)
    tables, timing = feature_tables(args, work, ids)
    run_dir = work / (f"model-{model_digest(args.model)}" if args.model else "no-model")
    run_dir.mkdir(parents=True, exist_ok=True)

    results, lines = {}, []
    for rule in args.rules:
        probability, outcome, text = simulate(drivers, rule, args.strength, args.seed)
        oracle = float(stats.pair_index(probability[None], stats.binary_pairs(outcome))[0])
        rng = np.random.default_rng(args.seed + 100)
        clinical = pd.DataFrame({"patient": ids, "age": rng.normal(60, 9, len(ids)).round(),
                                 "sex": rng.choice(["M", "F"], len(ids)), "outcome": outcome})
        folder = run_dir / rule
        folder.mkdir(exist_ok=True)
        clinical.to_csv(folder / "clinical.csv", index=False)
        start = time.perf_counter()
        result = predict_outcome(PredictSettings(
            clinical=str(folder / "clinical.csv"), outcome="outcome", features=tables, out=str(folder / "predict"),
            structures=list(PAROTIDS), folds=args.folds, repeats=args.repeats, bootstrap=args.bootstrap,
            jobs=args.jobs, seed=args.seed, quiet=True,
        ))
        seconds = time.perf_counter() - start
        auc = result.summary[result.summary.metric == "auc"].set_index("feature_set")
        comparison = result.comparison.set_index("feature_set")
        deltas = extra_deltas(folder / "predict", outcome, ids,
                              [("deep", "dvh"), ("spatial", "dvh"), ("dosiomics", "dvh"), ("deep", "spatial"),
                               ("deep", "deep13"), ("deep13", "dvh"), ("clinical+deep", "clinical+dvh"),
                               ("all", "clinical+dvh")], args.bootstrap, args.seed)
        results[rule] = {
            "rule": text, "events": int(outcome.sum()), "patients": len(outcome), "oracle_auc": round(oracle, 3),
            "auc": {k: [round(r.estimate, 3), round(r.ci_low, 3), round(r.ci_high, 3), int(r.n_features)]
                    for k, r in auc.iterrows() if np.isfinite(r.estimate)},
            "delta_over_clinical": {k: [round(r.delta, 3), round(r.ci_low, 3), round(r.ci_high, 3)]
                                    for k, r in comparison.iterrows()},
            "paired_deltas": deltas, "predict_s": round(seconds, 1),
        }
        lines.append(f"rule {rule}: {text}; {int(outcome.sum())} events / {len(outcome)}; oracle AUC {oracle:.3f}")
        print(lines[-1], flush=True)

    print()
    sets = [s for s in ["clinical", "dvh", "spatial", "dosiomics", "deep13", "deep", "clinical+dvh",
                        "clinical+spatial", "clinical+dosiomics", "clinical+deep13", "clinical+deep", "all"]
            if any(s in r["auc"] for r in results.values())]
    print("| feature set | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    print("| oracle (generating probability) | " + " | ".join(f"{r['oracle_auc']:.3f}" for r in results.values()) + " |")
    for name in sets:
        cells = []
        for r in results.values():
            value = r["auc"].get(name)
            cells.append(f"{value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]" if value else "")
        print(f"| {name} ({next(r['auc'][name][3] for r in results.values() if name in r['auc'])}) | "
              + " | ".join(cells) + " |")
    for pair in next(iter(results.values()))["paired_deltas"]:
        cells = []
        for r in results.values():
            d = r["paired_deltas"].get(pair)
            cells.append(f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "")
        print(f"| delta {pair} | " + " | ".join(cells) + " |")
    record = {
        "cohort": str(args.cohort), "patients": len(ids), "skipped": json.loads(
            (work / "drivers.skipped.json").read_text()) if (work / "drivers.skipped.json").is_file() else {},
        "model": str(args.model) if args.model else None, "tables": tables, "rules": results,
        "folds": args.folds, "repeats": args.repeats, "bootstrap": args.bootstrap, "strength": args.strength,
        "seed": args.seed, "timing": timing, "elapsed_s": round(time.perf_counter() - started, 1),
        "cpus": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (run_dir / "spatial_outcome.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
