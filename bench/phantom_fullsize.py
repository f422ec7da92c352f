"""Time and peak memory (RSS) of generating one full-size phantom patient (512x512x350 by default).

Each patient is generated in a fresh Python process (so ``ru_maxrss`` is that patient's peak), then
written as compressed NRRDs. Prints one line per patient and a JSON summary: seconds to generate and to
write, peak RSS, body fraction (the share of voxels inside the body; the bar is 35-55%), PTV mean dose
and D95, and the size on disk.

    .venv/bin/python bench/phantom_fullsize.py                      # patients 0 (thorax) and 2 (one leg)
    .venv/bin/python bench/phantom_fullsize.py --indices 0 2 5 --shape 256 256 175
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DeepDosimetrics"))
from benchlib import peak_rss_mb  # noqa: E402


def child(index: int, shape, seed: int, out: Path) -> dict:
    """Generate and write one patient in this process; returns its figures."""
    from DeepDosimetricsLib.data.phantoms import PhantomConfig, generate_patient

    import_rss = peak_rss_mb()
    started = time.perf_counter()
    patient = generate_patient(index, PhantomConfig(shape=tuple(shape), seed=seed))
    generated = time.perf_counter()
    folder = patient.write(out / patient.id)
    written = time.perf_counter()
    parameters = patient.parameters
    return {
        "index": index,
        "variant": parameters["variant"],
        "legs": parameters["legs"],
        "shape": list(shape),
        "spacing_mm": parameters["geometry"]["spacing"],
        "generate_s": round(generated - started, 2),
        "write_s": round(written - generated, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "import_rss_mb": round(import_rss, 1),
        "body_fraction": round(parameters["body"]["fraction"], 4),
        "ptv_mean_gy": round(parameters["dose_metrics"]["PTV"]["mean_gy"], 2),
        "ptv_d95_gy": round(parameters["dose_metrics"]["PTV"]["D95_gy"], 2),
        "prescription_gy": parameters["plan"]["prescription_gy"],
        "disk_mb": round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 350], metavar=("X", "Y", "Z"))
    parser.add_argument(
        "--indices", type=int, nargs="+", default=[0, 2], help="patient indices (default 0 2)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", metavar="DIR", help="write the patients here (default: a temporary folder)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.shape, args.seed, Path(args.out))))
        return 0
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="phantom-fullsize-"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for index in args.indices:
            command = [
                sys.executable,
                __file__,
                "--child",
                str(index),
                "--out",
                str(out),
                "--seed",
                str(args.seed),
            ]
            command += ["--shape", *map(str, args.shape)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            print(
                f"patient {index} ({result['variant']}, legs {result['legs']}) {tuple(args.shape)}: "
                f"generate {result['generate_s']} s, write {result['write_s']} s, "
                f"peak RSS {result['peak_rss_mb']} MiB (after import {result['import_rss_mb']}), "
                f"body_fraction {result['body_fraction']}, PTV mean {result['ptv_mean_gy']} Gy "
                f"D95 {result['ptv_d95_gy']} Gy (Rx {result['prescription_gy']}), {result['disk_mb']} MiB on disk",
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"benchmark": "phantom_fullsize", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
