"""Options of a cohort encoding and their defaults: the one place the CLI, the Slicer panel and the job read.

Light to import (standard library only), so ``deepdosimetrics --help`` and the panel can show the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from DeepDosimetricsLib.runtime.devices import DEFAULT_DEVICE

#: tile overlap fraction in [0, 1): stride = tile * (1 - overlap)
DEFAULT_OVERLAP = 0.25
#: tiles per model call
DEFAULT_BATCH = 8
#: traversal shifts, in cohort standard deviations of the feature
DEFAULT_SIGMAS = (-2.0, 2.0)


@dataclass
class EncodeSettings:
    """Options of a cohort encoding (those in :meth:`key_fields` decide whether outputs can be reused)."""

    overlap: float = DEFAULT_OVERLAP
    batch: int = DEFAULT_BATCH
    device: str = DEFAULT_DEVICE
    reconstruct: bool = False
    residuals: bool = True
    snapshots: bool = False
    scene: bool = False
    compress: bool = False
    traverse: Optional[list[str]] = None  # feature names (z00, ...) to shift; None: no traversal
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS
    patients: Optional[list[str]] = None  # a subset of the cohort; None: all
    jobs: int = 1  # processes building the cache
    scheduler: Optional[str] = None  # Dask scheduler building the cache (address, scheduler file or local:N)
    quiet: bool = False
    progress_json: bool = True  # `@progress` lines on stdout

    def key_fields(self) -> dict:
        """What a finished patient's outputs depend on (batch size and device do not change them)."""
        return {"overlap": self.overlap, "reconstruct": self.reconstruct, "residuals": self.residuals,
                "snapshots": self.snapshots, "scene": self.scene, "compress": self.compress}
