"""Time and peak memory of reading one 96^3 tile of the 7 ``full`` channels from the cache.

Issue 4's bar: reading a tile costs O(tile), so the time per tile and the process's peak RSS are flat
(within 15%) between a 128^3 phantom and a 512x512x350 phantom. Each phantom's cache is built once,
then ``--reads`` tiles at random positions are read in a fresh process per phantom, ``--rounds``
processes per phantom alternating (a busy spell of a shared machine then hits both): the median and
10th percentile of the pooled times, and the processes' peak RSS (``ru_maxrss``).

    .venv/bin/python bench/read_tile.py                                  # 128^3 and 512x512x350
    .venv/bin/python bench/read_tile.py --shapes 128 128 128 256 256 200 --work /tmp/dd-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import peak_rss_mb, run_script  # noqa: E402
from cache_memory import make_phantom_cohort  # noqa: E402

TOLERANCE = 0.15


def child_read(cache_dir: Path, tile: int, reads: int, channels: str, seed: int) -> dict:
    """Read ``reads`` tiles at random positions of the cached patient; time each one."""
    import numpy as np
    from DeepDosimetricsLib.deep.cache.store import open_cache
    from DeepDosimetricsLib.deep.channels import parse_channels

    cache = open_cache(cache_dir)
    patient = cache[cache.ids[0]]
    specs = parse_channels(channels)
    rss_before = peak_rss_mb()
    rng = np.random.default_rng(seed)
    highest = [max(0, n - tile) for n in patient.shape]
    starts = [tuple(int(rng.integers(0, h + 1)) for h in highest) for _ in range(reads + 2)]
    for start in starts[:2]:  # warm-up (first page-in of the files, allocator)
        patient.read_tile(specs, start, (tile, tile, tile))
    times = []
    for start in starts[2:]:
        began = time.perf_counter()
        values = patient.read_tile(specs, start, (tile, tile, tile))
        times.append(time.perf_counter() - began)
    return {
        "times_ms": [t * 1000 for t in times],
        "median_ms": statistics.median(times) * 1000,
        "min_ms": min(times) * 1000,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_reads_mb": rss_before,
        "cache_shape_zyx": list(patient.shape),
        "tile_shape": list(values.shape),
        "tile_mb": values.nbytes / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=int, default=[128, 128, 128, 512, 512, 350],
                        help="phantom shapes, three numbers (x y z) each")
    parser.add_argument("--tile", type=int, default=96)
    parser.add_argument("--reads", type=int, default=60, help="timed tile reads per phantom")
    parser.add_argument("--channels", default="full")
    parser.add_argument("--work", type=Path, default=None, help="work folder (kept; default: a temporary one)")
    parser.add_argument("--child-read", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per phantom, alternating")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    if args.child_read:
        print(json.dumps(child_read(Path(args.child_read), args.tile, args.reads, args.channels, args.seed)))
        return 0
    if len(args.shapes) % 3:
        parser.error("--shapes takes three numbers per phantom")
    shapes = [args.shapes[i:i + 3] for i in range(0, len(args.shapes), 3)]

    from cache_memory import run_child as run_cache_child

    work = args.work or Path(tempfile.mkdtemp(prefix="dd-bench-tile-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        caches = []
        for shape in shapes:
            cohort = make_phantom_cohort(work, shape)
            cache = work / f"cache-{'x'.join(map(str, shape))}"
            if not (cache / "cohort.json").exists():
                run_cache_child("--child-build", str(cohort), str(cache))
            caches.append(cache)
        rounds: list = [[] for _ in shapes]
        load_before = os.getloadavg()[0]
        for _ in range(args.rounds):  # phantoms alternate, so a busy spell of a shared machine hits both
            for index, cache in enumerate(caches):
                rounds[index].append(run_script(__file__,
                    "--child-read", str(cache), "--tile", str(args.tile), "--reads", str(args.reads),
                    "--channels", args.channels, "--seed", str(args.seed)))
        for shape, runs in zip(shapes, rounds):
            pooled = sorted(t for run in runs for t in run["times_ms"])
            results.append({
                "shape": shape, "cache_shape_zyx": runs[0]["cache_shape_zyx"],
                "median_ms": statistics.median(pooled), "p10_ms": pooled[len(pooled) // 10],
                "round_medians_ms": [round(run["median_ms"], 2) for run in runs],
                "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
                "rss_before_reads_mb": max(run["rss_before_reads_mb"] for run in runs),
            })
        print(f"one {args.tile}^3 tile of channels '{args.channels}' read from the cache: {args.reads} random tiles "
              f"per process, {args.rounds} fresh processes per phantom (alternating); "
              f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
        for result in results:
            print(f"  phantom {'x'.join(map(str, result['shape'])):>12} (cache z,y,x {result['cache_shape_zyx']}): "
                  f"median {result['median_ms']:5.1f} ms per tile (10th percentile {result['p10_ms']:.1f} ms; "
                  f"per process {result['round_medians_ms']}), peak RSS {result['peak_rss_mb']:4.0f} MiB "
                  f"(before reading {result['rss_before_reads_mb']:.0f} MiB)")
        if len(results) >= 2:
            first, last = results[0], results[-1]
            ratios = {
                "time (median)": last["median_ms"] / first["median_ms"],
                "time (10th percentile)": last["p10_ms"] / first["p10_ms"],
                "peak RSS": last["peak_rss_mb"] / first["peak_rss_mb"],
            }
            for what, ratio in ratios.items():
                verdict = "flat" if abs(ratio - 1) <= TOLERANCE else "NOT flat"
                print(f"  largest/smallest {what}: x{ratio:.2f} -> {verdict} within {TOLERANCE:.0%}")
        print(json.dumps(results))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
