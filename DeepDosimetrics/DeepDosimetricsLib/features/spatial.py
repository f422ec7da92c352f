"""Spatial dose descriptors per structure: where the dose falls inside an organ, not only how much.

A DVH forgets where the dose is. These descriptors keep the coarse pattern, in PHYSICAL patient axes (LPS
millimetres from the image's origin, spacing and direction matrix, so an oblique or permuted grid gives the
same numbers as an axial one):

======  =====================  ==========================================
axis    LPS coordinate         positive towards
======  =====================  ==========================================
``lr``  x                      the patient's LEFT (negative: right)
``ap``  y                      POSTERIOR (negative: anterior)
``cc``  z                      CRANIAL / superior (negative: caudal)
======  =====================  ==========================================

For the N voxels of a structure, with positions p_i (mm) and doses D_i (Gy), every voxel counting with the
same volume:

- **Sub-volume means** ``Dmean_<part>_<half|third>_Gy``: the organ is cut along one axis into 2 (halves) or 3
  (thirds) parts of EQUAL VOLUME, by the voxel-count quantiles of the coordinate (not by cutting its extent
  into equal lengths), and each part's mean dose is reported: ``right/left``, ``anterior/posterior``,
  ``caudal/cranial`` halves; ``right / lr_middle / left``, ``anterior / ap_middle / posterior``,
  ``caudal / cc_middle / cranial`` thirds. Voxels sort by their coordinate; part j of k holds the cumulative
  volume [j N/k, (j+1) N/k). Voxels that share a coordinate (a slice, on an axial grid) are split between
  two parts FRACTIONALLY, all with the same weight: with w_ij the share of voxel i in part j,
  ``Dmean_j = sum_i w_ij D_i / sum_i w_ij`` and ``sum_i w_ij = N / k`` exactly. Why quantiles: every part
  holds the same volume (a mean over N/k voxels, as steady for a tapered parotid tail as for its body), no
  part is ever empty, one stray contour voxel cannot move the cuts, and the part is a statement about the
  organ's volume ("the cranial third of the gland"), like D_x, whatever its shape or the voxel size. Cutting
  the extent would make a part's volume, and the noise of its mean, depend on the organ's shape.
- **Dose-weighted centroid offset** ``dose_centroid_<axis>_mm``: ``sum_i D_i (p_i - c) / sum_i D_i``, with
  ``c = sum_i p_i / N`` the organ's geometric centroid: how far, and which way, the dose's centre of mass lies
  from the organ's centre (the first moment of the dose relative to the centroid). 0 for a uniform dose.
  Doses below 0 count as 0 (a weight).
- **Dose-weighted spread** ``dose_spread_<axis>_mm``: ``sqrt(sum_i D_i (p_i - c_D)^2 / sum_i D_i)`` with
  ``c_D = c + offset`` the dose-weighted centroid (the second central moment): how concentrated the dose is.
  For a uniform dose it is the organ's own standard deviation along that axis; for a point dose, 0.
- **Dose gradient** ``dose_gradient_<axis>_gy_per_mm``: the least-squares slope g of
  ``D_i = a + g . (p_i - c)`` fitted jointly over the three axes (Gy/mm): the mean dose gradient across the
  organ (an axis along which the organ is one voxel thick gets 0).

Offsets and spreads need some dose: a structure whose voxels all have D <= 0 gets NaN for them. A
structure with fewer voxels than parts still gets its parts (fractional voxels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

#: patient axes: name, LPS column, the names of the negative and positive ends
AXES: Tuple[Tuple[str, str, str], ...] = (("lr", "right", "left"), ("ap", "anterior", "posterior"),
                                          ("cc", "caudal", "cranial"))
#: numbers of equal-volume parts the organ is cut into along each axis
PARTS = (2, 3)
#: coordinates equal to this many mm are ties (one slice): rounding noise of an oblique direction matrix
_TIE_DECIMALS = 6


@dataclass(frozen=True)
class SubVolume:
    """One equal-volume part of a structure: the ``index``-th of ``parts`` along axis ``axis`` (0 lr, 1 ap, 2 cc)."""

    axis: int
    parts: int
    index: int

    @property
    def name(self) -> str:
        """``cranial_half``, ``lr_middle_third``, ...: the part's name in feature names."""
        axis, negative, positive = AXES[self.axis]
        if self.index == 0:
            where = negative
        elif self.index == self.parts - 1:
            where = positive
        else:
            where = f"{axis}_middle"
        return f"{where}_{'half' if self.parts == 2 else 'third'}"


#: every sub-volume, in table order (halves of each axis, then thirds)
SUBVOLUMES: Tuple[SubVolume, ...] = tuple(
    SubVolume(axis, parts, index) for parts in PARTS for axis in range(3) for index in range(parts)
)


def subvolume_names(parts: Sequence[int] = PARTS) -> List[str]:
    """The sub-volume names (``right_half``, ...) cut into ``parts``."""
    return [s.name for s in SUBVOLUMES if s.parts in parts]


def spatial_metric_names() -> List[str]:
    """The names of the spatial descriptors, in table order."""
    names = [f"Dmean_{name}_Gy" for name in subvolume_names()]
    for kind, unit in (("centroid", "mm"), ("spread", "mm"), ("gradient", "gy_per_mm")):
        names += [f"dose_{kind}_{axis}_{unit}" for axis, _, _ in AXES]
    return names


def voxel_positions(mask: np.ndarray, geometry, start_zyx: Sequence[int] = (0, 0, 0)
                    ) -> Tuple[Tuple[np.ndarray, ...], np.ndarray]:
    """The (z, y, x) indices of the mask's voxels (``np.nonzero`` order) and their LPS positions (N, 3) in mm.

    ``geometry``: a :class:`~DeepDosimetricsLib.data.geometry.Geometry` (or anything with ``ijk_to_lps()``)
    of the grid; ``start_zyx``: where the mask's first voxel lies on it (a tile of a larger grid).
    """
    index = np.nonzero(np.asarray(mask))
    return index, index_positions(np.column_stack(index) + np.asarray(start_zyx), geometry)


def index_positions(zyx: np.ndarray, geometry) -> np.ndarray:
    """LPS positions (N, 3) in mm of voxel indices (N, 3) in (z, y, x) order on ``geometry``'s grid."""
    zyx = np.asarray(zyx, dtype=np.float64).reshape(-1, 3)
    matrix = geometry.ijk_to_lps()
    return np.ascontiguousarray(zyx[:, ::-1]) @ matrix[:3, :3].T + matrix[:3, 3]  # a contiguous copy: BLAS, 10x faster


def split_weights(coordinate: np.ndarray, parts: int) -> np.ndarray:
    """Equal-volume parts along one coordinate: (parts, N) weights w_ij in [0, 1], each row summing to N/parts.

    Voxels sort by ``coordinate`` (mm); part j holds the cumulative volume [j N/parts, (j+1) N/parts). Voxels
    with the same coordinate (to 1e-6 mm) share a part's boundary fractionally, with equal weights, so the
    result does not depend on the voxels' order.
    """
    values = np.round(np.asarray(coordinate, dtype=np.float64), _TIE_DECIMALS)
    count = values.size
    weights = np.zeros((parts, count))
    if count == 0:
        return weights
    import pandas as pd

    # the tie groups in coordinate order, as np.unique(return_inverse, return_counts) gives them, by hashing:
    # O(N) instead of a sort of N (a full-size lung has millions of voxels and a few hundred distinct values)
    inverse, _ = pd.factorize(values, sort=True)
    sizes = np.bincount(inverse)
    end = np.cumsum(sizes).astype(np.float64)  # cumulative volume at the end of each tie group
    start = end - sizes
    for j in range(parts):
        low, high = j * count / parts, (j + 1) * count / parts
        overlap = np.clip(np.minimum(end, high) - np.maximum(start, low), 0.0, None)
        weights[j] = (overlap / sizes)[inverse]
    return weights


def iter_subvolume_weights(positions: np.ndarray) -> Iterator[Tuple[SubVolume, np.ndarray]]:
    """Every sub-volume of :data:`SUBVOLUMES` with its (N,) voxel weights, from the LPS positions (N, 3).

    One axis's parts are computed at a time, so memory stays a few N-vectors for a large structure. The one
    definition of the sub-volumes: the DVH descriptors and the deep features' per-part pooling both use it.
    """
    for parts in PARTS:
        for axis in range(3):
            weights = split_weights(positions[:, axis], parts)
            for index in range(parts):
                yield SubVolume(axis, parts, index), weights[index]


def spatial_descriptors(values: np.ndarray, positions: np.ndarray) -> Dict[str, float]:
    """The spatial descriptors (module doc) of voxel values (N,) at LPS positions (N, 3) mm.

    ``values`` is a dose in Gy (any per-voxel quantity works: the names say Gy). N must be at least 1.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if values.size == 0 or values.size != positions.shape[0]:
        raise ValueError(f"spatial descriptors need N >= 1 values at N positions, got {values.size} and "
                         f"{positions.shape[0]}")
    out: Dict[str, float] = {}
    for subvolume, weights in iter_subvolume_weights(positions):
        out[f"Dmean_{subvolume.name}_Gy"] = float(weights @ values / weights.sum())
    centred = positions - positions.mean(axis=0)
    mass = np.clip(values, 0.0, None)
    total = mass.sum()
    if total > 0:
        offset = mass @ centred / total
        spread = np.sqrt(np.clip(mass @ (centred - offset) ** 2 / total, 0.0, None))
    else:
        offset = spread = np.full(3, np.nan)
    gradient = _gradient(values, centred)
    for number, (axis, _, _) in enumerate(AXES):
        out[f"dose_centroid_{axis}_mm"] = float(offset[number])
    for number, (axis, _, _) in enumerate(AXES):
        out[f"dose_spread_{axis}_mm"] = float(spread[number])
    for number, (axis, _, _) in enumerate(AXES):
        out[f"dose_gradient_{axis}_gy_per_mm"] = float(gradient[number])
    return out


def spatial_dose_metrics(dose_gy: np.ndarray, mask: np.ndarray, geometry) -> Dict[str, float]:
    """The spatial descriptors of the voxels of ``mask`` (any non-zero value) in ``dose_gy`` (same (z, y, x)
    shape) on the grid ``geometry`` (spacing, origin and direction give each voxel's LPS position).

    Raises StructureSkipped for an empty mask, InputError for arrays of different shapes.
    """
    from DeepDosimetricsLib.features.tables import EMPTY_STRUCTURE, StructureSkipped
    from DeepDosimetricsLib.runtime.errors import InputError

    dose_gy, mask = np.asarray(dose_gy), np.asarray(mask)
    if dose_gy.shape != mask.shape:
        raise InputError(f"dose {dose_gy.shape} and mask {mask.shape} differ in shape; resample onto one grid")
    index, positions = voxel_positions(mask, geometry)
    if positions.shape[0] == 0:
        raise StructureSkipped(EMPTY_STRUCTURE, "no voxel inside the mask")
    return spatial_descriptors(dose_gy[index], positions)


def _gradient(values: np.ndarray, centred: np.ndarray) -> np.ndarray:
    """Least-squares slope (Gy/mm) of values on the centred positions; 0 along axes the organ does not span."""
    if values.size < 2:
        return np.zeros(3)
    solution, *_ = np.linalg.lstsq(centred, values - values.mean(), rcond=1e-10)
    return np.where(np.ptp(centred, axis=0) > 0, solution, 0.0)


__all__ = [
    "AXES",
    "PARTS",
    "SUBVOLUMES",
    "SubVolume",
    "iter_subvolume_weights",
    "spatial_descriptors",
    "spatial_dose_metrics",
    "index_positions",
    "spatial_metric_names",
    "split_weights",
    "subvolume_names",
    "voxel_positions",
]
