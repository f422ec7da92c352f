"""Start-to-finish wall time of a local federation (issue 19 target: 3 phantom sites, 2 rounds, under 2
minutes on 2 cores): `deepdosimetrics federated local` as one command (SuperLink, three site processes,
the run, every process stopped), on phantom sites from `synth --sites 3` split by their `site` column.

    .venv/bin/python bench/federated_startup.py [--patients 9] [--rounds 2] [--local-steps 5] [--work DIR]

The phantoms are written (and their caches built) before the clock starts only with --warm-cache; by default
the time includes each site building its cache in the first round, as a first federation would. Prints the
wall time, the rounds' own seconds (rounds.csv), the load average before and after (the machine may be
shared), and a JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIB = HERE.parent / "DeepDosimetrics"
sys.path.insert(0, str(LIB))

RECIPE = {"channels": "default", "tile": 32, "batch": 2, "features": 8, "widths": [8, 16], "groups": 4,
          "val_fraction": 0.34, "val_tiles": 4, "num_workers": 0, "pca_start": False}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "DeepDosimetricsLib.cli", *args]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=9)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 48])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--warm-cache", action="store_true", help="build the sites' caches before the clock starts")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="federated-bench-"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(LIB), os.environ.get("PYTHONPATH", "")]))
    try:
        cohort = work / "phantoms"
        if not cohort.exists():
            subprocess.run(cli("synth", "--out", str(cohort), "--patients", str(args.patients), "--shape",
                               *map(str, args.shape), "--sites", "3", "--quiet"), check=True, env=env)
        rows = list(csv.DictReader(open(cohort / "clinical.csv", newline="")))
        names = sorted({r["site"] for r in rows})
        if len(names) < 3:  # a small cohort may draw fewer sites: deal the patients round-robin instead
            names = ["site_A", "site_B", "site_C"]
            for index, row in enumerate(rows):
                row["site"] = names[index % 3]
        sites = {}
        for row in rows:
            folder = work / "sites" / row["site"]
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / row["patient"]).exists():
                shutil.copytree(cohort / row["patient"], folder / row["patient"])
            sites[row["site"]] = folder
        recipe = work / "recipe.json"
        recipe.write_text(json.dumps(RECIPE))
        caches = work / "caches"
        if args.warm_cache:
            for name, folder in sites.items():
                subprocess.run(cli("cache", "--cohort", str(folder), "--cache", str(caches / name), "--quiet"),
                               check=True, env=env)
        out = work / "model"
        shutil.rmtree(out, ignore_errors=True)
        command = cli("federated", "local", "--out", str(out), "--rounds", str(args.rounds), "--local-steps",
                      str(args.local_steps), "--config", str(recipe), "--cache-root", str(caches),
                      *[f"--site={name}={folder}" for name, folder in sites.items()])
        load_before = os.getloadavg()
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        load_after = os.getloadavg()
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            return 1
        rounds = list(csv.DictReader(open(out / "rounds.csv", newline="")))
        result = {"sites": len(sites), "patients": len(rows), "rounds": args.rounds, "local_steps": args.local_steps,
                  "wall_s": round(wall, 1), "round_s": [float(r["seconds"]) for r in rounds],
                  "warm_cache": args.warm_cache, "cpus": os.cpu_count(),
                  "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after]}
        print(f"federation of {len(sites)} sites, {args.rounds} rounds: {wall:.1f} s start to finish "
              f"(rounds {', '.join(f'{s:.1f}' for s in result['round_s'])} s; load {load_before[0]:.1f} -> "
              f"{load_after[0]:.1f} on {os.cpu_count()} cores)")
        print(json.dumps(result))
        return 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
