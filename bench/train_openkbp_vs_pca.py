"""Learning benchmark: the tile autoencoder against PCA with the same number of features per tile.

OpenKBP (../shared/data/openkbp/train): patients split 80/20 (by patient, seeded, as training does);
the autoencoder trains on the 80% within a fixed step budget; PCA with K components is fit on the
first tiles the autoencoder trained on (same sampler, same seed, same augmentation); both reconstruct
the same held-out tiles (no augmentation) and the PSNR per channel (values in [0, 1]) is compared.

    .venv/bin/python bench/train_openkbp_vs_pca.py [--steps 5000] [--tile 32] [--batch 8]

Outputs under bench/results/ (ignored by git): the trained model (openkbp-model/, loadable by
``load_model``), the cache, and openkbp_vs_pca.json. Re-running resumes the training.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "DeepDosimetrics"))


def fit_pca(tiles: np.ndarray, k: int):
    """Mean (D,) and the top-k principal axes (D, k) of tiles (N, D), via the N x N Gram matrix."""
    import torch

    x = torch.from_numpy(tiles)
    mean = x.mean(dim=0)
    x -= mean
    gram = (x @ x.T).double()
    values, vectors = torch.linalg.eigh(gram)
    order = torch.argsort(values, descending=True)[:k]
    values, vectors = values[order].clamp_min(1e-12), vectors[:, order]
    axes = (x.T @ vectors.float()) / values.sqrt().float()  # (D, k), orthonormal columns
    return mean, axes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "openkbp" / "train")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--channels", default="default")
    parser.add_argument("--tile", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 32])
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pca-tiles", type=int, default=1536, help="training tiles PCA is fit on")
    parser.add_argument("--eval-tiles", type=int, default=512, help="held-out tiles both reconstruct")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"skipped: {args.data} is absent")
        return 0

    import torch
    from DeepDosimetricsLib.deep.cache.build import ensure_cache
    from DeepDosimetricsLib.deep.cache.store import CacheConfig
    from DeepDosimetricsLib.deep.channels import channel_labels, parse_channels
    from DeepDosimetricsLib.deep.model import load_model
    from DeepDosimetricsLib.deep.train.sampling import (
        SamplingConfig,
        TileSampler,
        index_patient,
        split_patients,
    )
    from DeepDosimetricsLib.deep.train.training import make_config, train

    args.results.mkdir(parents=True, exist_ok=True)
    model_dir = args.results / "openkbp-model"
    specs = parse_channels(args.channels)
    labels = channel_labels(specs)
    t0 = time.perf_counter()
    cache = ensure_cache(args.data, CacheConfig(), cache_dir=args.results / "openkbp-cache", jobs=1, quiet=False)
    print(f"cache: {len(cache)} patients in {time.perf_counter() - t0:.0f} s", flush=True)

    config = make_config(
        None, channels=args.channels, tile=args.tile, batch=args.batch, widths=args.widths,
        features=args.features, steps=args.steps, lr=args.lr, val_fraction=0.2, val_tiles=64,
        steps_per_epoch=500, checkpoint_every=250, log_every=50, patience=0, skip_incomplete=True,
        seed=args.seed, device="cpu",
    )
    t0 = time.perf_counter()
    result = train(args.data, model_dir, config, resume=True, quiet=False, cache=cache)
    train_s = time.perf_counter() - t0
    run_s = result.history[-1]["elapsed_s"] if result.history else train_s
    print(f"training: {result.steps} steps, {run_s / 60:.1f} min of training (this call {train_s:.0f} s)", flush=True)

    # the same split as training: usable patients, seeded 80/20
    usable = []
    for patient in cache:
        try:
            patient.check_channels(specs)
            usable.append(patient)
        except Exception:
            pass
    train_ids, val_ids = split_patients([p.id for p in usable], 0.2, args.seed)
    by_id = {p.id: p for p in usable}
    sampling = SamplingConfig(tile=args.tile, batch=args.batch, ptv_share=config.ptv_share,
                              body_share=config.body_share, flips=config.flips, jitter=config.jitter)
    train_sampler = TileSampler([by_id[i] for i in train_ids], specs, sampling, seed=args.seed)
    eval_sampler = TileSampler([by_id[i] for i in val_ids], specs, sampling, seed=args.seed,
                               indexes=[index_patient(by_id[i], args.tile) for i in val_ids])

    # PCA on the first training tiles of the autoencoder (steps 0, 1, ... of rank 0)
    t0 = time.perf_counter()
    n_batches = math.ceil(args.pca_tiles / args.batch)
    tiles = np.concatenate([train_sampler.batch(s) for s in range(n_batches)])[: args.pca_tiles]
    tiles = tiles.reshape(len(tiles), -1).astype(np.float32)
    mean, axes = fit_pca(tiles, args.features)
    del tiles
    print(f"PCA: {args.features} components fit on {args.pca_tiles} training tiles in {time.perf_counter() - t0:.0f} s",
          flush=True)

    model, model_config = load_model(model_dir, device="cpu", channels=labels)
    sse_ae = np.zeros(len(labels))
    sse_pca = np.zeros(len(labels))
    voxels = 0
    positions = eval_sampler.fixed_tiles(args.eval_tiles, stream=3)
    with torch.no_grad():
        for first in range(0, len(positions), 16):
            chunk = positions[first : first + 16]
            x = torch.from_numpy(np.stack([eval_sampler.read(p, s, None) for p, s in chunk]))
            ae = model.decode(model.encode(x.contiguous(memory_format=torch.channels_last_3d)))
            flat = x.reshape(len(chunk), -1)
            pca = (((flat - mean) @ axes) @ axes.T + mean).clamp(0, 1).reshape(x.shape)
            sse_ae += ((ae - x) ** 2).sum(dim=(0, 2, 3, 4)).double().numpy()
            sse_pca += ((pca - x) ** 2).sum(dim=(0, 2, 3, 4)).double().numpy()
            voxels += len(chunk) * args.tile**3
    psnr_ae = 10 * np.log10(1.0 / (sse_ae / voxels))
    psnr_pca = 10 * np.log10(1.0 / (sse_pca / voxels))
    rows = []
    print(f"\nheld-out PSNR per channel ({len(val_ids)} patients, {len(positions)} tiles of {args.tile}^3, K={args.features}):")
    print(f"{'channel':<24} {'autoencoder dB':>15} {'PCA dB':>10} {'margin dB':>10}")
    for label, a, p in zip(labels, psnr_ae, psnr_pca):
        rows.append({"channel": label, "psnr_autoencoder_db": float(a), "psnr_pca_db": float(p), "margin_db": float(a - p)})
        print(f"{label:<24} {a:15.2f} {p:10.2f} {a - p:+10.2f}")
    beats = all(r["margin_db"] > 0 for r in rows)
    report = {
        "channels": labels, "tile": args.tile, "batch": args.batch, "features": args.features, "widths": args.widths,
        "steps": result.steps, "training_minutes": run_s / 60, "train_patients": len(train_ids),
        "heldout_patients": len(val_ids), "pca_tiles": args.pca_tiles, "eval_tiles": len(positions),
        "rows": rows, "autoencoder_beats_pca_on_every_channel": beats,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    (args.results / "openkbp_vs_pca.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"autoencoder beats PCA on every channel: {beats}; training {run_s / 60:.1f} min; "
          f"model: {model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
