"""Dose-volume metrics (DVH) per structure, from the dose resampled on the CT grid.

Conventions (every voxel of the structure counts with the same volume, its dose the dose at its centre):

- ``volume_cc``: number of voxels x voxel volume (cm^3).
- ``Dmean_Gy``, ``Dmin_Gy``, ``Dmax_Gy``: mean, minimum and maximum voxel dose.
- ``V{x}Gy_pct`` (x = 5, 10, ..., 70): percentage of the structure volume receiving AT LEAST x Gy
  (voxels with dose >= x), no interpolation.
- ``D{x}_Gy`` (x = 98, 95, 50, 2): the minimum dose received by the hottest x% of the volume. The
  voxel doses are sorted from the hottest; the hottest x% is the first k = ceil(x N / 100) voxels (a
  partial voxel counts whole) and D_x is the dose of the k-th. No interpolation: D_x is the largest
  dose d with V(d) >= x%, so D_x and V_x agree exactly on the cumulative DVH below. For a uniform dose
  every D_x is that dose; for a dose varying continuously over the structure, D_x differs from the
  analytic value by at most one voxel's dose step (the voxels sample the dose at their centres).
- The cumulative DVH curve: volume percentage receiving at least d, for d = 0, w, 2w, ... (bin width w,
  0.1 Gy by default) up to the first multiple of w above the maximum dose (where it reaches 0%).

With ``spatial=True`` the table also holds the spatial descriptors of :mod:`.spatial` (mean dose in
equal-volume halves and thirds along the patient's axes, the dose-weighted centroid offset, spread and
gradient), computed in LPS millimetres on the same grid.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from DeepDosimetricsLib.features.spatial import spatial_dose_metrics
from DeepDosimetricsLib.features.tables import (
    EMPTY_STRUCTURE,
    StructureSkipped,
    WorkItem,
    in_patient_order,
    long_table,
    reason_row,
    run_items,
    value_rows,
    with_unreadable,
    work_items,
)
from DeepDosimetricsLib.runtime.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from DeepDosimetricsLib.data.cohort import Cohort
    from DeepDosimetricsLib.data.geometry import Geometry
    from DeepDosimetricsLib.data.patient import Patient

log = logging.getLogger(__name__)

#: D_x levels (% of the structure volume) and V_x levels (Gy) reported
D_LEVELS_PCT = (98, 95, 50, 2)
V_LEVELS_GY = tuple(range(5, 75, 5))
DEFAULT_BIN_WIDTH_GY = 0.1
CURVE_COLUMNS = ["patient", "structure", "dose_gy", "volume_pct"]
IMAGE = "dose"


def metric_names() -> List[str]:
    """The names of the metrics, in table order."""
    return (
        ["volume_cc", "Dmean_Gy", "Dmin_Gy", "Dmax_Gy"]
        + [f"D{level}_Gy" for level in D_LEVELS_PCT]
        + [f"V{level}Gy_pct" for level in V_LEVELS_GY]
    )


def dose_volume_metrics(dose_gy: np.ndarray, mask: np.ndarray, voxel_volume_cc: float) -> Dict[str, float]:
    """volume_cc, Dmean/Dmin/Dmax, D98/D95/D50/D2 (Gy) and V5..V70 (% of volume) of the voxels of
    ``mask`` (any non-zero value) in ``dose_gy`` (same shape). See the module doc for the conventions.

    Raises StructureSkipped for an empty mask, InputError for arrays of different shapes.
    """
    doses = _structure_doses(dose_gy, mask)
    metrics: Dict[str, float] = {
        "volume_cc": float(doses.size * voxel_volume_cc),
        "Dmean_Gy": float(doses.mean()),
        "Dmin_Gy": float(doses.min()),
        "Dmax_Gy": float(doses.max()),
    }
    ascending = np.sort(doses)
    for level in D_LEVELS_PCT:
        metrics[f"D{level}_Gy"] = dose_to_hottest(ascending, level)
    for level in V_LEVELS_GY:
        metrics[f"V{level}Gy_pct"] = float(_volume_pct_at_least(ascending, np.asarray([float(level)]))[0])
    return metrics


def dose_to_hottest(ascending_doses: np.ndarray, volume_pct: float) -> float:
    """D_x: the minimum dose of the hottest ``volume_pct`` % of the voxels (doses sorted ascending)."""
    count = ascending_doses.size
    # round first so that 95 % of 100 voxels is 95 voxels, not ceil(95.00000000000001) = 96
    hottest = int(np.ceil(round(volume_pct * count / 100.0, 9)))
    hottest = min(max(hottest, 1), count)
    return float(ascending_doses[count - hottest])


def cumulative_dvh(
    dose_gy: np.ndarray, mask: np.ndarray, bin_width_gy: float = DEFAULT_BIN_WIDTH_GY
) -> Tuple[np.ndarray, np.ndarray]:
    """The cumulative DVH: dose axis 0, w, 2w, ... (Gy) and the % of the structure volume receiving at
    least each dose (100 at 0 Gy, 0 at the last point, which lies above the maximum dose)."""
    if not bin_width_gy > 0:
        raise InputError(f"DVH bin width must be positive, got {bin_width_gy} Gy")
    doses = _structure_doses(dose_gy, mask)
    points = int(np.floor(max(float(doses.max()), 0.0) / bin_width_gy)) + 2
    axis = np.arange(points, dtype=np.float64) * bin_width_gy
    return axis, _volume_pct_at_least(np.sort(doses), axis)


@dataclass
class DvhTables:
    """DVH results: the long metrics table and, when asked for, the long curves table."""

    metrics: pd.DataFrame
    curves: Optional[pd.DataFrame] = None


def image_dvh(
    dose: sitk.Image,
    masks: Mapping[str, Union[sitk.Image, Tuple[sitk.Image, int]]],
    curves: bool = False,
    bin_width_gy: float = DEFAULT_BIN_WIDTH_GY,
    patient_id: str = "",
    spatial: bool = False,
) -> DvhTables:
    """DVH metrics (and curves) of several masks over one dose image in Gy, e.g. MRML nodes converted to
    SimpleITK. ``masks`` maps a structure name to a mask on the dose grid, or to ``(labelmap, label)``.
    An empty mask gives a reason row. ``spatial``: add the spatial descriptors (:mod:`.spatial`)."""
    from DeepDosimetricsLib.data.geometry import Geometry

    dose_array = sitk.GetArrayFromImage(dose)
    geometry = Geometry.from_image(dose)
    voxel_volume_cc = float(np.prod(dose.GetSpacing())) / 1000.0
    rows: List[tuple] = []
    for name, source in masks.items():
        mask_image, label = source if isinstance(source, tuple) else (source, None)
        if mask_image.GetSize() != dose.GetSize():
            raise InputError(
                f"structure {name}: mask size {mask_image.GetSize()} differs from the dose grid {dose.GetSize()}; "
                "resample it onto the dose first"
            )
        mask_array = sitk.GetArrayFromImage(mask_image)
        mask = mask_array == label if label is not None else mask_array != 0
        try:
            metrics = dose_volume_metrics(dose_array, mask, voxel_volume_cc)
            if spatial:
                metrics.update(spatial_dose_metrics(dose_array, mask, geometry))
        except StructureSkipped as skip:
            rows.append(reason_row(patient_id, name, IMAGE, skip))
            continue
        rows += value_rows(patient_id, name, IMAGE, metrics)
        if curves:
            axis, volume = cumulative_dvh(dose_array, mask, bin_width_gy)
            rows.append((_CURVE, patient_id, name, axis, volume))
    return _split(rows, [patient_id], curves)


def patient_dvh(
    patient: Patient,
    structures: Optional[Sequence[str]] = None,
    curves: bool = False,
    bin_width_gy: float = DEFAULT_BIN_WIDTH_GY,
    spatial: bool = False,
) -> DvhTables:
    """DVH metrics (long table: patient, structure, image=dose, feature, value, reason) of one patient's
    structures, and their curves (patient, structure, dose_gy, volume_pct) when ``curves``.

    Args:
        patient: the patient; its dose (Gy) is taken on the CT grid.
        structures: structure names (case-insensitive); default every structure.
        curves: also compute the cumulative DVH curves.
        bin_width_gy: dose bin width of the curves, in Gy.
        spatial: also the spatial descriptors (sub-volume means, dose centroid offset, spread, gradient;
            :mod:`.spatial`).

    Returns:
        ``DvhTables``: ``metrics`` (volume_cc, Dmean/Dmin/Dmax and D98..D2 in Gy, V5..V70 in % of the
        structure's volume; see :func:`dose_volume_metrics`) and ``curves`` (or None).
    """
    return _dvh_of([patient], structures, jobs=1, quiet=True, curves=curves, bin_width_gy=bin_width_gy,
                   spatial=spatial)


def cohort_dvh(
    cohort: Union[Cohort, str, Path],
    structures: Optional[Sequence[str]] = None,
    jobs: int = 1,
    quiet: bool = False,
    curves: bool = False,
    bin_width_gy: float = DEFAULT_BIN_WIDTH_GY,
    spatial: bool = False,
) -> DvhTables:
    """DVH metrics (and curves) of every patient of a cohort, in parallel over (patient, structure).

    Args:
        cohort: a ``Cohort`` or its folder.
        structures: structure names (case-insensitive); default each patient's every structure.
        jobs: worker processes (1: in this process).
        quiet: no progress bar.
        curves: also compute the cumulative DVH curves (patient, structure, dose_gy, volume_pct).
        bin_width_gy: dose bin width of the curves, in Gy.
        spatial: also the spatial descriptors (:mod:`.spatial`).

    Returns:
        ``DvhTables`` (the metrics long table, the curves or None); see :func:`patient_dvh`.

    Raises:
        InputError: an unreadable cohort.
    """
    from DeepDosimetricsLib.data.cohort import Cohort

    if not isinstance(cohort, Cohort):
        cohort = Cohort.open(cohort)
    tables = _dvh_of(list(cohort), structures, jobs, quiet, curves, bin_width_gy, spatial)
    tables.metrics = with_unreadable(tables.metrics, cohort, IMAGE)
    return tables


# ---------------------------------------------------------------------------------- internals
def _dvh_of(
    patients: List[Patient],
    structures: Optional[Sequence[str]],
    jobs: int,
    quiet: bool,
    curves: bool,
    bin_width_gy: float,
    spatial: bool = False,
) -> DvhTables:
    """Metrics (and curves) of some patients' structures (the work of patient_ and cohort_dvh)."""
    items, rows = work_items(patients, structures, need_dose=True, image=IMAGE)
    rows += run_items(
        items,
        functools.partial(_dvh_item, curves=curves, bin_width_gy=bin_width_gy, spatial=spatial),
        patients={p.id: p for p in patients},
        jobs=jobs,
        quiet=quiet,
        desc="dvh",
        image=IMAGE,
    )
    return _split(rows, [p.id for p in patients], curves)


def _structure_doses(dose_gy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    dose_gy = np.asarray(dose_gy)
    mask = np.asarray(mask)
    if dose_gy.shape != mask.shape:
        raise InputError(
            f"dose {dose_gy.shape} and mask {mask.shape} differ in shape; resample onto one grid"
        )
    doses = dose_gy[mask != 0].astype(np.float64)
    if doses.size == 0:
        raise StructureSkipped(EMPTY_STRUCTURE, "no voxel inside the mask")
    return doses


def _volume_pct_at_least(ascending: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """% of the sorted doses that are >= each level."""
    below = np.searchsorted(ascending, levels, side="left")
    return 100.0 * (ascending.size - below) / ascending.size


#: marker of a curve row in the worker's output (kept apart from the long rows by ``_split``)
_CURVE = "__curve__"


def _dvh_item(item: WorkItem, patient: Patient, curves: bool, bin_width_gy: float,
              spatial: bool = False) -> List[tuple]:
    """Worker: metrics (and curve) of one structure (loads the dose and that mask only)."""
    from DeepDosimetricsLib.features.tables import PATIENT_CACHE

    dose, voxel_volume_cc, geometry = PATIENT_CACHE.derived_value("dose_array", lambda: _dose_array(patient))
    mask = sitk.GetArrayFromImage(patient.structure_image(item.structure))
    metrics = dose_volume_metrics(dose, mask, voxel_volume_cc)
    if spatial:
        metrics.update(spatial_dose_metrics(dose, mask, geometry))
    coverage = PATIENT_CACHE.derived_value("dose_coverage", patient.dose_coverage)
    outside = int(np.count_nonzero(mask[coverage == 0]))
    if outside:  # those voxels got 0 Gy as a fill, not as a dose: say so in the table and the log
        metrics["outside_dose_grid_pct"] = 100.0 * outside / int(np.count_nonzero(mask))
        log.warning(
            "patient %s: %.1f%% of %s lies outside the dose grid (counted as 0 Gy)",
            patient.id, metrics["outside_dose_grid_pct"], item.structure,
        )
    rows = value_rows(patient.id, item.structure, IMAGE, metrics)
    if curves:
        axis, volume = cumulative_dvh(dose, mask, bin_width_gy)
        rows.append((_CURVE, patient.id, item.structure, axis, volume))
    return rows


def _dose_array(patient: Patient) -> Tuple[np.ndarray, float, Geometry]:
    """The patient's dose on the CT grid as an array (the image itself is not kept), the voxel cc and the grid."""
    from DeepDosimetricsLib.data.geometry import Geometry

    image = patient.dose_image()
    return sitk.GetArrayFromImage(image), float(np.prod(image.GetSpacing())) / 1000.0, Geometry.from_image(image)


def _split(rows: List[tuple], patient_ids: List[str], curves: bool) -> DvhTables:
    """Separate metric rows from curve rows and build both tables."""
    import pandas as pd

    metric_rows = [row for row in rows if row[0] != _CURVE]
    curve_rows = [row for row in rows if row[0] == _CURVE]
    metrics = long_table(in_patient_order(metric_rows, patient_ids))
    if not curves:
        return DvhTables(metrics)
    order = {pid: index for index, pid in enumerate(patient_ids)}
    curve_rows.sort(key=lambda row: order.get(row[1], len(order)))
    parts = [
        pd.DataFrame({"patient": pid, "structure": name, "dose_gy": axis, "volume_pct": volume})
        for _, pid, name, axis, volume in curve_rows
    ]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=CURVE_COLUMNS)
    return DvhTables(metrics, table)
