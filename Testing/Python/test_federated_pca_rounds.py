"""Issue 19 item 1 (PCA start) and the weighted average: the PCA start fitted from three phantom sites' sums
equals the pooled PCA (deep/federated/pca_rounds.py); FedAvg's average (deep/federated/averaging.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from DeepDosimetricsLib.data.phantoms import synthesize_cohort
from DeepDosimetricsLib.deep.cache.build import ensure_cache
from DeepDosimetricsLib.deep.channels import parse_channels
from DeepDosimetricsLib.deep.federated.averaging import average_state_dicts, weighted_average
from DeepDosimetricsLib.deep.federated.pca_rounds import (
    FederatedPca,
    PcaRequest,
    federated_pca,
    merge,
    site_pca_statistics,
    statistics_from_message,
    statistics_to_message,
)
from DeepDosimetricsLib.deep.model import ModelConfig, TileAutoencoder
from DeepDosimetricsLib.deep.train.pca import fit_pca, sampler_batches
from DeepDosimetricsLib.deep.train.sampling import SamplingConfig, TileSampler
from DeepDosimetricsLib.runtime.errors import InputError

K = 4


@pytest.fixture(scope="module")
def site_passes(tmp_path_factory):
    """Each of the three phantom scanner sites' passes over its own training tiles (tile 8, default channels)."""
    root = tmp_path_factory.mktemp("pca-sites")
    cohort = synthesize_cohort(root / "cohort", patients=9, shape=(40, 40, 24), seed=0, sites=3, quiet=True)
    cache = ensure_cache(cohort, cache_dir=root / "cache")
    clinical = pd.read_csv(cohort / "clinical.csv")
    specs = parse_channels("default")
    passes = {}
    for k, (site, group) in enumerate(sorted(clinical.groupby("site"))):
        sampler = TileSampler([cache[str(p)] for p in group["patient"]], specs, SamplingConfig(tile=8, batch=16), seed=k)
        passes[site] = sampler_batches(sampler, 48)
    assert len(passes) == 3
    return passes


def _principal_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the column spaces of orthonormal a and b."""
    return np.linalg.svd(a.astype(np.float64).T @ b.astype(np.float64), compute_uv=False)


def test_federated_pca_equals_the_pooled_pca(site_passes):
    sites = list(site_passes.values())
    pooled_batches = [batch for batches in sites for batch in batches()]
    pooled = fit_pca(lambda: iter(pooled_batches), K, seed=0)
    federated = federated_pca(sites, K, seed=0)
    assert federated.tiles == pooled.tiles == 3 * 48
    np.testing.assert_allclose(federated.mean, pooled.mean, atol=1e-6)
    # the same subspace (principal angles ~ 0) and the same variances, whatever the axes' signs
    assert _principal_cosines(federated.axes, pooled.axes).min() > 1 - 1e-6
    np.testing.assert_allclose(federated.variances, pooled.variances, rtol=1e-5)
    assert federated.total_variance == pytest.approx(pooled.total_variance, rel=1e-9)
    # and neither site alone gives it
    alone = fit_pca(sites[0], K, seed=0)
    assert _principal_cosines(alone.axes, pooled.axes).min() < 0.999


def test_rounds_through_messages_and_refusals(site_passes):
    sites = list(site_passes.values())
    fit = FederatedPca(K, seed=0, iterations=2)
    assert fit.rounds == 4
    while not fit.done:
        arrays, scalars = fit.request().to_message()
        request = PcaRequest.from_message(arrays, scalars)  # as a site receives it
        replies = [statistics_to_message(site_pca_statistics(batches, request)) for batches in sites]
        assert all(set(s) == {"pca_tiles", "pca_squares"} and len(a) == 1 for a, s in replies)
        fit.merge(statistics_from_message(a, s) for a, s in replies)
    direct = federated_pca(sites, K, seed=0, iterations=2)
    assert _principal_cosines(fit.finish().axes, direct.axes).min() > 1 - 1e-6
    # a site with too few tiles sends nothing; a site that changes its tiles mid-fit stops it
    with pytest.raises(InputError, match="fewer than"):
        site_pca_statistics(sites[0], PcaRequest("mean", 0), min_tiles=1000)
    fit = FederatedPca(K)
    fit.merge(site_pca_statistics(s, fit.request()) for s in sites)
    with pytest.raises(InputError, match="tiles"):
        fit.merge(site_pca_statistics(s, fit.request()) for s in sites[:2])
    with pytest.raises(InputError, match="shape"):
        merge([site_pca_statistics(sites[0], PcaRequest("mean", 0)),
               site_pca_statistics(lambda: iter([np.zeros((20, 5), np.float32)]), PcaRequest("mean", 0))])
    with pytest.raises(InputError, match="rounds"):
        FederatedPca(K).finish()


def test_weighted_average_of_models():
    config = ModelConfig(channels=["window:soft_tissue", "mask:PTV", "dose"], tile=8, features=2, widths=[4], groups=2)
    torch.manual_seed(0)
    a, b = TileAutoencoder(config).state_dict(), TileAutoencoder(config).state_dict()
    average = average_state_dicts([a, b], weights=[100, 300])  # tiles seen
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(average[key], 0.25 * a[key] + 0.75 * b[key])
    same = average_state_dicts([a, a, a], [1, 2, 3])
    assert all(torch.allclose(same[k], a[k]) for k in a)
    model = TileAutoencoder(config)
    model.load_state_dict(average)  # the average is a state dict of the same model
    counters = [np.array([3]), np.array([3])]
    assert weighted_average([[counters[0]], [counters[1]]], [1, 1])[0].tolist() == [3]
    with pytest.raises(InputError, match="integer"):
        weighted_average([[np.array([3])], [np.array([4])]], [1, 1])
    with pytest.raises(InputError, match="shape"):
        weighted_average([[np.zeros(3)], [np.zeros(4)]], [1, 1])
    with pytest.raises(InputError, match="weight"):
        weighted_average([[np.zeros(3)], [np.zeros(3)]], [0, 0])
    with pytest.raises(InputError, match="weights"):
        weighted_average([[np.zeros(3)]], [1, 1])
