"""Issue 17 item 2: tiles cut on the training device from a resident cache (the CPU as the device here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from DeepDosimetricsLib.deep.cache.build import ensure_cache
from DeepDosimetricsLib.deep.cache.store import CacheConfig
from DeepDosimetricsLib.deep.channels import parse_channels
from DeepDosimetricsLib.deep.train.resident import ResidentTileSampler, fits_on_device, resident_bytes
from DeepDosimetricsLib.deep.train.sampling import SamplingConfig, TileSampler
from DeepDosimetricsLib.deep.train.training import make_config, train


@pytest.fixture(scope="module")
def cache(phantom_cohort, tmp_path_factory):
    return ensure_cache(phantom_cohort, CacheConfig(), cache_dir=tmp_path_factory.mktemp("resident-cache"))


@pytest.mark.parametrize("tile, channels", [
    (16, "window:soft_tissue,mask:PTV,dose"),
    # a tile longer than the phantoms' z axis (air padding, negative starts), 5 windows, the prescription scale
    (40, "window:lung,window:bone,window:-50/300,mask:PTV,dose:prescription"),
])
def test_resident_batches_equal_the_host_samplers(cache, tile, channels):
    specs = parse_channels(channels)
    config = SamplingConfig(tile=tile, batch=6, ptv_share=0.4, edge_share=0.1, body_share=0.4, jitter=0.05)
    host = TileSampler(list(cache), specs, config, seed=11, rank=1)
    resident = ResidentTileSampler(host, "cpu")
    assert resident_bytes(host) == sum(v.numel() * v.element_size() for v in resident.volumes.values())
    flipped = 0
    for step in (0, 1, 7, 123):
        expected = host.batch(step)
        got = resident.batch(step)
        assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(resident.batch(step).numpy(), got.numpy())  # deterministic
        flipped += sum(bool(a.flip_axes) for a in resident._draw(step)[2])
    assert flipped > 0  # the comparison covered flipped tiles
    assert not np.allclose(resident.batch(1).numpy(), resident.batch(2).numpy())


def test_only_devices_with_their_own_memory_hold_the_cache(cache):
    host = TileSampler(list(cache), parse_channels("default"), SamplingConfig(tile=16, batch=2), seed=0)
    assert not fits_on_device(host, "cpu")  # a CPU run keeps reading tiles from the memory-mapped cache


def test_training_with_the_resident_sampler_matches_the_host_sampler(cache, phantom_cohort, tmp_path):
    tiny = dict(tile=16, batch=2, features=4, widths=[4, 8], groups=2, val_fraction=0.25, val_tiles=2, steps=6,
                steps_per_epoch=3, log_every=1, checkpoint_every=3, patience=0, seed=3, device="cpu")
    losses = {}
    for sampler in ("host", "device"):
        result = train(phantom_cohort, tmp_path / sampler, make_config(None, **tiny, sampler=sampler), cache=cache,
                       quiet=True)
        losses[sampler] = [r["train_loss"] for r in result.history]
        assert result.summary["sampler"] == sampler
    np.testing.assert_allclose(losses["device"], losses["host"], rtol=1e-4)
