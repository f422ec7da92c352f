"""Spatial dose descriptors (features/spatial.py): phantoms whose answer is known by construction.

Voxel positions in the expectations come from SimpleITK's own ``TransformIndexToPhysicalPoint``, not from
the library's transform, so a wrong direction-matrix convention cannot pass by agreeing with itself.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from DeepDosimetricsLib.cli import main
from DeepDosimetricsLib.data.geometry import Geometry
from DeepDosimetricsLib.data.patient import Patient
from DeepDosimetricsLib.features.dosimetrics import image_dvh, metric_names, patient_dvh
from DeepDosimetricsLib.features.spatial import (
    SUBVOLUMES,
    spatial_descriptors,
    spatial_dose_metrics,
    spatial_metric_names,
    split_weights,
)
from DeepDosimetricsLib.features.tables import EMPTY_STRUCTURE, StructureSkipped
from DeepDosimetricsLib.runtime.errors import InputError

#: a direction matrix that permutes and flips the index axes: i -> +z (cranial), j -> +x (left), k -> -y
PERMUTED = (0.0, 1.0, 0.0,
            0.0, 0.0, -1.0,
            1.0, 0.0, 0.0)


def _grid(shape_zyx, spacing=(1.5, 2.0, 3.0), origin=(-20.0, 7.0, 31.0), direction=None) -> sitk.Image:
    image = sitk.Image([int(v) for v in shape_zyx[::-1]], sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _positions(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """LPS positions (N, 3) of the mask's voxels, in np.nonzero order, by SimpleITK."""
    z, y, x = np.nonzero(mask)
    return np.array([image.TransformIndexToPhysicalPoint((int(i), int(j), int(k))) for i, j, k in zip(x, y, z)])


def _lps_field(image: sitk.Image) -> np.ndarray:
    """(z, y, x, 3) LPS position of every voxel, by SimpleITK."""
    full = np.ones(image.GetSize()[::-1], dtype=np.uint8)
    return _positions(image, full).reshape(*full.shape, 3)


def test_names_and_parts():
    names = spatial_metric_names()
    assert len(names) == len(set(names)) == 15 + 9
    assert {s.name for s in SUBVOLUMES} >= {"cranial_half", "caudal_third", "ap_middle_third", "left_half"}
    assert "Dmean_cranial_half_Gy" in names and "dose_centroid_cc_mm" in names and "dose_gradient_ap_gy_per_mm" in names
    # fractional ties: 3 slices of 4 voxels into halves, the middle slice shared 1/2 - 1/2
    weights = split_weights(np.repeat([0.0, 3.0, 6.0], 4), 2)
    assert weights.sum(axis=1) == pytest.approx([6.0, 6.0])
    assert weights[0] == pytest.approx([1] * 4 + [0.5] * 4 + [0] * 4)
    # order does not matter
    order = np.random.default_rng(0).permutation(12)
    assert split_weights(np.repeat([0.0, 3.0, 6.0], 4)[order], 3) == pytest.approx(
        split_weights(np.repeat([0.0, 3.0, 6.0], 4), 3)[:, order])


@pytest.mark.parametrize("slices", [12, 9])
def test_dose_ramp_along_z_on_an_axial_anisotropic_grid(slices):
    """D = a + b z (z cranial, mm) over a box of ``slices`` slices: every descriptor follows in closed form."""
    a, b = 20.0, 0.5
    image = _grid((slices + 4, 10, 12), spacing=(1.5, 2.0, 3.0))
    mask = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
    mask[2:2 + slices, 3:7, 2:10] = 1  # 4 x 8 = 32 voxels per slice
    z = _lps_field(image)[..., 2]
    dose = a + b * z
    metrics = spatial_dose_metrics(dose, mask, Geometry.from_image(image))
    assert list(metrics) == spatial_metric_names()
    levels = np.sort(np.unique(z[mask > 0]))  # one z per slice, 3 mm apart
    assert len(levels) == slices
    per_level = a + b * levels

    def part_mean(first: float, last: float) -> float:
        """Mean dose of the slices covering the volume fraction [first, last) (whole slices count 1, cut ones a share)."""
        edges = np.arange(slices + 1) / slices
        share = np.clip(np.minimum(edges[1:], last) - np.maximum(edges[:-1], first), 0, None)
        return float(share @ per_level / share.sum())

    assert metrics["Dmean_caudal_half_Gy"] == pytest.approx(part_mean(0, 0.5))
    assert metrics["Dmean_cranial_half_Gy"] == pytest.approx(part_mean(0.5, 1))
    assert metrics["Dmean_cc_middle_third_Gy"] == pytest.approx(part_mean(1 / 3, 2 / 3))
    if slices == 12:  # whole slices: the cranial half is the top 6 slices, centred 7.5 mm above the middle
        middle = levels.mean()
        assert metrics["Dmean_cranial_half_Gy"] == pytest.approx(a + b * (middle + 9.0))
        assert metrics["Dmean_caudal_third_Gy"] == pytest.approx(a + b * (middle - 12.0))
    mean = a + b * levels.mean()
    for side in ("right_half", "left_half", "anterior_third", "posterior_third", "lr_middle_third"):
        assert metrics[f"Dmean_{side}_Gy"] == pytest.approx(mean)  # no dose variation across those axes
    # first moment: sum D (z - zc) / sum D = b var(z) / mean D, with var over the slice positions
    variance = 3.0 ** 2 * (slices ** 2 - 1) / 12.0
    assert metrics["dose_centroid_cc_mm"] == pytest.approx(b * variance / mean)
    assert metrics["dose_centroid_lr_mm"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["dose_centroid_ap_mm"] == pytest.approx(0.0, abs=1e-9)
    # second moment about the dose-weighted centroid
    centre = levels.mean() + metrics["dose_centroid_cc_mm"]
    assert metrics["dose_spread_cc_mm"] == pytest.approx(
        np.sqrt((per_level * (levels - centre) ** 2).sum() / per_level.sum()))
    assert metrics["dose_spread_lr_mm"] == pytest.approx(np.std(1.5 * np.arange(8)))  # uniform across x
    assert metrics["dose_spread_ap_mm"] == pytest.approx(np.std(2.0 * np.arange(4)))
    assert metrics["dose_gradient_cc_gy_per_mm"] == pytest.approx(b)
    assert metrics["dose_gradient_lr_gy_per_mm"] == pytest.approx(0.0, abs=1e-9)


def test_ramp_on_a_permuted_and_flipped_direction_matrix():
    """The same ramp in LPS z on a grid whose index axes are permuted (i -> z, j -> x, k -> -y): the cuts
    follow the PATIENT axes, not the array's."""
    a, b = 40.0, -0.25
    image = _grid((8, 10, 14), spacing=(2.5, 1.0, 4.0), direction=PERMUTED)
    mask = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
    mask[1:7, 2:8, 1:13] = 1  # 12 levels of i (z, 2.5 mm apart), 6 of j (x), 6 of k (y)
    lps = _lps_field(image)
    dose = a + b * lps[..., 2]
    metrics = spatial_dose_metrics(dose, mask, Geometry.from_image(image))
    levels = np.sort(np.unique(lps[..., 2][mask > 0]))
    assert len(levels) == 12 and np.allclose(np.diff(levels), 2.5)
    assert metrics["Dmean_cranial_half_Gy"] == pytest.approx(a + b * levels[6:].mean())
    assert metrics["Dmean_caudal_third_Gy"] == pytest.approx(a + b * levels[:4].mean())
    assert metrics["Dmean_left_half_Gy"] == pytest.approx(a + b * levels.mean())
    assert metrics["dose_gradient_cc_gy_per_mm"] == pytest.approx(b)
    assert metrics["dose_gradient_ap_gy_per_mm"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["dose_centroid_cc_mm"] == pytest.approx(b * np.var(levels) / (a + b * levels.mean()))
    assert metrics["dose_spread_ap_mm"] == pytest.approx(np.std(4.0 * np.arange(6)))  # k spacing along y


def test_same_voxels_on_two_grids_give_the_same_descriptors():
    """One organ and dose sampled on an axial grid, then on a grid that stores the same voxels transposed and
    flipped (direction matrix and origin compensate): identical descriptors."""
    rng = np.random.default_rng(3)
    axial = _grid((7, 9, 11), spacing=(1.2, 2.0, 3.5))
    mask = (rng.random((7, 9, 11)) > 0.6).astype(np.uint8)
    dose = rng.uniform(0, 70, (7, 9, 11))
    expected = spatial_dose_metrics(dose, mask, Geometry.from_image(axial))
    # new array axes (z, y, x)_new = (x, z, y)_old reversed in the new x: i_new = n_y - 1 - y_old, j_new = z_old, k_new = x_old
    new_mask = np.flip(np.transpose(mask, (2, 0, 1)), axis=2)
    new_dose = np.flip(np.transpose(dose, (2, 0, 1)), axis=2)
    spacing_old = np.array(axial.GetSpacing())
    direction = np.column_stack([[0, -1, 0], [0, 0, 1], [1, 0, 0]]).astype(float)  # LPS of i_new, j_new, k_new
    origin = np.array(axial.GetOrigin()) + np.array([0.0, (9 - 1) * spacing_old[1], 0.0])
    other = _grid(new_mask.shape, spacing=(spacing_old[1], spacing_old[2], spacing_old[0]), origin=tuple(origin),
                  direction=tuple(direction.ravel()))
    assert np.allclose(np.sort(_positions(other, new_mask), axis=0), np.sort(_positions(axial, mask), axis=0))
    got = spatial_dose_metrics(new_dose, new_mask, Geometry.from_image(other))
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-9), name


def test_oblique_grid_linear_dose_gives_its_gradient_and_moments():
    """A linear dose D = a + g . p on a grid rotated 30 degrees: the gradient is g, the centroid offset
    g Cov(p) / mean D (positions from SimpleITK)."""
    angle = np.radians(30)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    image = _grid((10, 12, 9), spacing=(2.0, 1.5, 3.0), direction=tuple(rotation.ravel()))
    rng = np.random.default_rng(1)
    mask = (rng.random((10, 12, 9)) > 0.5).astype(np.uint8)
    g, a = np.array([0.1, -0.2, 0.3]), 40.0
    lps = _lps_field(image)
    dose = a + lps @ g
    metrics = spatial_dose_metrics(dose, mask, Geometry.from_image(image))
    points = _positions(image, mask)
    values = a + points @ g
    centred = points - points.mean(axis=0)
    for number, axis in enumerate(("lr", "ap", "cc")):
        assert metrics[f"dose_gradient_{axis}_gy_per_mm"] == pytest.approx(g[number], abs=1e-9)
        assert metrics[f"dose_centroid_{axis}_mm"] == pytest.approx((values @ centred[:, number]) / values.sum())


def test_point_dose_offset_is_the_points_offset_from_the_centroid():
    image = _grid((10, 10, 10), spacing=(1.0, 2.0, 2.5), direction=PERMUTED)
    mask = np.zeros((10, 10, 10), dtype=np.uint8)
    mask[2:8, 3:6, 1:9] = 1  # 144 voxels
    points = _positions(image, mask)
    centroid = points.mean(axis=0)
    hottest = np.argmax(points[:, 2])  # a most cranial voxel
    dose = np.zeros(mask.shape)
    dose[tuple(np.array(np.nonzero(mask))[:, hottest])] = 60.0
    metrics = spatial_dose_metrics(dose, mask, Geometry.from_image(image))
    for number, axis in enumerate(("lr", "ap", "cc")):
        assert metrics[f"dose_centroid_{axis}_mm"] == pytest.approx(points[hottest, number] - centroid[number])
        assert metrics[f"dose_spread_{axis}_mm"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["Dmean_cranial_half_Gy"] == pytest.approx(60.0 / 72)  # the point lies in the cranial half
    assert metrics["Dmean_caudal_half_Gy"] == 0.0


def test_zero_dose_empty_mask_and_bad_shapes():
    image = _grid((4, 4, 4))
    mask = np.ones((4, 4, 4), dtype=np.uint8)
    metrics = spatial_dose_metrics(np.zeros((4, 4, 4)), mask, Geometry.from_image(image))
    assert np.isnan(metrics["dose_centroid_cc_mm"]) and np.isnan(metrics["dose_spread_lr_mm"])
    assert metrics["Dmean_cranial_third_Gy"] == 0.0 and metrics["dose_gradient_cc_gy_per_mm"] == 0.0
    with pytest.raises(StructureSkipped, match=EMPTY_STRUCTURE):
        spatial_dose_metrics(np.ones((4, 4, 4)), np.zeros((4, 4, 4)), Geometry.from_image(image))
    with pytest.raises(InputError, match="shape"):
        spatial_dose_metrics(np.ones((4, 4, 5)), mask, Geometry.from_image(image))
    one = spatial_descriptors(np.array([5.0]), np.zeros((1, 3)))  # a single voxel: every part is that voxel
    assert one["Dmean_cranial_third_Gy"] == 5.0 and one["dose_spread_cc_mm"] == 0.0


def _ramp_patient(patient_id="ramp", direction=None) -> Patient:
    image = _grid((12, 10, 10), spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0), direction=direction)
    lps = _lps_field(image)
    dose = sitk.GetImageFromArray((10.0 + 2.0 * lps[..., 2] / 3.0).astype(np.float32))
    dose.CopyInformation(image)
    ct = sitk.GetImageFromArray(np.zeros((12, 10, 10), dtype=np.int16))
    ct.CopyInformation(image)
    box = np.zeros((12, 10, 10), dtype=np.uint8)
    box[2:10, 2:8, 3:7] = 1
    organ = sitk.GetImageFromArray(box)
    organ.CopyInformation(image)
    return Patient.from_images(patient_id, ct, {"Organ": organ}, dose=dose)


def test_patient_and_image_dvh_with_spatial():
    patient = _ramp_patient()
    plain = patient_dvh(patient).metrics
    assert list(plain["feature"]) == metric_names()
    table = patient_dvh(patient, spatial=True).metrics.set_index("feature")["value"]
    assert list(table.index) == metric_names() + spatial_metric_names()
    expected = spatial_dose_metrics(patient.dose(), patient.structure("Organ"), patient.geometry)
    assert table["Dmean_cranial_half_Gy"] == pytest.approx(expected["Dmean_cranial_half_Gy"])
    assert table["Dmean_cranial_half_Gy"] > table["Dmean_Gy"] > table["Dmean_caudal_half_Gy"]
    assert table["dose_gradient_cc_gy_per_mm"] == pytest.approx(2.0 / 3.0, rel=1e-5)
    images = image_dvh(patient.dose_image(), {"Organ": patient.structure_image("Organ")}, spatial=True)
    got = images.metrics.set_index("feature")["value"]
    for name in spatial_metric_names():
        assert got[name] == pytest.approx(table[name], rel=1e-6, abs=1e-9)


def test_dvh_command_spatial_option(tmp_path):
    for number in range(2):
        _write(_ramp_patient(f"p{number}"), tmp_path / "cohort" / f"p{number}")
    out = tmp_path / "dvh.csv"
    assert main(["dvh", "--cohort", str(tmp_path / "cohort"), "--spatial", "--quiet", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert set(spatial_metric_names()) <= set(table["feature"])
    assert (table.groupby("patient")["feature"].count() == len(metric_names()) + len(spatial_metric_names())).all()
    assert main(["dvh", "--cohort", str(tmp_path / "cohort"), "--quiet", "--out", str(out)]) == 0
    assert not set(spatial_metric_names()) & set(pd.read_csv(out)["feature"])


def _write(patient: Patient, folder) -> None:
    folder.mkdir(parents=True)
    sitk.WriteImage(patient.ct_image(), str(folder / "ct.nrrd"))
    sitk.WriteImage(patient.dose_image(), str(folder / "dose.nrrd"))
    for name in patient.structure_names:
        sitk.WriteImage(patient.structure_image(name), str(folder / f"{name}.nrrd"))


# ---------------------------------------------------------------------------------- deep features (issue 18)
class _StubCache:
    """Just what the per-part pooling reads of a cached patient: shape, geometry, read_tile of a mask."""

    def __init__(self, masks: dict, geometry: Geometry):
        self.masks, self.geometry = masks, geometry
        self.shape = next(iter(masks.values())).shape

    def read_tile(self, specs, start, size):
        z, y, x = start
        block = np.zeros(size, np.float32)
        part = self.masks[specs[0].name][z:z + size[0], y:y + size[1], x:x + size[2]]
        block[: part.shape[0], : part.shape[1], : part.shape[2]] = part
        return block[None]


def test_deep_codes_are_pooled_in_the_same_equal_volume_halves():
    """Two tiles stacked along z (no overlap), an organ whose caudal half lies in the first and cranial half in
    the second: the cranial-half pooled code is the second tile's code, the caudal one the first's, and the
    left/right halves (which both tiles hold alike) get the mean. On a flipped z axis the halves swap."""
    from DeepDosimetricsLib.deep.encode.encoder import part_pooled_features
    from DeepDosimetricsLib.deep.tiling import TileGrid

    organ = np.zeros((16, 8, 8), np.uint8)
    organ[4:12, 2:6, 2:6] = 1  # slices 4..7 in tile 0, 8..11 in tile 1
    grid = TileGrid.create((16, 8, 8), (8, 8, 8), 0.0)
    positions = [(0, 0, 0), (8, 0, 0)]
    codes = np.array([[1.0, -2.0], [3.0, 5.0]])
    axial = Geometry(size=(8, 8, 16), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0))
    pooled = part_pooled_features(_StubCache({"Organ": organ}, axial), grid, positions, codes, ["Organ"])["Organ"]
    assert set(pooled) == {"right_half", "left_half", "anterior_half", "posterior_half", "caudal_half", "cranial_half"}
    assert pooled["caudal_half"] == pytest.approx(codes[0]) and pooled["cranial_half"] == pytest.approx(codes[1])
    assert pooled["left_half"] == pytest.approx(codes.mean(axis=0))
    flipped = Geometry(size=(8, 8, 16), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 40.0),
                       direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))  # slice index runs caudally
    pooled = part_pooled_features(_StubCache({"Organ": organ}, flipped), grid, positions, codes, ["Organ"])["Organ"]
    assert pooled["cranial_half"] == pytest.approx(codes[0]) and pooled["caudal_half"] == pytest.approx(codes[1])


def test_decoded_dose_descriptor_names():
    from DeepDosimetricsLib.deep.encode.encoder import decoded_spatial

    names = decoded_spatial(dict.fromkeys(spatial_metric_names(), 0.0))
    assert "dose_rec_Dmean_cranial_half_Gy" in names and "dose_rec_centroid_cc_mm" in names
    assert "dose_rec_gradient_ap_gy_per_mm" in names and len(names) == len(spatial_metric_names())
