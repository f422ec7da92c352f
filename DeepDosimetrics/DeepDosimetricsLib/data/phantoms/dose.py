"""The dose of a phantom patient: a plan of coplanar beams computed through the painted anatomy.

Dose: 5-7 coplanar beams, equally spaced from a random start angle, all aimed at the PTV centre and
shaped to the PTV's beam's-eye-view projection plus 7 mm (multi-leaf-collimator-like), computed on a
coarse grid (5 mm by default): primary fluence attenuated as exp(-mu * radiological depth) through the
density (from HU) with a build-up term and the inverse-square law (SAD 1000 mm), a smoothed field
edge (penumbra sigma 3.5 mm) and a small scatter blur; each beam is weighted to give the same dose at
the isocentre. The attenuation's exponentials are computed by :func:`exp_ieee` (IEEE basic operations only),
so the dose is the same to the bit on every x86-64 CPU (``numpy.exp`` gives other last bits with and without
AVX2). ``generate_patient`` (``patient``) resamples the sum linearly onto the CT grid, sets it to
zero outside the body and scales it so that the mean PTV dose equals the prescription (thorax 60 Gy in 30
fractions, pelvis 70 Gy in 35).
"""

from __future__ import annotations

import math

import numpy as np

from DeepDosimetricsLib.data.phantoms.anatomy import Anatomy
from DeepDosimetricsLib.data.phantoms.grid import Grid

APERTURE_MARGIN_MM = 7.0

_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # ln 2 = HI + LO; HI has 32 significant bits: k * HI is exact


def exp_ieee(x) -> np.ndarray:
    """``exp(x)`` in float64 (relative error below 1e-15 for |x| < 700) from additions, multiplications,
    ``rint`` and ``ldexp`` only: IEEE 754 rounds each of them exactly, so the result does not depend on the
    CPU's instruction set, unlike ``numpy.exp``, whose SIMD kernels (AVX2, AVX-512, none) differ in the last
    bits. ``exp(x) = 2**k * exp(r)``, ``r = x - k ln 2`` (Cody-Waite), ``|r| <= ln(2)/2``, and ``exp(r)``
    by its Taylor series to degree 13 (Horner)."""
    x = np.asarray(x, np.float64)
    k = np.rint(x * (1.0 / math.log(2.0)))
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = np.ones_like(r)
    for n in range(13, 0, -1):
        p = 1.0 + p * r * (1.0 / n)
    return np.ldexp(p, k.astype(np.int32))


def _beam_dose(density, ptv, grid: Grid, iso_xy, angle_deg: float) -> np.ndarray:
    """The dose of one beam on the coarse grid (z, y, x), 1 at the isocentre."""
    from scipy import ndimage

    nz = density.shape[0]
    x, y = grid.axes()
    h = min(grid.spacing[0], grid.spacing[1])
    half = math.hypot(x.max() - x.min(), float(y.max() - y.min())) / 2.0 + math.hypot(*iso_xy) + 2 * h
    n = int(math.ceil(2 * half / h)) + 1
    frame = -half + np.arange(n) * h
    theta = math.radians(angle_deg)
    d = (-math.sin(theta), math.cos(theta))  # from the source towards the isocentre (IEC gantry, LPS)
    lat = (math.cos(theta), math.sin(theta))
    uu, vv = np.meshgrid(frame, frame, indexing="ij")
    px = iso_xy[0] + uu * d[0] + vv * lat[0]
    py = iso_xy[1] + uu * d[1] + vv * lat[1]
    ix = (px - float(x[0, 0])) / grid.spacing[0]
    iy = (py - float(y[0, 0])) / grid.spacing[1]
    coords = np.empty((3, nz, n, n), np.float32)
    coords[0] = np.arange(nz, dtype=np.float32)[:, None, None]
    coords[1] = iy[None]
    coords[2] = ix[None]
    rho = ndimage.map_coordinates(density, coords, order=1, mode="constant", cval=0.0)
    target = ndimage.map_coordinates(ptv, coords, order=1, mode="constant", cval=0.0)
    del coords
    aperture = target.max(axis=1) > 0.3  # (z, v): beam's-eye-view projection
    if not aperture.any():
        return np.zeros_like(density)
    outside = ndimage.distance_transform_edt(~aperture, sampling=(grid.spacing[2], h))
    aperture = ndimage.gaussian_filter(
        (outside <= APERTURE_MARGIN_MM).astype(np.float32), sigma=(3.5 / grid.spacing[2], 3.5 / h)
    )
    depth = np.cumsum(rho, axis=1) * h - 0.5 * rho * h
    sad = 1000.0
    inverse_square = (sad / (sad + frame)) ** 2
    depth = depth.astype(np.float64)
    dose = (
        aperture[:, None, :]
        * exp_ieee(-0.0048 * depth)
        * (1.0 - exp_ieee(-depth / 6.0))
        * inverse_square[None, :, None]
    )
    dose = dose.astype(np.float32)
    # back to the patient grid
    rel_x, rel_y = x - iso_xy[0], y - iso_xy[1]
    u = (rel_x * d[0] + rel_y * d[1] + half) / h
    v = (rel_x * lat[0] + rel_y * lat[1] + half) / h
    back = np.empty((3,) + density.shape, np.float32)
    back[0] = np.arange(nz, dtype=np.float32)[:, None, None]
    back[1] = u[None]
    back[2] = v[None]
    patient = ndimage.map_coordinates(dose, back, order=1, mode="constant", cval=0.0)
    return patient


def beam_plan(anatomy: Anatomy, rng: np.random.Generator) -> dict:
    """Beam arrangement and prescription."""
    n_beams = int(rng.integers(5, 8))
    start = float(rng.uniform(0.0, 360.0 / n_beams))
    angles = [round((start + i * 360.0 / n_beams) % 360.0, 2) for i in range(n_beams)]
    thorax = anatomy.variant == "thorax"
    return {
        "prescription_gy": 60.0 if thorax else 70.0,
        "fractions": 30 if thorax else 35,
        "normalisation": "mean PTV dose = prescription",
        "beam_angles_deg": angles,
        "isocentre": "PTV centre",
        "beam_model": {
            "mu_per_mm": 0.0048,
            "buildup_mm": 6.0,
            "sad_mm": 1000.0,
            "aperture_margin_mm": APERTURE_MARGIN_MM,
            "penumbra_sigma_mm": 3.5,
            "scatter_sigma_mm": 4.0,
        },
    }


def coarse_dose(
    anatomy: Anatomy, plan: dict, grid: Grid, scan_start: float, scan_length: float
) -> np.ndarray:
    """The unnormalised dose on the coarse grid (z, y, x)."""
    from scipy import ndimage

    x, y = grid.axes()
    nz = grid.size[2]
    shape = (nz, grid.size[1], grid.size[0])
    density = np.zeros(shape, np.float32)
    ptv = np.zeros(shape, np.float32)
    for k, za in enumerate(grid.template_z(scan_start, scan_length)):
        hu, masks = anatomy.paint(x, y, float(za))
        density[k] = np.where(masks["Body"], np.clip(1.0 + hu / 1000.0, 0.0, 2.5), 0.0)
        if masks["PTV"] is not None:
            ptv[k] = masks["PTV"]
    iso = (anatomy.ptv.center[0], anatomy.ptv.center[1])
    total = np.zeros(shape, np.float32)
    for angle in plan["beam_angles_deg"]:
        beam = _beam_dose(density, ptv, grid, iso, angle)
        inside = beam[ptv > 0.5]
        if inside.size and inside.mean() > 0:
            total += beam / inside.mean()
    sigma = plan["beam_model"]["scatter_sigma_mm"]
    return ndimage.gaussian_filter(total, sigma=[sigma / s for s in grid.spacing[::-1]]).astype(np.float32)
