"""Issue 17 item 1: the residual autoencoder that starts at PCA (deep/train/pca.py, ModelConfig.pca_start)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from DeepDosimetricsLib.deep.cache.build import ensure_cache
from DeepDosimetricsLib.deep.cache.store import CacheConfig
from DeepDosimetricsLib.deep.distributed import DistributedContext
from DeepDosimetricsLib.deep.model import ModelConfig, TileAutoencoder, load_model
from DeepDosimetricsLib.deep.train.pca import (
    basis_from_sums,
    covariance_sums,
    fit_pca,
    mean_sums,
    orthonormal,
    sampler_batches,
    start_directions,
)
from DeepDosimetricsLib.deep.train.training import Trainer, make_config, train
from DeepDosimetricsLib.runtime.errors import InputError

CHANNELS = ["window:soft_tissue", "mask:PTV", "dose"]
TINY = dict(tile=16, batch=4, features=4, widths=[4, 8], groups=2, val_fraction=0.25, val_tiles=8,
            steps_per_epoch=10, log_every=5, checkpoint_every=10, patience=0, seed=3, device="cpu",
            pca_start=True, pca_tiles=96, init_output_bias=False)


def exact_pca(flat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top-k axes by a full SVD (the reference)."""
    mean = flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    return mean, vt[:k].T


def reconstruction_error(flat: np.ndarray, mean: np.ndarray, axes: np.ndarray) -> float:
    centred = flat - mean
    return float(((centred - centred @ axes @ axes.T) ** 2).sum())


@pytest.fixture(scope="module")
def cache(phantom_cohort, tmp_path_factory):
    return ensure_cache(phantom_cohort, CacheConfig(), cache_dir=tmp_path_factory.mktemp("pca-cache"))


def test_streaming_fit_matches_the_exact_pca_and_sums_add_up_across_sites():
    rng = np.random.default_rng(0)
    d, k = 300, 5
    signal = rng.standard_normal((400, 12)) * np.linspace(6, 1, 12) @ orthonormal(rng.standard_normal((12, d))[:, :].T).T
    flat = (0.5 + 0.05 * signal + 0.01 * rng.standard_normal((400, d))).astype(np.float32)
    batches = [flat[i : i + 50] for i in range(0, 400, 50)]
    basis = fit_pca(lambda: iter(batches), k, seed=1)
    mean, axes = exact_pca(flat.astype(np.float64), k)
    np.testing.assert_allclose(basis.mean, mean, atol=1e-6)
    assert basis.axes.shape == (d, k)
    np.testing.assert_allclose(basis.axes.T @ basis.axes, np.eye(k), atol=1e-5)
    # the same subspace: the reconstruction error equals the optimum (relative 1e-4)
    assert reconstruction_error(flat, basis.mean, basis.axes) == pytest.approx(
        reconstruction_error(flat, mean, axes), rel=1e-4)
    assert 0.5 < basis.variances.sum() / basis.total_variance <= 1.0
    # two sites' sums add up to the pooled sums exactly (what federated fitting relies on)
    first, second = batches[:3], batches[3:]
    pooled = mean_sums(batches)
    split = mean_sums(first) + mean_sums(second)
    np.testing.assert_allclose(split.total, pooled.total, rtol=1e-12)
    assert split.count == pooled.count and split.squares == pytest.approx(pooled.squares, rel=1e-12)
    q = start_directions(d, k, seed=1)
    whole = covariance_sums(batches, basis.mean, q)
    parts = covariance_sums(first, basis.mean, q) + covariance_sums(second, basis.mean, q)
    np.testing.assert_allclose(parts.total, whole.total, rtol=1e-9, atol=1e-9)
    again = basis_from_sums(split, q, parts, k)
    assert again.axes.shape == (d, k)


def test_step_zero_reconstructs_as_pca_on_held_out_tiles(cache, phantom_cohort, tmp_path):
    config = make_config(None, **TINY, steps=1)
    trainer = Trainer(phantom_cohort, tmp_path / "model", config, DistributedContext.from_environment())
    trainer.setup(cache=cache)
    model = trainer.model.eval()
    assert trainer.pca_summary["tiles"] >= config.pca_tiles
    # held-out patients' fixed tiles (never seen by the fit)
    tiles = np.stack([trainer.val_sampler.read(p, s, None) for p, s in trainer.val_tiles])
    flat = tiles.reshape(len(tiles), -1)
    mean, axes = model.pca_mean.numpy(), model.pca_axes.numpy()
    expected = np.clip((flat - mean) @ axes @ axes.T + mean, 0, 1).reshape(tiles.shape)
    with torch.no_grad():
        x = torch.from_numpy(tiles).contiguous(memory_format=torch.channels_last_3d)
        got = model.decode(model.encode(x)).numpy()
        scores = model.encode(x).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5)
    # the features are the PCA scores in units of each axis's standard deviation
    np.testing.assert_allclose(scores * model.pca_scale.numpy(), (flat - mean) @ axes, rtol=1e-4, atol=1e-4)
    # and this PCA is the PCA of its training tiles (the exact one, by SVD, keeps the same variance)
    fit_tiles = np.concatenate(list(sampler_batches(trainer.sampler, config.pca_tiles)()))
    fit_flat = fit_tiles.reshape(len(fit_tiles), -1).astype(np.float64)
    exact_mean, exact_axes = exact_pca(fit_flat, config.features)
    assert reconstruction_error(fit_flat, mean, axes) == pytest.approx(
        reconstruction_error(fit_flat, exact_mean, exact_axes), rel=1e-3)


def test_training_from_the_pca_start_improves_and_the_model_file_keeps_the_path(cache, phantom_cohort, tmp_path):
    config = make_config(None, **TINY, steps=30, lr=3e-3)
    result = train(phantom_cohort, tmp_path / "model", config, cache=cache, quiet=True)
    validations = [(r["step"], r["val_loss"]) for r in result.history if r.get("val_loss") is not None]
    # step 0 (the PCA start) is validated and kept as the best model until a step beats it; 30 steps do
    assert [step for step, _ in validations] == [0, 10, 20, 30]
    assert min(loss for _, loss in validations[1:]) < validations[0][1]
    assert result.best_val_loss == min(loss for _, loss in validations)
    model, loaded = load_model(tmp_path / "model")
    assert loaded.pca_start and float(model.pca_axes.abs().sum()) > 0
    meta = result.summary
    assert meta["pca_start"]["tiles"] >= 96 and 0 < meta["pca_start"]["variance_kept"] <= 1
    # the convolutional paths' gains have left zero: the model is no longer plain PCA
    assert float(model.feature_gain.detach().abs().sum()) > 0 and float(model.output_gain.detach().abs().sum()) > 0


def test_clipped_outputs_still_learn_and_the_basis_must_fit():
    config = ModelConfig(channels=CHANNELS, tile=8, features=2, widths=[4], groups=2, pca_start=True)
    model = TileAutoencoder(config)
    d = config.tile_values
    mean = np.full(d, -0.5, np.float32)  # every output starts below 0 (clipped)
    axes = orthonormal(np.random.default_rng(0).standard_normal((d, 2)))
    model.set_pca_basis(mean, axes, np.ones(2, np.float32))
    x = torch.full((1, 3, 8, 8, 8), 0.7)
    logits, _ = model(x)
    assert float(torch.sigmoid(logits).detach().max()) < 1e-5
    ((torch.sigmoid(logits) - x) ** 2).mean().backward()
    assert float(model.output_gain.grad.abs().sum()) > 0  # the straight-through clip lets it learn
    with pytest.raises(InputError, match="does not fit"):
        model.set_pca_basis(mean[:-1], axes, np.ones(2))
    with pytest.raises(InputError, match="no PCA path"):
        TileAutoencoder(ModelConfig(channels=CHANNELS, tile=8, features=2, widths=[4])).set_pca_basis(mean, axes, [1, 1])


def test_outputs_far_outside_the_range_give_finite_logits():
    config = ModelConfig(channels=CHANNELS, tile=8, features=2, widths=[4], groups=2, pca_start=True)
    model = TileAutoencoder(config)
    d = config.tile_values
    axes = orthonormal(np.random.default_rng(1).standard_normal((d, 2)))
    for level in (3.7, -41.3, 1e6):  # values rounding just past 1 - eps made the logit NaN
        model.set_pca_basis(np.full(d, level, np.float32), axes, np.ones(2, np.float32))
        logits, _ = model(torch.rand(2, 3, 8, 8, 8))
        assert torch.isfinite(logits).all()
        ((torch.sigmoid(logits) - 0.5) ** 2).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()
