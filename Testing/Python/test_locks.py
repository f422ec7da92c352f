"""Safe concurrency: a job folder (encode --out, train --out) belongs to one job, the second is refused naming
the holder; cache patients are built under per-patient locks, so two builds at once (and two encodes on one
cache) finish with correct outputs. The kernel frees a lock whose holder was SIGKILLed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from DeepDosimetricsLib.cli import main
from DeepDosimetricsLib.runtime.locks import FolderLocked, job_lock, patient_lock

HOLD = """
import sys, time
from DeepDosimetricsLib.runtime.locks import job_lock, patient_lock
kind, folder, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
lock = job_lock(folder, "encode") if kind == "job" else patient_lock(folder, "p1")
with lock:
    print("held", flush=True)
    time.sleep(seconds)
"""


def _hold(kind: str, folder: Path, seconds: float) -> subprocess.Popen:
    """Another process holding a lock (returns once it holds it)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(folder), str(seconds)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_held_folder_refuses_a_second_job_naming_the_holder_until_it_is_killed(tmp_path):
    holder = _hold("job", tmp_path / "out", 60)
    try:
        with pytest.raises(FolderLocked) as refused:
            with job_lock(tmp_path / "out", "encode"):
                pass
        message = str(refused.value)
        assert str(tmp_path / "out") in message and f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert message.startswith(f"{tmp_path / 'out'} is in use by another job (encode, ")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with job_lock(tmp_path / "out", "encode"):  # no stale lock after SIGKILL
        pass


def test_a_patient_lock_waits_for_its_holder(tmp_path):
    holder = _hold("patient", tmp_path, 1.5)
    started = time.monotonic()
    with pytest.raises(FolderLocked, match="patient p1 is still being written"):
        with patient_lock(tmp_path, "p1", timeout=0.2):
            pass
    with patient_lock(tmp_path, "p1", timeout=30):
        assert time.monotonic() - started > 0.5  # it waited for the holder
    holder.wait()


@pytest.fixture(scope="module")
def small(phantom_subset, tiny_model, tmp_path_factory):
    """Two phantom patients, a tiny model, and their reference cache and encoding made by one process."""
    from DeepDosimetricsLib.deep.cache.build import ensure_cache
    from DeepDosimetricsLib.deep.encode.job import EncodeSettings, encode_cohort

    root = tmp_path_factory.mktemp("locks")
    cohort = phantom_subset(root / "cohort", 2)
    model = tiny_model(root / "model")
    ensure_cache(cohort, cache_dir=root / "cache")
    encode_cohort(model, cohort, root / "encoded", root / "cache",
                  EncodeSettings(device="cpu", quiet=True, progress_json=False))
    return root


def _cli(*arguments: str) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "DeepDosimetricsLib.cli", *arguments], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(processes) -> list:
    return [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in processes]


@pytest.mark.slow
def test_two_cache_builds_at_once_give_one_correct_cache(small, tmp_path):
    cache = tmp_path / "cache"
    runs = _finish([_cli("cache", "--cohort", str(small / "cohort"), "--cache", str(cache), "--quiet")
                    for _ in range(2)])
    assert [code for code, _, _ in runs] == [0, 0], [err[-2000:] for _, _, err in runs]
    assert not list(cache.glob(".tmp/*/*"))  # no half-built patient left
    arrays = sorted((small / "cache").glob("*/*.npy"))
    assert arrays
    for array in arrays:
        assert np.array_equal(np.load(array), np.load(cache / array.relative_to(small / "cache"))), array


@pytest.mark.slow
def test_two_encodes_at_once_on_one_folder(small, tmp_path):
    """Both start together on one --out and one (new) cache: each finishes or is refused with the holder
    named; the outputs equal one process's, and a later --resume reuses them."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    arguments = ["encode", "--model", str(small / "model"), "--cohort", str(small / "cohort"), "--out", str(out),
                 "--cache", str(cache), "--device", "cpu", "--quiet", "--resume"]
    runs = _finish([_cli(*arguments) for _ in range(2)])
    codes = [code for code, _, _ in runs]
    assert 0 in codes and set(codes) <= {0, 2}, [err[-2000:] for _, _, err in runs]
    for code, _, err in runs:
        if code == 2:
            assert f"error: {out} is in use by another job (encode, pid " in err
    for table in ("features.csv", "tiles.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / table), pd.read_csv(small / "encoded" / table))
    assert main(arguments) == 0  # finished patients are reused
    assert not list(out.glob(".partial-*"))


def test_encode_and_train_refuse_a_folder_another_job_holds(small, tmp_path, capsys):
    out = tmp_path / "out"
    with job_lock(out, "encode"):
        assert main(["encode", "--model", str(small / "model"), "--cohort", str(small / "cohort"), "--out",
                     str(out), "--cache", str(small / "cache"), "--device", "cpu", "--quiet"]) == 2
        assert f"error: {out} is in use by another job (encode, pid {os.getpid()}" in capsys.readouterr().err
        assert not (out / "encode.json").exists()
    with job_lock(tmp_path / "model", "train"):
        assert main(["train", "--cohort", str(small / "cohort"), "--out", str(tmp_path / "model"), "--steps",
                     "1", "--quiet"]) == 2
        assert "is in use by another job (train, pid" in capsys.readouterr().err


def test_the_job_lock_removes_what_atomic_writes_of_a_killed_job_left(tmp_path):
    from DeepDosimetricsLib.runtime.atomic import atomic_path

    with atomic_path(tmp_path / "features.csv") as temporary:  # the name a write killed midway leaves
        stale = temporary.name
        temporary.write_text("complete")
    (tmp_path / stale).write_text("half")
    (tmp_path / "notes.tmp").write_text("not a temporary of ours")
    with job_lock(tmp_path, "encode"):
        assert not (tmp_path / stale).exists()
    assert (tmp_path / "notes.tmp").is_file() and (tmp_path / "features.csv").read_text() == "complete"
