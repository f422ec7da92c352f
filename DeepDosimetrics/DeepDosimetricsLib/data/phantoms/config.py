"""What a phantom cohort is generated from (``PhantomConfig``), and the names of its patients.

Every patient is drawn from its own random stream, ``SeedSequence([seed, index])``, so patient ``i`` is
the same whatever the cohort size, and the same configuration gives identical files.

Geometry: the in-plane field of view is 400 mm whatever the shape (``spacing = 400 / size``; 0.78 mm at
512) and the scan is 320 mm long (``320 / slices``: 5 mm at 64 slices, 0.91 mm at 350), so the anatomy is
the same in millimetres at every default shape. An explicit ``spacing`` keeps the anatomy in millimetres
in-plane (it may then be cut by a small field of view) and stretches the 320-mm template along z to the
scan length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np

from DeepDosimetricsLib.data.phantoms.anatomy import FIELD_OF_VIEW_MM
from DeepDosimetricsLib.data.phantoms.outcome import OUTCOME_MODEL, OutcomeModel
from DeepDosimetricsLib.data.phantoms.scanner import SCANNER_SITES
from DeepDosimetricsLib.runtime.errors import InputError

GENERATOR_NAME = "DeepDosimetrics phantom"  # in phantom.json and cohort.json: marks folders we wrote
#: 2: the dose's exponentials are computed to the same bit on every CPU (dose.exp_ieee); 1 used numpy.exp, whose
#: last bits depend on the instruction set (the random streams and everything else are those of version 1)
GENERATOR_VERSION = 2
DEFAULT_PATIENTS = 6
DEFAULT_SHAPE: Tuple[int, int, int] = (96, 96, 64)
SCAN_LENGTH_MM = 320.0
MIN_SHAPE: Tuple[int, int, int] = (24, 24, 12)
PATIENT_PREFIX = "phantom_"


@dataclass(frozen=True)
class PhantomConfig:
    """What a phantom cohort is generated from (the number of patients is not part of it)."""

    shape: Tuple[int, int, int] = DEFAULT_SHAPE
    spacing: Optional[Tuple[float, float, float]] = None  # None: 400-mm field of view, 320-mm scan
    seed: int = 0
    dose_grid_mm: float = 5.0
    #: scanner sites (0: none, the files of a cohort without sites byte for byte); see SCANNER_SITES
    sites: int = 0
    #: multiplies the dose and volume coefficients of the outcome model (1: those of OUTCOME_MODEL)
    outcome_scale: float = 1.0

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(v) for v in self.shape)
        except (TypeError, ValueError) as error:
            raise InputError(f"phantom shape must be three integers X Y Z, got {self.shape!r}") from error
        if len(shape) != 3 or any(v < m for v, m in zip(shape, MIN_SHAPE)):
            raise InputError(
                f"phantom shape must be three integers X Y Z of at least {MIN_SHAPE}, got {self.shape!r}"
            )
        object.__setattr__(self, "shape", shape)
        if self.spacing is not None:
            try:
                spacing = tuple(float(v) for v in self.spacing)
            except (TypeError, ValueError) as error:
                raise InputError(f"phantom spacing must be three numbers, got {self.spacing!r}") from error
            if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
                raise InputError(f"phantom spacing must be three positive millimetres, got {self.spacing!r}")
            object.__setattr__(self, "spacing", spacing)
        if int(self.seed) != self.seed or self.seed < 0:
            raise InputError(f"phantom seed must be a non-negative integer, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        if not (self.dose_grid_mm > 0):
            raise InputError(f"dose grid spacing must be positive, got {self.dose_grid_mm!r}")
        if int(self.sites) != self.sites or not 0 <= self.sites <= len(SCANNER_SITES):
            raise InputError(f"phantom sites must be an integer from 0 to {len(SCANNER_SITES)}, got {self.sites!r}")
        object.__setattr__(self, "sites", int(self.sites))
        if not (math.isfinite(self.outcome_scale) and self.outcome_scale >= 0):
            raise InputError(f"phantom outcome scale must be a number >= 0, got {self.outcome_scale!r}")
        object.__setattr__(self, "outcome_scale", float(self.outcome_scale))

    @property
    def grid_spacing(self) -> Tuple[float, float, float]:
        """The CT voxel spacing (x, y, z) in mm: the given one or the default for the shape."""
        if self.spacing is not None:
            return self.spacing
        nx, ny, nz = self.shape
        return (FIELD_OF_VIEW_MM / nx, FIELD_OF_VIEW_MM / ny, SCAN_LENGTH_MM / nz)

    def seed_sequence(self, index: int) -> np.random.SeedSequence:
        """The random stream of patient ``index`` (independent of the cohort size)."""
        return np.random.SeedSequence([self.seed, int(index)])

    def settings(self) -> dict:
        """The settings that decide a patient's files (used to skip patients already done)."""
        return {
            "version": GENERATOR_VERSION,
            "seed": self.seed,
            "shape": list(self.shape),
            "spacing": [float(v) for v in self.grid_spacing],
            "dose_grid_mm": float(self.dose_grid_mm),
            **({"sites": self.sites} if self.sites else {}),
            **({"outcome_scale": self.outcome_scale} if self.outcome_scale != 1.0 else {}),
        }

    def outcome_model(self) -> OutcomeModel:
        """The outcome model of this cohort (OUTCOME_MODEL with its coefficients times outcome_scale)."""
        if self.outcome_scale == 1.0:
            return OUTCOME_MODEL
        return replace(
            OUTCOME_MODEL,
            per_gy_organ_mean_dose=OUTCOME_MODEL.per_gy_organ_mean_dose * self.outcome_scale,
            per_cc_ptv_volume=OUTCOME_MODEL.per_cc_ptv_volume * self.outcome_scale,
        )


def patient_id(index: int) -> str:
    """The folder name of patient ``index``."""
    return f"{PATIENT_PREFIX}{index:03d}"
