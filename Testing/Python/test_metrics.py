"""Reconstruction metrics on arrays with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from DeepDosimetricsLib.deep.encode import metrics
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def test_psnr_known_values_and_identical_volumes():
    reference = np.zeros((10, 8, 8), np.float32)
    test = reference + np.float32(0.1)  # MSE 0.01 -> 20 dB
    assert metrics.psnr(reference, test) == pytest.approx(20.0, abs=1e-5)
    assert metrics.psnr(reference, reference) == math.inf
    where = np.zeros(reference.shape, np.uint8)
    assert math.isnan(metrics.psnr(reference, test, where=where))  # nothing to measure
    where[2:4] = 1
    changed = test.copy()
    changed[5:] = 1.0
    assert metrics.psnr(reference, changed, where=where) == pytest.approx(20.0, abs=1e-5)


def test_psnr_and_ssim_equal_scikit_image_over_many_slabs():
    rng = np.random.default_rng(0)
    reference = rng.random((75, 20, 18)).astype(np.float32)  # more planes than one slab
    test = np.clip(reference + 0.05 * rng.standard_normal(reference.shape), 0, 1).astype(np.float32)
    assert metrics.psnr(reference, test) == pytest.approx(peak_signal_noise_ratio(reference, test, data_range=1.0), rel=1e-6)
    expected = structural_similarity(reference.astype(np.float64), test.astype(np.float64), data_range=1.0)
    assert metrics.ssim(reference, test) == pytest.approx(expected, rel=1e-9)
    assert metrics.ssim(reference, reference) == pytest.approx(1.0)


def test_dice_of_known_overlaps():
    a = np.zeros((10, 10, 10), np.uint8)
    b = np.zeros_like(a)
    a[0:4] = 1  # 400 voxels
    b[2:6] = 1  # 400 voxels, 200 shared
    assert metrics.dice(a, b) == pytest.approx(0.5)
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, np.zeros_like(a)) == 0.0
    assert metrics.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0  # both empty: they agree


def test_mean_absolute_error_inside_a_mask():
    reference = np.zeros((4, 4, 4), np.float32)
    test = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    where = np.zeros((4, 4, 4), bool)
    where[0, 0, :2] = True  # values 0 and 1
    assert metrics.mean_absolute_error(reference, test, where) == pytest.approx(0.5)
    assert metrics.mean_absolute_error(reference, test) == pytest.approx(31.5)


def test_dose_statistics_follow_the_dvh_conventions():
    doses = np.arange(1, 101, dtype=np.float32)  # 1..100 Gy, one voxel each
    values = metrics.dose_statistics(doses)
    assert values["Dmean"] == pytest.approx(50.5)
    assert values["D95"] == pytest.approx(6.0)  # the minimum dose of the hottest 95 voxels
    assert all(math.isnan(v) for v in metrics.dose_statistics(np.array([])).values())
