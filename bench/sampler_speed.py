"""Tile sampling throughput: the host sampler (memory-mapped cache, numpy) against the resident sampler
(cache held in device memory, batches cut by tensor operations), on the same patients, seed and steps.

    .venv/bin/python bench/sampler_speed.py --cache bench/results/openkbp-cache [--device cpu|cuda]
        [--tile 32] [--batch 64] [--steps 20] [--patients 40]

Prints M voxels/s of each (sampling alone, no model), the resident copy's size and the largest difference
between the two samplers' batches. On a GPU machine, set it beside the bare training step of
bench/train_speed.py (bench/gpu_suite.sh runs both end to end through bench/fidelity_openkbp.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "DeepDosimetrics"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=HERE / "results" / "openkbp-cache")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels", default="default")
    parser.add_argument("--tile", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--patients", type=int, default=40)
    args = parser.parse_args(argv)
    if not args.cache.is_dir():
        print(f"skipped: no cache at {args.cache} (build one with `deepdosimetrics cache`)")
        return 0
    import numpy as np
    import torch
    from DeepDosimetricsLib.deep.cache.store import open_cache
    from DeepDosimetricsLib.deep.channels import parse_channels
    from DeepDosimetricsLib.deep.train.resident import ResidentTileSampler, resident_bytes
    from DeepDosimetricsLib.deep.train.sampling import SamplingConfig, TileSampler

    specs = parse_channels(args.channels)
    cache = open_cache(args.cache)
    patients = [p for p in cache if p.has_dose][: args.patients]
    config = SamplingConfig(tile=args.tile, batch=args.batch, ptv_share=0.4, edge_share=0.15, body_share=0.5)
    host = TileSampler(patients, specs, config, seed=0)
    started = time.perf_counter()
    resident = ResidentTileSampler(host, args.device)
    load_s = time.perf_counter() - started
    voxels = args.batch * args.tile**3 * args.steps

    def timed(draw) -> float:
        draw(10_000)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for step in range(args.steps):
            draw(step)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return voxels / (time.perf_counter() - start) / 1e6

    host_speed = timed(host.batch)
    resident_speed = timed(resident.batch)
    difference = max(float(np.abs(resident.batch(s).cpu().numpy() - host.batch(s)).max()) for s in range(3))
    print(f"{len(patients)} patients, tile {args.tile}, batch {args.batch}, {args.steps} steps, device {args.device}, "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"resident copy: {resident_bytes(host) / 2**20:.0f} MB, loaded in {load_s:.1f} s")
    print(f"host sampler:     {host_speed:8.2f} M voxels/s")
    print(f"resident sampler: {resident_speed:8.2f} M voxels/s ({resident_speed / host_speed:.1f}x)")
    print(f"largest difference between their batches: {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
