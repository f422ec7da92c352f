"""Cohorts on a cluster: a real Dask LocalCluster of 2 worker processes gives the tables of --jobs 1, also
when a worker is killed mid-run; `encode` under torchrun (2 CPU ranks, gloo) gives one process's features.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from DeepDosimetricsLib.cli import main
from DeepDosimetricsLib.runtime.errors import InputError
from DeepDosimetricsLib.runtime.pools import PoolSpec, parse_scheduler, run_tasks

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 single-threaded worker processes (each restarted by its nanny if it dies)."""
    import logging

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as local:
        with Client(local) as client:
            client.wait_for_workers(2, timeout=60)
        yield local.scheduler_address


def _square(value: int) -> int:
    return value * value


def test_scheduler_option_is_checked():
    assert parse_scheduler("local:3") == ("local", 3)
    assert parse_scheduler("tcp://node01:8786") == ("address", "tcp://node01:8786")
    assert parse_scheduler("/shared/scheduler.json") == ("file", "/shared/scheduler.json")
    for bad in ("local:x", "local:0", " "):
        with pytest.raises(InputError, match="--scheduler"):
            PoolSpec(scheduler=bad)
    with pytest.raises(InputError, match="--jobs"):
        PoolSpec(jobs=0)
    assert main(["dvh", "--cohort", "x", "--scheduler", "local:0", "--out", "x.csv"]) == 2


def test_local_processes_keep_the_order():
    assert run_tasks(_square, [(v,) for v in range(7)], PoolSpec(jobs=2)) == [v * v for v in range(7)]


def test_tables_on_a_dask_cluster_equal_jobs_1(cluster, phantom_cohort, tmp_path):
    for command in (["radiomics", "--preset", "firstorder", "--structures", "PTV,Heart,SpinalCord"], ["dvh"]):
        serial, dask = tmp_path / f"{command[0]}-1.csv", tmp_path / f"{command[0]}-dask.csv"
        assert main([*command, "--cohort", str(phantom_cohort), "--quiet", "--jobs", "1",
                     "--out", str(serial)]) == 0
        assert main([*command, "--cohort", str(phantom_cohort), "--quiet", "--scheduler", cluster,
                     "--out", str(dask)]) == 0
        assert dask.read_bytes() == serial.read_bytes(), command[0]


def _killing_item(item, patient, original, marker, **options):
    """The DVH of one item, except that the first task to run kills its own worker process (SIGKILL)."""
    try:
        descriptor = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return original(item, patient, **options)
    os.write(descriptor, str(os.getpid()).encode())
    os.close(descriptor)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_mid_run_leaves_the_tables_unchanged(cluster, phantom_cohort, tmp_path, monkeypatch):
    import cloudpickle
    import DeepDosimetricsLib.features.dosimetrics as dosimetrics

    expected = dosimetrics.cohort_dvh(phantom_cohort, jobs=1, quiet=True).metrics
    marker = tmp_path / "killed"
    # the killer travels by value (the workers cannot import this test module)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        killer = functools.partial(_killing_item, original=dosimetrics._dvh_item, marker=str(marker))
        monkeypatch.setattr(dosimetrics, "_dvh_item", killer)
        table = dosimetrics.cohort_dvh(phantom_cohort, jobs=PoolSpec(scheduler=cluster, retries=2),
                                       quiet=True).metrics
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert marker.is_file() and int(marker.read_text()) != os.getpid()  # a worker died, not this process
    pd.testing.assert_frame_equal(table, expected)


@pytest.mark.slow
def test_cache_on_a_local_cluster_equals_one_process(phantom_subset, tmp_path):
    """`cache --scheduler local:2` starts its own cluster; the arrays equal an in-process build."""
    cohort = phantom_subset(tmp_path / "cohort", 2)
    for name, options in (("serial", ["--jobs", "1"]), ("dask", ["--scheduler", "local:2"])):
        assert main(["cache", "--cohort", str(cohort), "--cache", str(tmp_path / name), "--quiet",
                     *options]) == 0
    for array in sorted((tmp_path / "serial").glob("*/*.npy")):
        other = tmp_path / "dask" / array.relative_to(tmp_path / "serial")
        assert np.array_equal(np.load(array), np.load(other)), array


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_encode_splits_patients_and_equals_one_process(phantom_subset, tiny_model, tmp_path):
    """2 CPU ranks (gloo) on 3 patients (rank 0: two, rank 1: one) write the features of one process."""
    import torch

    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    from DeepDosimetricsLib.deep.cache.build import ensure_cache

    cohort = phantom_subset(tmp_path / "cohort", 3)
    model = tiny_model(tmp_path / "model")
    ensure_cache(cohort, cache_dir=tmp_path / "cache1")
    common = ["--model", str(model), "--cohort", str(cohort), "--quiet", "--device", "cpu"]
    assert main(["encode", *common, "--out", str(tmp_path / "one"), "--cache", str(tmp_path / "cache1")]) == 0
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(_free_port()), "-m", "DeepDosimetricsLib.cli", "encode", *common, "--out", str(tmp_path / "two"),
         "--cache", str(tmp_path / "cache2")],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [line for line in run.stdout.splitlines() if '"rank": ' in line]
    assert {'"rank": 0' in line for line in ranks} == {True, False}  # both ranks encoded patients
    assert run.stdout.count("encoded: 3 patient(s)") == 1  # rank 0 alone reports
    for table in ("features.csv", "tiles.csv"):
        one, two = pd.read_csv(tmp_path / "one" / table), pd.read_csv(tmp_path / "two" / table)
        pd.testing.assert_frame_equal(one, two, check_exact=False, rtol=1e-6)
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.is_dir()) == sorted(
        p.name for p in cohort.iterdir())
