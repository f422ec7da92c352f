"""Peak RSS of the PCA start's fit alone, at the size of full-channel 64^3 tiles (issue 20 item 3).

One fresh process per version: it imports the library, holds a few synthetic batches of 2 tiles of
7 x 64^3 values, fits the PCA start (K = 10, one subspace iteration: the memory does not depend on the
number of passes or tiles) and reports its peak RSS above the process's base. ``--previous DIR`` (an older
checkout's repository root) runs that version's fit too, side by side.
The last line is ``pca_fit_mb=<ours> previous_pca_fit_mb=<previous or nan>``.

    .venv/bin/python bench/pca_memory.py [--previous /tmp/prev]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(channels: int, tile: int) -> None:
    import resource

    import numpy as np
    from DeepDosimetricsLib.deep.train.pca import fit_pca

    try:  # the training loop's allocator setting, where the version has it
        from DeepDosimetricsLib.runtime.memory import return_freed_memory

        return_freed_memory()
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    held = [rng.random((2, channels * tile**3), dtype=np.float32) for _ in range(4)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fit_pca(lambda: iter(held), 10, iterations=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"base_mb": base, "peak_mb": peak, "fit_mb": peak - base}))


def run(library: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(library))
    done = subprocess.run([sys.executable, __file__, "--worker", "--channels", str(args.channels), "--tile", str(args.tile)],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit("worker failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=7)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--previous", type=Path, default=None, help="an older checkout (repository root)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.channels, args.tile)
        return 0
    ours = run(HERE.parent / "DeepDosimetrics", args)
    print(f"ours: base {ours['base_mb']:.0f} MB, peak {ours['peak_mb']:.0f} MB, fit {ours['fit_mb']:.0f} MB", flush=True)
    previous = {"fit_mb": float("nan")}
    if args.previous:
        previous = run(args.previous / "DeepDosimetrics", args)
        print(f"previous: base {previous['base_mb']:.0f} MB, peak {previous['peak_mb']:.0f} MB, "
              f"fit {previous['fit_mb']:.0f} MB", flush=True)
    print(f"pca_fit_mb={ours['fit_mb']:.0f} previous_pca_fit_mb={previous['fit_mb']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
