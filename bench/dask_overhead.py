"""Dask overhead against --jobs: the same cohort table in-process, with 2 local processes, and on Dask.

One cohort of phantom patients, one table (`radiomics` with the firstorder preset on the CT, and `dvh`),
timed as the command runs it (the pool's start-up included):

- ``jobs1``: in this process;
- ``jobs2``: ``--jobs 2`` (a forked process pool);
- ``dask_local2``: ``--scheduler local:2`` (the command starts and closes a LocalCluster of 2 workers);
- ``dask_running2``: ``--scheduler ADDRESS`` of a LocalCluster of 2 workers already running (what a
  cluster costs per job once it is up: task submission, pickling, result transfer).

Each table is checked equal to ``jobs1``. A CPU loop before and after tells how much of 2 cores was free
(2.0 on an idle machine). Run once, small:

    OMP_NUM_THREADS=1 .venv/bin/python bench/dask_overhead.py [--patients 8] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "DeepDosimetrics"))
sys.path.insert(0, str(HERE))


def _burn(count: int) -> int:
    total = 0
    for value in range(count):
        total += value * value
    return total


def machine_speedup(count: int = 10_000_000) -> float:
    """The speed-up 2 processes get on a pure CPU loop right now (2.0 on 2 idle cores)."""
    import multiprocessing

    start = time.perf_counter()
    _burn(count)
    _burn(count)
    serial = time.perf_counter() - start
    with multiprocessing.get_context("fork").Pool(2) as pool:
        start = time.perf_counter()
        pool.map(_burn, [count, count])
        parallel = time.perf_counter() - start
    return serial / parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    import pandas as pd
    from DeepDosimetricsLib.data.phantoms import synthesize_cohort
    from DeepDosimetricsLib.features.dosimetrics import cohort_dvh
    from DeepDosimetricsLib.features.radiomics import cohort_radiomics
    from DeepDosimetricsLib.runtime.pools import PoolSpec
    from distributed import Client, LocalCluster

    tables = {
        "radiomics_firstorder_ct": lambda cohort, pool: cohort_radiomics(cohort, "ct", "firstorder", None, pool, True),
        "dvh": lambda cohort, pool: cohort_dvh(cohort, jobs=pool, quiet=True).metrics,
    }
    results: dict = {"calibration_before": round(machine_speedup(), 2)}
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as work:
        cohort = synthesize_cohort(Path(work) / "cohort", patients=args.patients, shape=(64, 64, 48), seed=0)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            client.wait_for_workers(2)
            pools = {"jobs1": PoolSpec(jobs=1), "jobs2": PoolSpec(jobs=2),
                     "dask_local2": PoolSpec(scheduler="local:2"),
                     "dask_running2": PoolSpec(scheduler=cluster.scheduler_address)}
            for name, compute in tables.items():
                times = {key: [] for key in pools}
                reference = None
                for _ in range(args.repeats):
                    for key, pool in pools.items():
                        start = time.perf_counter()
                        table = compute(cohort, pool)
                        times[key].append(time.perf_counter() - start)
                        if reference is None:
                            reference = table
                        else:
                            pd.testing.assert_frame_equal(table, reference)
                medians = {key: statistics.median(values) for key, values in times.items()}
                results[name] = {
                    "patients": args.patients,
                    "items": int(reference[["patient", "structure"]].drop_duplicates().shape[0]),
                    "seconds": {key: round(value, 2) for key, value in medians.items()},
                    "vs_jobs2": {key: round(value / medians["jobs2"], 2) for key, value in medians.items()},
                    "identical_tables": True,
                }
    results["calibration_after"] = round(machine_speedup(), 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
