"""The PCA start fitted across sites, round by round, from sums over each site's tiles (issue 19).

``deep/train/pca.py`` fits the PCA start by passes whose results are sums over tiles (:class:`TileSums`).
Here the passes run at the sites and only their sums travel; the server adds them up (:func:`merge`, exact
up to float64 rounding) and takes the step a pooled fit would take, so the basis equals the PCA fitted on
all sites' tiles pooled. One fit is ``iterations + 2`` rounds::

    server: fit = FederatedPca(features=10, seed=0)
    while not fit.done:
        request = fit.request()                                   # what every site computes this round
        fit.merge([site_pca_statistics(batches_of_site, request) for each site])   # at the sites
    basis = fit.finish()                                          # PcaBasis, as fit_pca returns it

What leaves a site in a round: its tile count, and a sum over at least ``MIN_SITE_TILES`` tiles: the sum of
its tiles (D,) and of their squared values (a scalar) in the first round, then the products
sum_i (x_i - m)((x_i - m)^T Q) (D x r). The server sends the pooled mean tile m (D,) and r orthonormal
directions Q (D x r), never a tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from DeepDosimetricsLib.deep.train.pca import (
    DEFAULT_ITERATIONS,
    DEFAULT_OVERSAMPLING,
    Batches,
    PcaBasis,
    TileSums,
    basis_from_sums,
    covariance_sums,
    mean_sums,
    orthonormal,
    start_directions,
)
from DeepDosimetricsLib.runtime.errors import InputError

#: a site sends no sum over fewer tiles than this (a sum over one tile would be that tile)
MIN_SITE_TILES = 16
MEAN, PRODUCT = "mean", "product"


@dataclass
class PcaRequest:
    """What the server asks of every site in one round: a mean pass, or the products with ``directions``."""

    phase: str  # MEAN or PRODUCT
    round: int
    mean: Optional[np.ndarray] = None  # (D,) float32, the pooled mean tile (PRODUCT)
    directions: Optional[np.ndarray] = None  # (D, r) float32, orthonormal (PRODUCT)

    def to_message(self) -> tuple[list[np.ndarray], dict[str, Any]]:
        """(arrays, scalars) for a transport (Flower's ArrayRecord and ConfigRecord)."""
        arrays = [] if self.phase == MEAN else [self.mean, self.directions]
        return arrays, {"pca_phase": self.phase, "pca_round": int(self.round)}

    @classmethod
    def from_message(cls, arrays: Sequence[np.ndarray], scalars: dict[str, Any]) -> PcaRequest:
        phase = str(scalars["pca_phase"])
        if phase == MEAN:
            return cls(MEAN, int(scalars["pca_round"]))
        if phase != PRODUCT or len(arrays) != 2:
            raise InputError(f"PCA round: unknown request (phase {phase!r}, {len(arrays)} arrays)")
        return cls(PRODUCT, int(scalars["pca_round"]), np.asarray(arrays[0], np.float32),
                   np.asarray(arrays[1], np.float32))


def statistics_to_message(sums: TileSums) -> tuple[list[np.ndarray], dict[str, Any]]:
    """A site's sums as (arrays, scalars) for a transport."""
    return [np.asarray(sums.total, np.float64)], {"pca_tiles": int(sums.count), "pca_squares": float(sums.squares)}


def statistics_from_message(arrays: Sequence[np.ndarray], scalars: dict[str, Any]) -> TileSums:
    if len(arrays) != 1:
        raise InputError(f"PCA round: a site sent {len(arrays)} arrays (expected 1)")
    return TileSums(int(scalars["pca_tiles"]), np.asarray(arrays[0], np.float64), float(scalars.get("pca_squares", 0.0)))


def site_pca_statistics(batches: Batches, request: PcaRequest, min_tiles: int = MIN_SITE_TILES) -> TileSums:
    """At a site: one pass over its tiles (``batches()``, e.g. ``sampler_batches(trainer.sampler, tiles)``)
    as ``request`` asks. Refuses (InputError) to send a sum over fewer than ``min_tiles`` tiles."""
    if request.phase == MEAN:
        sums = mean_sums(batches())
    elif request.phase == PRODUCT:
        sums = covariance_sums(batches(), request.mean, request.directions)
    else:
        raise InputError(f"PCA round: unknown phase {request.phase!r}")
    if sums.count < min_tiles:
        raise InputError(f"PCA round: this site has {sums.count} tiles, fewer than {min_tiles}; a sum over so few "
                         "tiles would reveal them, so it is not sent")
    return sums


def merge(statistics: Iterable[TileSums]) -> TileSums:
    """The sites' sums added up: what the same pass over all their tiles pooled gives."""
    parts = list(statistics)
    if not parts:
        raise InputError("PCA round: no site sent its sums")
    shape = np.shape(parts[0].total)
    for index, part in enumerate(parts):
        if np.shape(part.total) != shape:
            raise InputError(f"PCA round: site {index} sent sums of shape {np.shape(part.total)}, site 0 {shape} "
                             "(another tile size or channel set?)")
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


class FederatedPca:
    """The server's side of a federated PCA fit: the same steps as ``fit_pca``, one per round."""

    def __init__(self, features: int, seed: int = 0, iterations: int = DEFAULT_ITERATIONS,
                 oversampling: int = DEFAULT_OVERSAMPLING) -> None:
        self.features, self.seed = int(features), int(seed)
        self.iterations, self.oversampling = max(0, int(iterations)), int(oversampling)
        self.round = 0  # 0: mean pass; 1..iterations: subspace iterations; iterations + 1: the final pass
        self.totals: Optional[TileSums] = None
        self.mean: Optional[np.ndarray] = None
        self.directions: Optional[np.ndarray] = None
        self.basis: Optional[PcaBasis] = None

    @property
    def rounds(self) -> int:
        return self.iterations + 2

    @property
    def done(self) -> bool:
        return self.basis is not None

    def request(self) -> PcaRequest:
        """What the sites compute in this round."""
        if self.done:
            raise InputError("PCA rounds: the fit is finished")
        if self.round == 0:
            return PcaRequest(MEAN, 0)
        return PcaRequest(PRODUCT, self.round, self.mean, self.directions)

    def merge(self, statistics: Iterable[TileSums]) -> None:
        """Add up the sites' answers to this round's request and take the next step of the fit."""
        merged = merge(statistics)
        if self.round == 0:
            self.totals = merged
            self.mean = (merged.total / merged.count).astype(np.float32)
            self.directions = start_directions(len(self.mean), self.features, self.seed, self.oversampling)
        else:
            if merged.count != self.totals.count:
                raise InputError(f"PCA round {self.round}: the sites sent sums over {merged.count} tiles, the mean "
                                 f"pass {self.totals.count} (a site changed its tiles or left; start the fit again)")
            if self.round <= self.iterations:
                self.directions = orthonormal(merged.total)
            else:
                self.basis = basis_from_sums(self.totals, self.directions, merged, self.features)
        self.round += 1

    def finish(self) -> PcaBasis:
        """The fitted basis (mean, axes, variances, tiles, total variance)."""
        if self.basis is None:
            raise InputError(f"PCA rounds: the fit needs {self.rounds} rounds, {self.round} done")
        return self.basis


def federated_pca(site_batches: Sequence[Batches], features: int, seed: int = 0,
                  iterations: int = DEFAULT_ITERATIONS, oversampling: int = DEFAULT_OVERSAMPLING) -> PcaBasis:
    """All rounds in one process (the sites' passes called in turn): equals ``fit_pca`` on the pooled tiles."""
    fit = FederatedPca(features, seed, iterations, oversampling)
    while not fit.done:
        request = fit.request()
        fit.merge([site_pca_statistics(batches, request) for batches in site_batches])
    return fit.finish()


__all__ = ["FederatedPca", "PcaRequest", "site_pca_statistics", "merge", "federated_pca", "statistics_to_message",
           "statistics_from_message", "MIN_SITE_TILES"]
