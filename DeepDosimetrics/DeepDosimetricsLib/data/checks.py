"""Value checks of images and dose where they are read (Patient, importers), by modality.

Each check either raises an InputError that names the file, the problem and the voxel count (the data
are wrong: nothing is computed from them), or returns a warning (the data are unusual but may be right:
the values are computed and the warning goes to the log and to the ``reason`` of the result rows).
The HU checks apply to a CT only: an MR, a PET or another image is checked on its own scale, or not at
all where no check is safe (the modality: :mod:`DeepDosimetricsLib.data.modality`).

=====================================  ==========  ===================================================
check                                  outcome     why
=====================================  ==========  ===================================================
any image or dose with NaN/infinite    error       no number can be computed from them
voxels
dose below -0.01 Gy                    error       a dose cannot be negative: a wrong sign or encoding
dose maximum over 200 Gy               error       looks like cGy: every metric would be 100x too big
                                                   (``$DEEPDOSIMETRICS_MAX_DOSE_GY`` raises the limit)
CT with no voxel below 0 and a         error       looks like stored values without RescaleSlope/
maximum over 3000                                  Intercept (air would be 0 instead of -1000 HU)
empty image (a zero size)              error       nothing to measure
dose between -0.01 and 0 Gy            warning     rounding noise of a planning system
PET (PT) with negative voxels          warning     activity cannot be negative, but reconstructions
                                                   (FBP) leave negative noise: computed and flagged
constant image or dose (also 0 Gy      warning     legal but unusual (test phantoms, an unplanned
everywhere)                                        patient); results are computed and flagged
MR, OT and other modalities: no        (none)      their values have no absolute scale (MR intensities
range check                                        are arbitrary, may be normalised or negative)
=====================================  ==========  ===================================================

The arrays are scanned slab by slab, so the checks need little memory beyond the image itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import numpy as np

from DeepDosimetricsLib.data.modality import CT, normalize_modality
from DeepDosimetricsLib.runtime.errors import InputError

MAX_DOSE_ENV = "DEEPDOSIMETRICS_MAX_DOSE_GY"
#: a dose maximum above this (Gy) looks like cGy
DEFAULT_MAX_DOSE_GY = 200.0
#: negative dose voxels down to this (Gy) are rounding noise (a warning); below it, an error
NEGATIVE_DOSE_TOLERANCE_GY = 0.01
#: a CT without any value below 0 and a maximum above this looks un-rescaled
UNRESCALED_CT_MAX = 3000
_SLAB_VOXELS = 1 << 22


@dataclass
class ValueSummary:
    """Counts and range of an array's values (non-finite voxels left out of the range)."""

    voxels: int
    non_finite: int
    minimum: float
    maximum: float
    below: int  # voxels below ``below_threshold`` (finite)
    above: int  # voxels above ``above_threshold`` (finite)

    @property
    def constant(self) -> bool:
        return self.voxels > 0 and self.non_finite == 0 and self.minimum == self.maximum


def summarize(array: np.ndarray, below_threshold: float = 0.0, above_threshold: float = np.inf) -> ValueSummary:
    """One pass over ``array`` (any shape), slab by slab along its first axis."""
    array = np.asarray(array)
    voxels = int(array.size)
    if voxels == 0:
        return ValueSummary(0, 0, np.nan, np.nan, 0, 0)
    floating = np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating)
    rows = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(-1, 1)
    step = max(1, _SLAB_VOXELS // max(1, rows.shape[1]))
    non_finite = below = above = 0
    low, high = np.inf, -np.inf
    for start in range(0, rows.shape[0], step):
        slab = rows[start:start + step]
        if floating:
            finite = np.isfinite(slab)
            bad = int(slab.size - np.count_nonzero(finite))
            if bad:
                non_finite += bad
                slab = slab[finite]
                if slab.size == 0:
                    continue
        low = min(low, float(slab.min()))
        high = max(high, float(slab.max()))
        if low < below_threshold:
            below += int(np.count_nonzero(slab < below_threshold))
        if high > above_threshold:
            above += int(np.count_nonzero(slab > above_threshold))
    if not np.isfinite(low):
        low = high = np.nan
    return ValueSummary(voxels, non_finite, low, high, below, above)


def max_dose_gy() -> float:
    """The largest plausible dose maximum in Gy (``$DEEPDOSIMETRICS_MAX_DOSE_GY``, default 200)."""
    text = os.environ.get(MAX_DOSE_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_DOSE_GY
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"${MAX_DOSE_ENV}={text!r} is not a number of Gy") from None
    return value


def finite_summary(array: np.ndarray, what: str, below_threshold: float = 0.0,
                   above_threshold: float = np.inf) -> ValueSummary:
    """The summary of an image's values; InputError when it is empty or holds NaN or infinite voxels
    (the checks every modality shares)."""
    summary = summarize(array, below_threshold=below_threshold, above_threshold=above_threshold)
    if summary.voxels == 0:
        raise InputError(f"{what} is empty (0 voxels)")
    if summary.non_finite:
        raise InputError(
            f"{what}: {summary.non_finite} of {summary.voxels} voxels are not finite (NaN or infinite); "
            "the file is damaged or was exported wrongly"
        )
    return summary


def _constant(summary: ValueSummary, what: str, unit: str) -> List[str]:
    if summary.constant:
        return [f"{what} is constant ({summary.minimum:g}{unit} in all {summary.voxels} voxels)"]
    return []


def check_ct_array(array: np.ndarray, what: str, note: str = "") -> List[str]:
    """Check CT values (HU, before any conversion to int16); InputError or a list of warnings. ``note``
    ends the message of an un-rescaled CT (e.g. how to say that the image is no CT)."""
    summary = finite_summary(array, what, below_threshold=0.0, above_threshold=UNRESCALED_CT_MAX)
    if summary.below == 0 and summary.maximum > UNRESCALED_CT_MAX:
        raise InputError(
            f"{what} looks un-rescaled: no voxel below 0 and {summary.above} of {summary.voxels} voxels above "
            f"{UNRESCALED_CT_MAX} (maximum {summary.maximum:g}); CT values must be HU (air -1000): apply "
            "RescaleSlope/RescaleIntercept when exporting" + note
        )
    return _constant(summary, what, " HU")


def check_pet_array(array: np.ndarray, what: str) -> List[str]:
    """Check PET values (activity concentration or SUV, any unit): InputError (empty, not finite) or
    warnings (negative voxels, constant)."""
    summary = finite_summary(array, what, below_threshold=0.0)
    warnings = []
    if summary.below:
        warnings.append(f"{what}: {summary.below} of {summary.voxels} voxels are negative (down to "
                        f"{summary.minimum:g}); PET activity cannot be negative (reconstruction noise?)")
    return warnings + _constant(summary, what, "")


def check_unscaled_array(array: np.ndarray, what: str) -> List[str]:
    """Check an image whose values have no absolute scale (MR, OT, any other modality): InputError
    (empty, not finite) or a warning (constant). No range is checked: none is safe."""
    return _constant(finite_summary(array, what), what, "")


def check_dose_array(array: np.ndarray, what: str) -> List[str]:
    """Check dose values (Gy); InputError or a list of warnings."""
    limit = max_dose_gy()
    summary = summarize(array, below_threshold=-NEGATIVE_DOSE_TOLERANCE_GY, above_threshold=limit)
    if summary.voxels == 0:
        raise InputError(f"{what} is empty (0 voxels)")
    problems = []
    if summary.non_finite:
        problems.append(f"{summary.non_finite} of {summary.voxels} voxels are not finite (NaN or infinite)")
    if summary.below:
        problems.append(
            f"{summary.below} voxels are negative (minimum {summary.minimum:g} Gy; a dose cannot be negative)"
        )
    if problems:
        raise InputError(f"{what}: " + "; ".join(problems) + "; the file is damaged or was exported wrongly")
    if summary.maximum > limit:
        raise InputError(
            f"{what}: {summary.above} of {summary.voxels} voxels above {limit:g} Gy (maximum {summary.maximum:g}); "
            f"this looks like cGy: convert it to Gy (or set ${MAX_DOSE_ENV} if it is right)"
        )
    warnings = []
    if summary.minimum < 0:
        negative = int(np.count_nonzero(np.asarray(array) < 0))
        warnings.append(f"{what}: {negative} voxels slightly negative (down to {summary.minimum:g} Gy)")
    if summary.constant:
        warnings.append(f"{what} is constant ({summary.minimum:g} Gy in all {summary.voxels} voxels)")
    return warnings


def check_array(array: np.ndarray, what: str, kind: str, note: str = "") -> List[str]:
    """Check values by kind: ``"dose"`` (Gy) or an image modality (``CT``/``ct``: HU; ``PT``: PET; ``MR``,
    ``OT`` or any other code: no scale). ``note`` ends the message of an un-rescaled CT."""
    if str(kind).lower() == "dose":
        return check_dose_array(array, what)
    modality = normalize_modality(kind)
    if modality is None:
        raise ValueError(f"unknown image kind {kind!r}")
    if modality == CT:
        return check_ct_array(array, what, note)
    if modality == "PT":
        return check_pet_array(array, what)
    return check_unscaled_array(array, what)


def check_image(image, what: str, kind: str, note: str = "") -> List[str]:
    """Check a SimpleITK image's values; ``kind`` is ``"dose"`` or the image's modality (see check_array)."""
    import SimpleITK as sitk

    return check_array(sitk.GetArrayViewFromImage(image), what, kind, note)
