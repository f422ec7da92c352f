"""Sampling grids of a phantom patient: the CT grid (with its table shift and couch position) and the
coarse grid the dose is computed on.

Origin: x centred on 0, y shifted by a table offset, z at a couch position; identity direction (LPS).
``Grid.axes`` gives field-of-view-centred in-plane mm and ``Grid.template_z`` the template z of each
slice, the coordinates the anatomy is painted in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from DeepDosimetricsLib.data.phantoms.anatomy import TEMPLATE_LENGTH_MM, rounded_uniform
from DeepDosimetricsLib.data.phantoms.config import PhantomConfig


@dataclass(frozen=True)
class Grid:
    """A sampling grid (ITK order sizes) with field-of-view-centred in-plane axes and template z."""

    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]  # LPS mm of voxel (0, 0, 0)
    table_shift: float  # world y of the field-of-view centre

    def axes(self) -> Tuple[np.ndarray, np.ndarray]:
        """(x as (1, X), y as (Y, 1)) field-of-view-centred mm, float32."""
        x = self.origin[0] + np.arange(self.size[0]) * self.spacing[0]
        y = self.origin[1] - self.table_shift + np.arange(self.size[1]) * self.spacing[1]
        return x.astype(np.float32)[None, :], y.astype(np.float32)[:, None]

    def template_z(self, scan_start: float, scan_length: float) -> np.ndarray:
        """Template z (mm) of each slice centre."""
        z = self.origin[2] + np.arange(self.size[2]) * self.spacing[2]
        return (z - scan_start) / scan_length * TEMPLATE_LENGTH_MM


def ct_grid(config: PhantomConfig, rng: np.random.Generator) -> Tuple[Grid, float, float]:
    """The CT grid of a patient, the scan start z (world, slab edge) and the scan length (mm)."""
    (nx, ny, nz), (sx, sy, sz) = config.shape, config.grid_spacing
    table_shift = rounded_uniform(rng, -40.0, 40.0)
    couch = rounded_uniform(rng, -450.0, -150.0)
    origin = (round(-(nx - 1) / 2.0 * sx, 4), round(-(ny - 1) / 2.0 * sy + table_shift, 4), round(couch, 4))
    grid = Grid((nx, ny, nz), (sx, sy, sz), origin, table_shift)
    return grid, couch - sz / 2.0, nz * sz


def coarse_grid(ct: Grid, scan_start: float, scan_length: float, step: float) -> Grid:
    """A grid of about ``step`` mm covering the same box as the CT grid (for the dose)."""
    size, spacing = [], []
    for n, s in zip(ct.size[:2], ct.spacing[:2]):
        extent = n * s
        m = max(int(math.ceil(extent / max(step, s))), 2)
        size.append(m)
        spacing.append(extent / m)
    m = max(int(math.ceil(scan_length / max(step, ct.spacing[2]))), 2)
    size.append(m)
    spacing.append(scan_length / m)
    origin = (
        ct.origin[0] - ct.spacing[0] / 2.0 + spacing[0] / 2.0,
        ct.origin[1] - ct.spacing[1] / 2.0 + spacing[1] / 2.0,
        scan_start + spacing[2] / 2.0,
    )
    return Grid(tuple(size), tuple(spacing), origin, ct.table_shift)


def grid_image(array: np.ndarray, grid: Grid):
    """A SimpleITK image of ``array`` (z, y, x) on ``grid`` (identity direction)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(v) for v in grid.spacing))
    image.SetOrigin(tuple(float(v) for v in grid.origin))
    return image
