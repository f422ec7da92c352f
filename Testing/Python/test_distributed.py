"""DistributedDataParallel on 2 CPU processes (gloo): the ranks stay in sync, rank 0 alone writes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from DeepDosimetricsLib.deep.cache.build import ensure_cache
from DeepDosimetricsLib.deep.cache.store import CacheConfig

TINY = dict(tile=16, batch=2, features=4, widths=[4, 8], groups=2, val_fraction=0.25, val_tiles=4,
            steps=6, steps_per_epoch=3, log_every=1, checkpoint_every=3, patience=0, seed=5, device="cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cohort: str, cache: str, out: str, results: str) -> None:
    """One DDP rank, as torchrun would start it (environment variables), saving its final parameters."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from DeepDosimetricsLib.deep.train.training import make_config, train

    result = train(cohort, out, make_config(None, **TINY), cache_dir=cache, quiet=True)
    state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    torch.save({"state": state, "in_sync": result.summary["ranks_in_sync"],
                "world": result.summary["world_size"]}, Path(results) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_cpu_ranks_stay_in_sync(phantom_cohort, tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    cache = tmp_path / "cache"
    ensure_cache(phantom_cohort, CacheConfig(), cache_dir=cache)
    out, results = tmp_path / "model", tmp_path / "ranks"
    results.mkdir()
    mp.spawn(_rank_main, args=(2, _free_port(), str(phantom_cohort), str(cache), str(out), str(results)),
             nprocs=2, join=True)
    ranks = [torch.load(results / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["world"] == 2 and r["in_sync"] for r in ranks)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    # the model moved away from its initial weights, and rank 0 wrote the files
    torch.manual_seed(TINY["seed"])
    from DeepDosimetricsLib.deep.model import ModelConfig, TileAutoencoder, load_model

    initial = TileAutoencoder(ModelConfig(channels=["window:soft_tissue", "mask:PTV", "dose"], tile=16,
                                          features=4, widths=[4, 8], groups=2)).state_dict()
    assert any(not torch.equal(initial[k], ranks[0]["state"][k]) for k in initial)
    assert (out / "checkpoint.pt").is_file() and (out / "loss_curve.png").is_file()
    model, _ = load_model(out)
    history = (out / "loss_history.csv").read_text().splitlines()
    assert len(history) == 1 + 1 + TINY["steps"]  # header, the PCA start (step 0), one row per step
