"""Channels: window values at known HU, labels that round-trip, channel sets, clear errors, inverse."""

import numpy as np
import pytest
from DeepDosimetricsLib.deep.channels import (
    CHANNEL_SETS,
    DEFAULT_DOSE_MAX_GY,
    WINDOW_PRESETS,
    ChannelSpec,
    compute_channels,
    parse_channels,
    to_units,
    window_values,
)
from DeepDosimetricsLib.runtime.errors import InputError


def test_soft_tissue_window_at_known_hu():
    hu = np.array([-1024, -160, -60, 40, 140, 240, 3071], dtype=np.int16)
    values = window_values(hu, 40, 400)
    np.testing.assert_allclose(values, [0, 0, 0.25, 0.5, 0.75, 1, 1], atol=1e-6)
    assert values.dtype == np.float32


@pytest.mark.parametrize("name", ["lung", "soft_tissue", "bone", "brain", "full"])
def test_every_preset_maps_its_limits_to_0_and_1(name):
    level, width = WINDOW_PRESETS[name]
    hu = np.array([level - width / 2, level, level + width / 2, level - width, level + width])
    (spec,) = parse_channels(f"window:{name}")
    values = compute_channels([spec], hu)[0]
    np.testing.assert_allclose(values, [0, 0.5, 1, 0, 1], atol=1e-6)


def test_full_range_window_spans_stored_hu():
    (spec,) = parse_channels("window:full")
    assert (spec.lower_hu, spec.upper_hu) == (-1024, 3071)


def test_channel_sets():
    assert [s.label for s in parse_channels("default")] == ["window:soft_tissue", "mask:PTV", "dose"]
    full = parse_channels("full")
    assert len(full) == 7
    assert [s.kind for s in full] == ["window"] * 5 + ["mask", "dose"]
    assert set(CHANNEL_SETS) >= {"default", "full"}


@pytest.mark.parametrize(
    "text",
    ["window:lung,window:bone,mask:PTV,dose", "window:-200/600,dose:prescription", "dose:70,mask:Heart",
     "full", "default"],
)
def test_labels_round_trip(text):
    specs = parse_channels(text)
    assert parse_channels(",".join(spec.label for spec in specs)) == specs
    assert parse_channels([spec.label for spec in specs]) == specs


def test_aliases_and_custom_windows():
    (mediastinum,) = parse_channels("window:Mediastinum")
    assert mediastinum == parse_channels("window:soft_tissue")[0]
    (custom,) = parse_channels("window:-200/600")
    assert (custom.level, custom.width, custom.label) == (-200, 600, "window:-200/600")
    assert parse_channels("dose")[0].dose_max_gy == DEFAULT_DOSE_MAX_GY
    assert parse_channels("dose:80")[0].label == "dose"
    assert parse_channels("dose:prescription")[0].dose_max_gy is None


@pytest.mark.parametrize(
    "text, words",
    [("window:lungs", "unknown window 'lungs'"), ("mask:", "names no structure"), ("ct", "unknown channel 'ct'"),
     ("dose:max", "unknown dose scaling"), ("window:40/0", "width must be positive"), ("", "no channels"),
     ("dose,dose:80", "more than once"), ("dose:-5", "positive")],
)
def test_bad_channels_raise_clear_errors(text, words):
    with pytest.raises(InputError, match=words):
        parse_channels(text)


def test_compute_channels_masks_dose_and_clipping():
    hu = np.array([[-160, 40, 240, 500]], dtype=np.int16)
    ptv = np.array([[0, 1, 1, 0]], dtype=np.uint8)
    dose = np.array([[0, 40, 80, 100]], dtype=np.float16)
    values = compute_channels(parse_channels("default"), hu, {"PTV": ptv}, dose)
    assert values.shape == (3, 1, 4) and values.dtype == np.float32
    np.testing.assert_allclose(values[0], [[0, 0.5, 1, 1]])
    np.testing.assert_array_equal(values[1], ptv)
    np.testing.assert_allclose(values[2], [[0, 0.5, 1, 1]])
    by_prescription = compute_channels(parse_channels("dose:prescription"), None, None, dose, prescription_gy=70)
    np.testing.assert_allclose(by_prescription[0], [[0, 40 / 70, 1, 1]], rtol=1e-6)


def test_compute_channels_missing_inputs():
    hu = np.zeros((2, 2), np.int16)
    with pytest.raises(InputError, match="no structure PTV"):
        compute_channels(parse_channels("mask:PTV"), hu, {})
    with pytest.raises(InputError, match="no dose"):
        compute_channels(parse_channels("dose"), hu)
    with pytest.raises(InputError, match="prescription"):
        compute_channels(parse_channels("dose:prescription"), None, None, np.zeros((2, 2)))


def test_to_units_inverts_within_the_window():
    hu = np.array([-160.0, -60.0, 40.0, 240.0])
    (spec,) = parse_channels("window:soft_tissue")
    np.testing.assert_allclose(to_units(spec, compute_channels([spec], hu)[0]), hu, atol=1e-3)
    (dose,) = parse_channels("dose:70")
    np.testing.assert_allclose(to_units(dose, np.array([0.5, 1.0])), [35.0, 70.0])
    (rx,) = parse_channels("dose:prescription")
    np.testing.assert_allclose(to_units(rx, np.array([0.5]), prescription_gy=60), [30.0])
    assert to_units(ChannelSpec("mask", "PTV"), np.array([1.5, -0.2])).tolist() == [1.0, 0.0]
