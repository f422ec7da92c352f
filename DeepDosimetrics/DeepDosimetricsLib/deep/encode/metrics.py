"""Reconstruction quality: PSNR and SSIM on the [0, 1] scale, errors in HU and Gy, Dice of masks.

Every function reads its volumes in z-slabs, so a full-size 512x512x350 volume costs a few slabs of
float64 at a time, never whole-volume float64 copies. SSIM is scikit-image's (7-voxel uniform window,
the defaults), computed slab by slab with a halo so that the result equals one call on the whole
volume; PSNR follows ``skimage.metrics.peak_signal_noise_ratio`` (``inf`` for identical volumes).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

#: planes per slab for slab-wise metrics
SLAB = 32
#: scikit-image's default SSIM window
SSIM_WINDOW = 7
#: voxels of one SSIM slab (scikit-image keeps about a dozen float64 copies of it)
SSIM_SLAB_VOXELS = 2_000_000


def _slabs(depth: int, slab: int = SLAB):
    for first in range(0, depth, slab):
        yield first, min(first + slab, depth)


def mean_squared_error(reference: np.ndarray, test: np.ndarray, where: Optional[np.ndarray] = None) -> float:
    """Mean squared difference (over ``where`` when given); NaN when ``where`` is empty."""
    total, count = 0.0, 0
    for z0, z1 in _slabs(reference.shape[0]):
        difference = np.asarray(test[z0:z1], np.float64) - np.asarray(reference[z0:z1], np.float64)
        if where is not None:
            difference = difference[np.asarray(where[z0:z1]) != 0]
        total += float(np.dot(difference.ravel(), difference.ravel()))
        count += difference.size
    return total / count if count else math.nan


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float = 1.0, where: Optional[np.ndarray] = None) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical volumes, NaN for an empty ``where``."""
    error = mean_squared_error(reference, test, where)
    if math.isnan(error):
        return math.nan
    if error == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / error)


def ssim(reference: np.ndarray, test: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity of two 3D volumes (scikit-image's, equal to one whole-volume call)."""
    from skimage.metrics import structural_similarity

    if reference.shape != test.shape:
        raise ValueError(f"shapes differ: {reference.shape} and {test.shape}")
    if min(reference.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW} voxels along each axis, got {reference.shape}")
    pad = (SSIM_WINDOW - 1) // 2
    depth = reference.shape[0]
    total, count = 0.0, 0
    # the mean runs over the map without a pad-wide border (as scikit-image crops it)
    planes = max(8, SSIM_SLAB_VOXELS // (reference.shape[1] * reference.shape[2]))
    for z0, z1 in _slabs(depth - 2 * pad, planes):
        z0, z1 = z0 + pad, z1 + pad  # planes whose SSIM this slab gives
        lo, hi = max(z0 - pad, 0), min(z1 + pad, depth)  # with a halo
        _, full = structural_similarity(
            np.asarray(reference[lo:hi], np.float64), np.asarray(test[lo:hi], np.float64),
            data_range=data_range, full=True,
        )
        inner = full[z0 - lo : z1 - lo, pad:-pad, pad:-pad]
        total += float(inner.sum(dtype=np.float64))
        count += inner.size
    return total / count


def mean_absolute_error(reference: np.ndarray, test: np.ndarray, where: Optional[np.ndarray] = None) -> float:
    """Mean absolute difference (over ``where`` when given); NaN when ``where`` is empty."""
    total, count = 0.0, 0
    for z0, z1 in _slabs(reference.shape[0]):
        difference = np.abs(np.asarray(test[z0:z1], np.float64) - np.asarray(reference[z0:z1], np.float64))
        if where is not None:
            difference = difference[np.asarray(where[z0:z1]) != 0]
        total += float(difference.sum())
        count += difference.size
    return total / count if count else math.nan


def dice(reference: np.ndarray, test: np.ndarray) -> float:
    """Dice coefficient of two masks (non-zero = inside); 1.0 when both are empty."""
    both, sizes = 0, 0
    for z0, z1 in _slabs(reference.shape[0]):
        a = np.asarray(reference[z0:z1]) != 0
        b = np.asarray(test[z0:z1]) != 0
        both += int(np.count_nonzero(a & b))
        sizes += int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if sizes == 0 else 2.0 * both / sizes


def dose_statistics(doses_gy: np.ndarray) -> dict:
    """D95 and Dmean (Gy) of the doses of a structure's voxels (1D), by the project's DVH conventions."""
    doses = np.asarray(doses_gy, np.float64).ravel()
    if doses.size == 0:
        return {"D95": math.nan, "Dmean": math.nan}
    from DeepDosimetricsLib.features.dosimetrics import dose_volume_metrics

    values = dose_volume_metrics(doses, np.ones(doses.shape, np.uint8), 1.0)
    return {"D95": float(values["D95_Gy"]), "Dmean": float(values["Dmean_Gy"])}
