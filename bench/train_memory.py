"""Memory benchmark: training peak RSS on a full-size phantom (512x512x350) against a 128^3 phantom.

For each size, separate processes (so that each peak is its own): generate one phantom patient, build
its cache, then train a few steps with ``--channels full``, 64^3 tiles, batch 2 (the default model).
Prints the peak resident set size (``ru_maxrss``) of the cache build and of the training process;
the last line is ``rss_full_mb=<training, full size> rss_small_mb=<training, 128^3>``.

    .venv/bin/python bench/train_memory.py [--steps 20] [--workdir bench/results/train_memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "DeepDosimetrics"))
from benchlib import peak_rss_mb  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """One measured stage in this process; prints a JSON line with its peak RSS."""
    folder = Path(args.workdir) / args.name
    cohort, cache, model = folder / "cohort", folder / "cache", folder / "model"
    start = time.perf_counter()
    if args.worker == "synth":
        from DeepDosimetricsLib.data.phantoms import synthesize_cohort

        if not cohort.is_dir() or not any(cohort.iterdir()):
            synthesize_cohort(cohort, patients=1, shape=tuple(args.shape), seed=0, quiet=True)
    elif args.worker == "cache":
        from DeepDosimetricsLib.deep.cache.build import ensure_cache
        from DeepDosimetricsLib.deep.cache.store import CacheConfig

        ensure_cache(cohort, CacheConfig(), cache_dir=cache, jobs=1, quiet=True)
    elif args.worker == "train":
        import shutil

        from DeepDosimetricsLib.deep.train.training import make_config, train

        shutil.rmtree(model, ignore_errors=True)
        config = make_config(None, channels="full", tile=64, batch=2, steps=args.steps, val_fraction=0.0,
                             val_tiles=2, steps_per_epoch=args.steps, checkpoint_every=args.steps,
                             log_every=max(1, args.steps // 4), device="cpu", seed=0)
        train(cohort, model, config, cache_dir=cache, quiet=True)
    print(json.dumps({"stage": args.worker, "name": args.name, "peak_rss_mb": peak_rss_mb(),
                      "seconds": time.perf_counter() - start}), flush=True)


def run_stage(stage: str, name: str, shape, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", stage, "--name", name, "--shape", *map(str, shape),
               "--workdir", str(args.workdir), "--steps", str(args.steps)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"stage {stage} for {name} failed ({done.returncode})")
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=HERE / "results" / "train_memory")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--full-shape", type=int, nargs=3, default=[512, 512, 350], metavar=("X", "Y", "Z"))
    parser.add_argument("--small-shape", type=int, nargs=3, default=[128, 128, 128], metavar=("X", "Y", "Z"))
    parser.add_argument("--worker", choices=("synth", "cache", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = {}
    for name, shape in (("small", args.small_shape), ("full", args.full_shape)):
        for stage in ("synth", "cache", "train"):
            record = run_stage(stage, name, shape, args)
            results[(name, stage)] = record
            print(f"{name:>5} {'x'.join(map(str, shape)):>12} {stage:>6}: peak RSS {record['peak_rss_mb']:8.1f} MB "
                  f"({record['seconds']:.0f} s)", flush=True)
    full, small = results[("full", "train")]["peak_rss_mb"], results[("small", "train")]["peak_rss_mb"]
    print(f"training (channels full, 64^3 tiles, batch 2, {args.steps} steps): full-size {full:.0f} MB, "
          f"128^3 {small:.0f} MB, ratio {full / small:.3f} (target <= 2048 MB and <= 1.15)")
    print(f"rss_full_mb={full:.0f} rss_small_mb={small:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
