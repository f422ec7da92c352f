"""Reconstruction fidelity on OpenKBP: the tile autoencoder against PCA at the same code size (issue 13).

Trains within a time budget on ``--train`` (with ``--test`` omitted, 20% of its patients are held out by
patient and never seen by training), then encodes and reconstructs every test patient through the
project's own ``encode`` path (``encode_cohort`` with ``reconstruct``: metrics.csv per patient). PCA with
the same K per tile, fit on training tiles drawn by the training sampler, reconstructs the same patients
through the same tile grid, Gaussian stitching and metrics (``encode_patient`` with a PCA runner,
``write_reconstruction``). Medians over the test patients:

    .venv/bin/python bench/fidelity_openkbp.py --train ../shared/data/openkbp/train --budget-minutes 30 \\
        [--test DIR] [--tile 32] [--features 10] [--config recipe.yaml]

Last line: ``psnr_margin_db_min=<min over channels of AE minus PCA> dice_median=<PTV>
dmean_err_median_gy=<|error|> d95_err_median_gy=<|error|> minutes=<training minutes>``.
Outputs under ``--workdir`` (default bench/results/fidelity-t<T>-k<K>): model/, encode/, fidelity.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "DeepDosimetrics"))


class Subset(list):
    """A list of cached patients that ``train(cache=...)`` accepts as its cache."""

    failed: dict = {}


class PcaRunner:
    """PCA with K components per tile behind the interface ``encode_patient`` expects of a model."""

    def __init__(self, mean: np.ndarray, axes: np.ndarray, tile: int, channels: list[str]) -> None:
        from types import SimpleNamespace

        self.mean, self.axes = mean.astype(np.float32), axes.astype(np.float32)  # (D,), (D, K)
        self.config = SimpleNamespace(tile=tile, features=axes.shape[1], channels=channels)

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        flat = tiles.reshape(len(tiles), -1).astype(np.float32) - self.mean
        return flat @ self.axes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        t, c = self.config.tile, len(self.config.channels)
        values = np.clip(codes @ self.axes.T + self.mean, 0.0, 1.0)
        return values.reshape(len(codes), c, t, t, t).astype(np.float32)

    def decode_channels_last(self, codes: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(self.decode(codes), 1, -1))


def read_history(model_dir: Path) -> list[dict]:
    """A model folder's loss_history.csv as rows (numbers, None for empty cells); [] when absent."""
    import csv

    path = Path(model_dir) / "loss_history.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(handle)]


def usable_patients(cache, specs) -> list:
    out = []
    for patient in cache:
        try:
            patient.check_channels(specs)
            out.append(patient)
        except Exception:
            pass
    return out


def metric(frame, channel: str, name: str) -> dict[str, float]:
    rows = frame[(frame["channel"] == channel) & (frame["metric"] == name)]
    return dict(zip(rows["patient"], rows["value"].astype(float)))


def pca_metrics(runner: PcaRunner, cache, ids, specs, overlap: float, batch: int) -> list[dict]:
    """Metric rows of PCA reconstructions, computed as ``encode --reconstruct`` computes them."""
    from DeepDosimetricsLib.deep.encode.encoder import encode_patient
    from DeepDosimetricsLib.deep.encode.reconstruction import (
        ReconstructionOptions,
        air_values,
        write_reconstruction,
    )
    from DeepDosimetricsLib.deep.tiling import ArraySink

    rows = []
    for pid in ids:
        cp = cache[pid]
        sink = ArraySink(cp.shape, len(specs))
        encode_patient(runner, cp, specs, overlap, batch, sink, air_values(cp, specs), structure_tiles=False)
        with tempfile.TemporaryDirectory() as folder:
            rows += write_reconstruction(cp, specs, sink.array.__getitem__, Path(folder),
                                         ReconstructionOptions(residuals=False))
    return rows


def body_litres(cp) -> float:
    from DeepDosimetricsLib.deep.encode.reconstruction import read_mask

    spacing = np.asarray(cp.geometry.spacing, float)
    return float(read_mask(cp, "BODY").sum()) * float(np.prod(spacing)) / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=REPO.parent / "shared" / "data" / "openkbp" / "train")
    parser.add_argument("--test", type=Path, default=None, help="test cohort (default: 20%% of --train by patient)")
    parser.add_argument("--model", default=None,
                        help="evaluate this model (a folder or a shipped model's name) without training; its tile, K "
                        "and channels replace --tile/--features/--channels, and its training patients are never tested")
    parser.add_argument("--budget-minutes", type=float, default=30.0)
    parser.add_argument("--tile", type=int, default=32)
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--channels", default="default")
    parser.add_argument("--config", type=Path, default=None, help="training recipe (default: the library's)")
    parser.add_argument("--pca-start", action=argparse.BooleanOptionalAction, default=None,
                        help="train the residual autoencoder that starts at PCA (default: the recipe's)")
    parser.add_argument("--val-fraction", type=float, default=None, help="training's validation share (default: the recipe's)")
    parser.add_argument("--val-tiles", type=int, default=None, help="fixed validation tiles (default: the recipe's)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: the recipe's)")
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    parser.add_argument("--sampler", choices=("auto", "device", "host"), default=None,
                        help="where training tiles are cut (default: the recipe's)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=None, help="cache of --train (default under --workdir/..)")
    parser.add_argument("--test-cache", type=Path, default=None)
    parser.add_argument("--max-train", type=int, default=None, help="use at most N training patients (quick runs)")
    parser.add_argument("--max-test", type=int, default=None, help="evaluate at most N test patients (quick runs)")
    parser.add_argument("--pca-tiles", type=int, default=1536)
    parser.add_argument("--encode-batch", type=int, default=16)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="delete an earlier model/encoding in --workdir")
    args = parser.parse_args(argv)
    if not args.train.is_dir():
        print(f"skipped: {args.train} is absent")
        return 0

    import pandas as pd
    from DeepDosimetricsLib.deep.cache.build import ensure_cache
    from DeepDosimetricsLib.deep.cache.store import CacheConfig
    from DeepDosimetricsLib.deep.channels import channel_labels, parse_channels
    from DeepDosimetricsLib.deep.encode.job import EncodeSettings, encode_cohort
    from DeepDosimetricsLib.deep.train.pca import fit_pca
    from DeepDosimetricsLib.deep.train.sampling import SamplingConfig, TileSampler, split_patients
    from DeepDosimetricsLib.deep.train.training import make_config, train

    trained = None
    if args.model:  # an existing model: its configuration decides the tile grid, K and channels
        from DeepDosimetricsLib.deep.model import read_model_json
        from DeepDosimetricsLib.deep.shipped import resolve_model

        model_dir = resolve_model(args.model)
        trained = read_model_json(model_dir)
        args.tile, args.features = int(trained["config"]["tile"]), int(trained["config"]["features"])
        args.channels = ",".join(trained["config"]["channels"])
    work = args.workdir or HERE / "results" / f"fidelity-t{args.tile}-k{args.features}"
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    specs = parse_channels(args.channels)
    labels = channel_labels(specs)
    cache_dir = args.cache or HERE / "results" / "openkbp-cache"
    t0 = time.perf_counter()
    cache = ensure_cache(args.train, CacheConfig(), cache_dir=cache_dir, jobs=1, quiet=True)
    usable = usable_patients(cache, specs)
    if args.test is None:
        train_ids, test_ids = split_patients([p.id for p in usable], 0.2, args.seed)
        test_cohort, test_cache_dir, test_cache = args.train, cache_dir, cache
    else:
        train_ids, test_ids = sorted(p.id for p in usable), None
        test_cohort = args.test
        test_cache_dir = args.test_cache or HERE / "results" / f"cache-{args.test.name}"
        test_cache = ensure_cache(args.test, CacheConfig(), cache_dir=test_cache_dir, jobs=1, quiet=True)
        test_ids = sorted(p.id for p in usable_patients(test_cache, specs))
    if trained is not None:  # never test a patient the model was trained or validated on
        seen = set((trained.get("training") or {}).get("train_patients", [])) | set(
            (trained.get("training") or {}).get("val_patients", []))
        if args.test is None or args.test.resolve() == args.train.resolve():
            test_ids = [i for i in test_ids if i not in seen]
    if args.max_train:
        train_ids = train_ids[: args.max_train]
    if args.max_test:
        test_ids = test_ids[: args.max_test]
    print(f"cache ready in {time.perf_counter() - t0:.0f} s: {len(train_ids)} training patients, "
          f"{len(test_ids)} test patients", flush=True)

    # ---------------------------------------------------------------- training within the budget
    by_id = {p.id: p for p in usable}
    overrides = dict(channels=args.channels, tile=args.tile, features=args.features, batch=args.batch,
                     widths=args.widths, budget_minutes=args.budget_minutes, steps=10**7, device=args.device,
                     seed=args.seed, skip_incomplete=True, patience=0, log_every=50, pca_start=args.pca_start,
                     val_fraction=args.val_fraction, val_tiles=args.val_tiles,
                     sampler=args.sampler)
    if args.compile:
        overrides["compile"] = True
    config = make_config(args.config, **overrides)
    load = os.getloadavg()
    if trained is None:
        model_dir = work / "model"
        t0 = time.perf_counter()
        result = train(args.train, model_dir, config, resume=True, quiet=True,
                       cache=Subset(by_id[i] for i in train_ids))
        history, steps = result.history, result.steps
        minutes = (history[-1]["elapsed_s"] if history else time.perf_counter() - t0) / 60
        print(f"training: {steps} steps in {minutes:.1f} min "
              f"({np.median([r['voxels_per_s'] for r in history if r.get('voxels_per_s')]) / 1e6:.2f} M voxels/s; "
              f"best validation loss {result.best_val_loss}); load average {os.getloadavg()[0]:.1f}", flush=True)
    else:  # the run that made the model, as its folder records it
        summary = trained.get("training") or {}
        history = read_history(model_dir)
        run = summary.get("run") or summary
        steps = int(run.get("steps", 0))
        minutes = (history[-1]["elapsed_s"] if history else float(run.get("training_seconds", "nan"))) / 60
        print(f"model {args.model}: {steps} training steps, {minutes:.1f} min", flush=True)
    load = [max(a, b) for a, b in zip(load, os.getloadavg())]
    speeds = [r["voxels_per_s"] for r in history if r.get("voxels_per_s")]
    speed = float(np.median(speeds)) if speeds else float("nan")

    # ---------------------------------------------------------------- the autoencoder through `encode`
    t0 = time.perf_counter()
    encode_dir = work / "encode"
    settings = EncodeSettings(reconstruct=True, residuals=False, patients=list(test_ids), device=args.device,
                              batch=args.encode_batch, overlap=args.overlap, quiet=True, progress_json=False)
    encoded = encode_cohort(model_dir, test_cohort, encode_dir, test_cache_dir, settings, overwrite=True)
    ae = pd.read_csv(encode_dir / "metrics.csv")
    tiles = pd.read_csv(encode_dir / "tiles.csv")
    print(f"encode --reconstruct: {len(encoded.done)} patients in {time.perf_counter() - t0:.0f} s", flush=True)

    # ---------------------------------------------------------------- PCA, same K, same grid and metrics
    t0 = time.perf_counter()
    sampling = SamplingConfig(tile=args.tile, batch=32, ptv_share=config.ptv_share, body_share=config.body_share,
                              flips=config.flips, jitter=config.jitter)
    sampler = TileSampler([by_id[i] for i in train_ids], specs, sampling, seed=args.seed)
    tiles_train = np.concatenate([sampler.batch(s) for s in range(-(-args.pca_tiles // 32))])[: args.pca_tiles]
    # the library's PCA, with more subspace iterations than training's start
    basis = fit_pca(functools.partial(iter, [tiles_train]), args.features, seed=args.seed, iterations=8)
    runner = PcaRunner(basis.mean, basis.axes, args.tile, labels)
    del tiles_train
    pca = pd.DataFrame(pca_metrics(runner, test_cache, encoded.done, specs, args.overlap, args.encode_batch))
    print(f"PCA: fit on {args.pca_tiles} training tiles and reconstructed in {time.perf_counter() - t0:.0f} s",
          flush=True)

    # ---------------------------------------------------------------- summary
    rows, margins = [], []
    for label in labels:
        a, p = metric(ae, label, "psnr"), metric(pca, label, "psnr")
        common = sorted(set(a) & set(p))
        margin = float(np.median([a[i] - p[i] for i in common]))
        margins.append(margin)
        rows.append({"channel": label, "psnr_ae_db": float(np.median([a[i] for i in common])),
                     "psnr_pca_db": float(np.median([p[i] for i in common])), "margin_db": margin})
    ptv, dose = "mask:PTV", next((s.label for s in specs if s.kind == "dose"), None)

    def med(frame, channel, name):
        values = list(metric(frame, channel, name).values()) if channel else []
        return float(np.nanmedian(values)) if values else float("nan")

    quality = {
        which: {"dice": med(frame, ptv, "dice"), "dmean_abs_err_gy": med(frame, dose, "Dmean_abs_error_gy"),
                "d95_abs_err_gy": med(frame, dose, "D95_abs_error_gy"),
                "dmean_err_gy": med(frame, dose, "Dmean_error_gy"), "d95_err_gy": med(frame, dose, "D95_error_gy")}
        for which, frame in (("ae", ae), ("pca", pca))
    }
    per_patient_tiles = tiles.groupby("patient").size()
    litres = {pid: body_litres(test_cache[pid]) for pid in encoded.done}
    features_per_litre = float(np.median([per_patient_tiles[p] * args.features / litres[p] for p in encoded.done]))
    report = {
        "train": str(args.train), "test": str(args.test or "20% of --train"), "tile": args.tile,
        "features": args.features, "channels": labels, "budget_minutes": args.budget_minutes,
        "model": str(args.model or model_dir), "training_minutes": minutes, "steps": steps, "voxels_per_s": speed,
        "train_patients": len(train_ids), "test_patients": len(encoded.done), "load_average_max": load,
        "recipe": config.to_dict(), "psnr": rows, "quality": quality, "features_per_litre": features_per_litre,
        "pca_tiles": args.pca_tiles,
    }
    (work / "fidelity.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n{len(encoded.done)} test patients, tile {args.tile}, K={args.features}, "
          f"{features_per_litre:.0f} features per litre of body (median)")
    print(f"{'channel':<22} {'AE PSNR':>9} {'PCA PSNR':>9} {'margin':>8}")
    for row in rows:
        print(f"{row['channel']:<22} {row['psnr_ae_db']:9.2f} {row['psnr_pca_db']:9.2f} {row['margin_db']:+8.2f}")
    for which in ("ae", "pca"):
        q = quality[which]
        print(f"{which.upper():<4} PTV Dice {q['dice']:.3f}  Dmean err {q['dmean_err_gy']:+.2f} Gy "
              f"(|median| {q['dmean_abs_err_gy']:.2f})  D95 err {q['d95_err_gy']:+.2f} Gy "
              f"(|median| {q['d95_abs_err_gy']:.2f})")
    q = quality["ae"]
    print(f"psnr_margin_db_min={min(margins):.2f} dice_median={q['dice']:.3f} "
          f"dmean_err_median_gy={q['dmean_abs_err_gy']:.2f} d95_err_median_gy={q['d95_abs_err_gy']:.2f} "
          f"minutes={minutes:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
