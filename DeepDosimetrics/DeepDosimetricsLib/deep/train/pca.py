"""Principal axes of training tiles, fitted from sums over tiles (the start of a PCA-start autoencoder).

A tile of C channels and t^3 voxels is a vector of D = C t^3 values. PCA with K components keeps the
mean tile and the K directions of largest variance. Here it is fitted without ever holding the D x D
covariance or all tiles at once: randomized subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4)
needs only products of the covariance with a thin D x r matrix Q, and that product is a sum over tiles,

    C Q = sum_i (x_i - m) ((x_i - m)^T Q),

so every pass over the tiles is a sum (:class:`TileSums`), and sums from several processes or hospitals
add up exactly (federated training fits the same basis as pooled data would give). A fit is:

    mean pass:        m = sum_i x_i / n
    r = K + oversampling random directions Q, orthonormalised
    ``iterations`` x: Q <- orth(C Q)                         (one pass each)
    final pass:       B = Q^T C Q (r x r), eigenvectors U    ->  axes = Q U[:, :K]

Memory is O(D r) for the sums plus one batch of tiles; a pass over n tiles costs O(n D r).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np

from DeepDosimetricsLib.runtime.errors import InputError

#: random directions beyond K: the subspace iteration converges at the rate (lambda_{r+1} / lambda_K)^iterations
DEFAULT_OVERSAMPLING = 10
DEFAULT_ITERATIONS = 4

Batches = Callable[[], Iterable[np.ndarray]]  # a new pass over the same tiles, each batch (B, D) float32


@dataclass
class PcaBasis:
    """Mean tile (D,), K orthonormal principal axes (D, K) and the variance along each (K,)."""

    mean: np.ndarray
    axes: np.ndarray
    variances: np.ndarray
    tiles: int  # how many tiles it was fitted on
    total_variance: float = float("nan")  # of the tiles (all D directions): variances.sum() / this is the share kept

    @property
    def features(self) -> int:
        return int(self.axes.shape[1])

    def scores(self, flat: np.ndarray) -> np.ndarray:
        """(N, D) tiles -> (N, K) principal-component scores."""
        return (np.asarray(flat, np.float32) - self.mean) @ self.axes

    def reconstruct(self, flat: np.ndarray) -> np.ndarray:
        """(N, D) tiles -> their rank-K reconstruction (N, D), clipped to the channels' [0, 1]."""
        return np.clip(self.scores(flat) @ self.axes.T + self.mean, 0.0, 1.0)


@dataclass
class TileSums:
    """What one pass adds up: the number of tiles, and either their sum (D,) or C Q's uncentred sum (D, r)."""

    count: int
    total: np.ndarray  # float64
    squares: float = 0.0  # mean pass: sum of the tiles' squared values (for the share of variance kept)

    def __add__(self, other: TileSums) -> TileSums:
        return TileSums(self.count + other.count, self.total + other.total, self.squares + other.squares)

    @property
    def total_variance(self) -> float:
        """Mean pass: the tiles' total variance (sum over the D values), unbiased."""
        mean = self.total / max(1, self.count)
        return max(0.0, (self.squares - self.count * float(mean @ mean)) / max(1, self.count - 1))


def _flat(batch: np.ndarray) -> np.ndarray:
    batch = np.asarray(batch, dtype=np.float32)
    return batch.reshape(len(batch), -1)


def mean_sums(batches: Iterable[np.ndarray]) -> TileSums:
    """Count, float64 sum and sum of squares of the tiles (a mean pass)."""
    count, total, squares = 0, None, 0.0
    for batch in batches:
        flat = _flat(batch)
        part = flat.sum(axis=0, dtype=np.float64)
        total = part if total is None else total + part
        squares += float(np.einsum("ij,ij->", flat, flat, dtype=np.float64))
        count += len(flat)
    if total is None:
        raise InputError("no tiles to fit the PCA start on")
    return TileSums(count, total, squares)


#: rows (of the D values) per block when a pass adds a batch into the (D, r) sum: no (D, r) temporary per batch
ROW_BLOCK = 1 << 16


def covariance_sums(batches: Iterable[np.ndarray], mean: np.ndarray, directions: np.ndarray) -> TileSums:
    """Count and sum over tiles of (x - m)((x - m)^T Q): the covariance times ``directions`` (D, r), unnormalised.

    The (D, r) float64 sum is Fortran-ordered (what LAPACK's QR works on in place) and each batch is added
    block of rows by block, so a pass holds the sum and one batch, never a second (D, r) array."""
    q = np.asarray(directions, np.float32)
    mean = np.asarray(mean, np.float32)
    count, total = 0, np.zeros(q.shape, dtype=np.float64, order="F")
    for batch in batches:
        centred = _flat(batch) - mean
        scores = centred @ q  # (B, r)
        for first in range(0, len(mean), ROW_BLOCK):
            rows = slice(first, first + ROW_BLOCK)
            total[rows] += centred[:, rows].T @ scores
        count += len(centred)
    return TileSums(count, total)


def start_directions(dimension: int, features: int, seed: int, oversampling: int = DEFAULT_OVERSAMPLING) -> np.ndarray:
    """r = K + oversampling orthonormal random directions (D, r), the same for the same seed everywhere."""
    if features < 1 or features > dimension:
        raise InputError(f"PCA start: K = {features} components do not fit tiles of {dimension} values")
    rank = min(dimension, features + max(0, oversampling))
    rng = np.random.default_rng([int(seed), 0x9CA])
    gaussian = np.empty((dimension, rank), order="F")  # filled by blocks of rows: the values of one C-order draw
    for first in range(0, dimension, ROW_BLOCK):
        gaussian[first : first + ROW_BLOCK] = rng.standard_normal((min(ROW_BLOCK, dimension - first), rank))
    return orthonormal(gaussian, overwrite=True)


def orthonormal(matrix: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Orthonormal columns spanning ``matrix``'s (Householder QR in float64), float32.

    With ``overwrite`` a Fortran-ordered float64 ``matrix`` is factorised in place (its content is lost): a
    (D, r) array of a million-value tile then costs no copy (numpy's QR made three)."""
    from scipy.linalg import qr

    work = np.asarray(matrix, np.float64, order="F")
    if work is matrix and not overwrite:
        work = work.copy(order="F")
    q = qr(work, mode="economic", overwrite_a=True, check_finite=False)[0]
    del work
    return q.astype(np.float32)


def projected_covariance(mean: TileSums, directions: np.ndarray, product: TileSums) -> np.ndarray:
    """Q^T C Q (r x r, float64, symmetric) from the final pass's ``product`` = C Q summed over tiles."""
    if product.count != mean.count:
        raise InputError(f"PCA start: the passes saw {mean.count} and {product.count} tiles (they must agree)")
    small = np.zeros((directions.shape[1], directions.shape[1]))
    for first in range(0, len(directions), ROW_BLOCK):  # block of rows by block (no (D, r) float64 copy of Q)
        rows = slice(first, first + ROW_BLOCK)
        small += np.asarray(directions[rows], np.float64).T @ product.total[rows]
    small /= max(1, mean.count - 1)
    return (small + small.T) / 2


def basis_from_projection(mean: TileSums, directions: np.ndarray, small: np.ndarray, features: int) -> PcaBasis:
    """The PCA basis from Q^T C Q (:func:`projected_covariance`) and the orthonormal ``directions`` Q."""
    values, vectors = np.linalg.eigh(small)
    order = np.argsort(values)[::-1][:features]
    dimension = len(directions)
    axes = np.empty((dimension, len(order)), np.float32)
    for first in range(0, dimension, ROW_BLOCK):
        rows = slice(first, first + ROW_BLOCK)
        axes[rows] = np.asarray(directions[rows], np.float64) @ vectors[:, order]
    # a fixed sign per axis (its largest component positive), so the same tiles give the same basis everywhere
    for column in range(axes.shape[1]):
        sign = np.sign(axes[np.abs(axes[:, column]).argmax(), column])
        if sign < 0:
            axes[:, column] *= np.float32(-1)
    return PcaBasis(mean=(mean.total / mean.count).astype(np.float32), axes=axes,
                    variances=np.clip(values[order], 0.0, None).astype(np.float32), tiles=int(mean.count),
                    total_variance=mean.total_variance)


def basis_from_sums(mean: TileSums, directions: np.ndarray, product: TileSums, features: int) -> PcaBasis:
    """The PCA basis from the final pass: ``product`` = C Q summed over tiles for orthonormal ``directions`` Q."""
    return basis_from_projection(mean, directions, projected_covariance(mean, directions, product), features)


#: the sampler's stream of the tiles a PCA start is fitted on (training draws stream 0)
PCA_STREAM = 5
#: tiles of a PCA fit are held in memory for its passes up to this many bytes, and drawn anew each pass beyond
PCA_MEMORY_BYTES = 512 * 2**20


def sampler_batches(sampler, tiles: int, stream: int = PCA_STREAM, memory_bytes: int = PCA_MEMORY_BYTES) -> Batches:
    """Passes over ``tiles`` training tiles drawn by a ``TileSampler`` (same distribution and augmentation
    as training, another stream): kept in memory when they fit ``memory_bytes``, else drawn again per pass."""
    steps = -(-int(tiles) // sampler.config.batch)

    def draw() -> Iterable[np.ndarray]:
        for step in range(steps):
            yield sampler.batch(step, stream=stream)

    first = sampler.batch(0, stream=stream)
    if first.nbytes * steps > memory_bytes:
        return draw
    held = [first] + [sampler.batch(step, stream=stream) for step in range(1, steps)]
    return lambda: iter(held)


def fit_pca(
    batches: Batches,
    features: int,
    seed: int = 0,
    iterations: int = DEFAULT_ITERATIONS,
    oversampling: int = DEFAULT_OVERSAMPLING,
    progress: Optional[Callable[[str], None]] = None,
) -> PcaBasis:
    """PCA of tiles by randomized subspace iteration over ``iterations + 2`` passes of ``batches()``.

    Args:
        batches: called once per pass; yields (B, D) or (B, C, t, t, t) float32 tiles, the same every pass.
        features: K, the number of principal axes.
        seed: seed of the random start directions.
        iterations: subspace iterations (power steps) between the random start and the final pass.
        oversampling: extra directions carried along (r = K + oversampling).
        progress: called with a short text after each pass.
    """
    report = progress or (lambda _text: None)
    totals = mean_sums(batches())
    mean = (totals.total / totals.count).astype(np.float32)
    report(f"PCA start: mean of {totals.count} tiles")
    q = start_directions(len(mean), features, seed, oversampling)
    for step in range(max(0, int(iterations))):
        product = covariance_sums(batches(), mean, q)
        del q  # one (D, r) array at a time besides the sum, which the QR then overwrites
        q = orthonormal(product.total, overwrite=True)
        del product
        report(f"PCA start: subspace iteration {step + 1}/{iterations}")
    product = covariance_sums(batches(), mean, q)
    small = projected_covariance(totals, q, product)
    del product  # the (D, r) sum goes before the axes are built
    basis = basis_from_projection(totals, q, small, features)
    share = basis.variances.sum() / basis.total_variance if basis.total_variance > 0 else float("nan")
    report(f"PCA start: {features} axes keep {share:.1%} of the variance of {basis.tiles} tiles")
    return basis


__all__ = [
    "PcaBasis", "TileSums", "mean_sums", "covariance_sums", "start_directions", "orthonormal",
    "basis_from_sums", "fit_pca", "sampler_batches", "DEFAULT_ITERATIONS", "DEFAULT_OVERSAMPLING", "PCA_STREAM",
]
