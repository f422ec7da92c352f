"""Training on the phantom cohort: outputs, progress, resume after SIGKILL, bad input, safe checkpoints."""

from __future__ import annotations

import csv
import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from DeepDosimetricsLib.cli import main as cli_main
from DeepDosimetricsLib.deep.cache.build import ensure_cache
from DeepDosimetricsLib.deep.cache.store import CacheConfig
from DeepDosimetricsLib.deep.model import load_model
from DeepDosimetricsLib.deep.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from DeepDosimetricsLib.deep.train.sampling import SamplingConfig, TileSampler, occupancy_grid, split_patients
from DeepDosimetricsLib.deep.train.training import make_config, train
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError, InputError
from DeepDosimetricsLib.runtime.progress import parse_progress

TINY = dict(tile=16, batch=2, features=4, widths=[4, 8], groups=2, val_fraction=0.25, val_tiles=4,
            steps_per_epoch=4, log_every=1, checkpoint_every=4, patience=0, seed=3, device="cpu")


@pytest.fixture(scope="module")
def cache_dir(phantom_cohort, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train-cache")
    ensure_cache(phantom_cohort, CacheConfig(), cache_dir=folder)
    return folder


def tiny_config_file(folder: Path, **changes) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


def read_history(model_dir: Path) -> list[dict]:
    with open(model_dir / "loss_history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_sampling_biased_to_target_and_deterministic(cache_dir):
    from DeepDosimetricsLib.deep.cache.store import open_cache
    from DeepDosimetricsLib.deep.channels import parse_channels

    cache = open_cache(cache_dir)
    patients = list(cache)
    specs = parse_channels("default")
    config = SamplingConfig(tile=16, batch=4, ptv_share=1.0, body_share=0.0, flips=False, jitter=0.0)
    sampler = TileSampler(patients, specs, config, seed=1)
    batch = sampler.batch(5)
    assert batch.shape == (4, 3, 16, 16, 16) and batch.dtype == np.float32
    assert np.array_equal(batch, sampler.batch(5))  # a pure function of (seed, rank, step)
    assert not np.array_equal(batch, TileSampler(patients, specs, config, seed=1, rank=1).batch(5))
    assert all(tile[1].any() for tile in batch)  # every tile touches the PTV (channel mask:PTV)
    assert 0.0 <= batch.min() and batch.max() <= 1.0
    grid = occupancy_grid(np.pad(np.ones((3, 3, 3), np.uint8), ((5, 0), (0, 7), (2, 2))), 4)
    assert grid.shape == (2, 3, 2) and grid[1, 0, 0] and grid[1, 0, 1] and not grid[0].any()
    # DataLoader workers deliver the same batches in the same order as the main process
    from DeepDosimetricsLib.deep.train.sampling import make_loader

    alone = list(make_loader(sampler, 2, 6, num_workers=0))
    workers = list(make_loader(sampler, 2, 6, num_workers=2))
    assert len(alone) == 4 and all(torch.equal(a, b) for a, b in zip(alone, workers))
    train_ids, val_ids = split_patients(cache.ids, 0.25, seed=0)
    assert len(val_ids) == 1 and not set(train_ids) & set(val_ids)


def test_train_writes_model_history_curve_and_progress(phantom_cohort, cache_dir, tmp_path, capsys):
    out = tmp_path / "model"
    code = cli_main(["train", "--cohort", str(phantom_cohort), "--cache", str(cache_dir), "--out", str(out),
                     "--config", str(tiny_config_file(tmp_path)), "--steps", "8", "--quiet"])
    assert code == 0
    for name in ("model.json", "model.pt", "checkpoint.pt", "loss_history.csv", "loss_curve.png",
                 "train-config.yaml"):
        assert (out / name).is_file(), name
    records = [parse_progress(line) for line in capsys.readouterr().out.splitlines()]
    records = [r for r in records if r]
    assert [r["done"] for r in records] == list(range(1, 9))
    assert all(r["task"] == "train" and r["total"] == 8 and r["voxels_per_s"] > 0 for r in records)
    history = read_history(out)
    assert [int(r["step"]) for r in history] == list(range(1, 9))
    assert history[3]["val_loss"] and history[7]["val_loss"]
    model, config = load_model(out, channels=["window:soft_tissue", "mask:PTV", "dose"])
    assert config.tile == 16 and config.features == 4
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 8


def _run_until_killed(cohort: Path, cache: Path, out: Path, config: Path, kill_after: int) -> int:
    """Start a training subprocess, SIGKILL it once it reported step ``kill_after``; the steps seen."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    command = [sys.executable, "-m", "DeepDosimetricsLib.cli", "train", "--cohort", str(cohort), "--cache",
               str(cache), "--out", str(out), "--config", str(config), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    seen = 0
    try:
        for line in process.stdout:
            record = parse_progress(line)
            if record:
                seen = record["done"]
                if seen >= kill_after:
                    process.send_signal(signal.SIGKILL)
                    break
    finally:
        process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL, "the training ended before it could be killed"
    return seen


def test_resume_after_sigkill_continues_exactly(phantom_cohort, cache_dir, tmp_path):
    # one torch thread in the killed process, the resumed and the straight run: another thread count splits
    # the gradient reductions differently (other last bits), and these runs compare on this machine only
    config = tiny_config_file(tmp_path, steps=14, checkpoint_every=4, threads=1)
    killed = tmp_path / "killed"
    seen = _run_until_killed(phantom_cohort, cache_dir, killed, config, kill_after=10)
    assert seen >= 10
    saved = load_checkpoint(killed / CHECKPOINT_NAME)
    assert 8 <= saved["step"] <= seen and saved["step"] % 4 == 0  # lost at most one interval
    assert not list(killed.glob(".*.tmp"))

    # without --resume the existing checkpoint is protected
    with pytest.raises(InputError, match="--resume"):
        train(phantom_cohort, killed, make_config(config), cache_dir=cache_dir, quiet=True)
    resumed = train(phantom_cohort, killed, make_config(config), cache_dir=cache_dir, resume=True, quiet=True)
    assert resumed.steps == 14
    steps = [int(r["step"]) for r in read_history(killed)]
    assert steps == list(range(1, 15))  # the history continues from the checkpoint, no gap or repeat

    straight = train(phantom_cohort, tmp_path / "straight", make_config(config), cache_dir=cache_dir, quiet=True)
    a = load_checkpoint(killed / CHECKPOINT_NAME)["model"]
    b = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert resumed.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"], rel=1e-4)


def test_corrupt_and_foreign_checkpoints(phantom_cohort, cache_dir, tmp_path, capsys):
    config = tiny_config_file(tmp_path, steps=2)
    out = tmp_path / "m"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes(b"PK\x03\x04 this is not a checkpoint")
    args = ["train", "--cohort", str(phantom_cohort), "--cache", str(cache_dir), "--out", str(out),
            "--config", str(config), "--resume", "--quiet"]
    assert cli_main(args) == 2
    assert "corrupt or not a DeepDosimetrics" in capsys.readouterr().err
    torch.save({"state": torch.zeros(2)}, out / CHECKPOINT_NAME)
    assert cli_main(args) == 2
    assert "not a DeepDosimetrics training checkpoint" in capsys.readouterr().err


def test_full_disk_keeps_the_previous_checkpoint(phantom_cohort, cache_dir, tmp_path, monkeypatch):
    config = make_config(tiny_config_file(tmp_path, steps=4))
    out = tmp_path / "m"
    train(phantom_cohort, out, config, cache_dir=cache_dir, quiet=True)
    before = (out / CHECKPOINT_NAME).read_bytes()
    real_save = torch.save

    def failing_save(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)  # write part of the file, then fail as a full disk does
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    config.steps = 8
    with pytest.raises(DeepDosimetricsError, match="No space left on device.*previous .* intact"):
        train(phantom_cohort, out, config, cache_dir=cache_dir, resume=True, quiet=True)
    assert (out / CHECKPOINT_NAME).read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_bad_cohorts_are_refused(phantom_cohort, tmp_path, capsys):
    config = tiny_config_file(tmp_path, steps=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    code = cli_main(["train", "--cohort", str(empty), "--cache", str(tmp_path / "c0"), "--out",
                     str(tmp_path / "m0"), "--config", str(config), "--quiet"])
    assert code == 2 and "error:" in capsys.readouterr().err

    # one patient without dose: refused naming it, or trained without it with --skip-incomplete
    cohort = tmp_path / "cohort"
    shutil.copytree(phantom_cohort, cohort)
    victim = sorted(p for p in cohort.iterdir() if p.is_dir())[0]
    for dose in victim.rglob("dose*.nrrd"):
        dose.unlink()
    base = ["train", "--cohort", str(cohort), "--cache", str(tmp_path / "c1"), "--config", str(config), "--quiet"]
    assert cli_main(base + ["--out", str(tmp_path / "m1")]) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "dose" in err and "--skip-incomplete" in err
    assert cli_main(base + ["--out", str(tmp_path / "m2"), "--skip-incomplete"]) == 0
    summary = load_model(tmp_path / "m2")[1]
    assert summary.channels == ["window:soft_tissue", "mask:PTV", "dose"]

    # a tile larger than every cropped volume
    assert cli_main(base + ["--out", str(tmp_path / "m3"), "--tile", "128", "--channels", "window:lung"]) == 2
    assert "exceeds the cropped volume of every patient in every axis" in capsys.readouterr().err
    # a tile the model's depth cannot halve evenly
    assert cli_main(base + ["--out", str(tmp_path / "m4"), "--tile", "18"]) == 2
    assert "multiple of 4" in capsys.readouterr().err
