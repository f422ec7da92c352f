"""Scanner sites: how a hospital's CT scanner changes the images (never the anatomy, dose or outcome).

Scanner sites (``sites=N``, ``synth --sites N``; default 0 keeps the files of a cohort without sites): each
patient is assigned at random, from its own fifth random stream, to one of the first N of
``SCANNER_SITES`` (site_A native; site_B +40 HU, +15 HU noise, slices 2x thicker; site_C -35 HU, +30 HU
noise, 1.5x; site_D +20 HU, +8 HU noise, 3x). The site's effect is applied to the finished CT only, so
dose, structures and outcome are those of the same patient without sites. clinical.csv then has
``site`` (the scanner site) and ``tumour_site`` (the PTV site), and cohort.json lists the sites.

Every phantom CT, with or without a site, has the in-plane point-spread blur ``POINT_SPREAD_MM`` and is
rounded to int16 within [``HU_MIN``, ``HU_MAX``].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

HU_MIN, HU_MAX = -1024, 3071
POINT_SPREAD_MM = 0.45  # sigma of the in-plane blur (scanner point-spread)


@dataclass(frozen=True)
class ScannerSite:
    """A hospital/scanner of the cohort: how its CTs differ (never the anatomy, dose or outcome).

    hu_offset: added to every voxel (calibration drift); extra_noise_hu: sigma of added Gaussian noise;
    slice_thickness: reconstructed slice thickness as a multiple of the slice spacing (a Gaussian slice
    profile along z; 1 = native).
    """

    name: str
    hu_offset: float
    extra_noise_hu: float
    slice_thickness: float


#: the sites of ``synth --sites N`` are the first N rows
SCANNER_SITES = (
    ScannerSite("site_A", 0.0, 0.0, 1.0),
    ScannerSite("site_B", 40.0, 15.0, 2.0),
    ScannerSite("site_C", -35.0, 30.0, 1.5),
    ScannerSite("site_D", 20.0, 8.0, 3.0),
)


def apply_scanner(ct: np.ndarray, site: ScannerSite, rng: np.random.Generator) -> np.ndarray:
    """The CT as the site's scanner would give it: slice profile along z, HU offset, extra noise."""
    from scipy import ndimage

    if site.hu_offset == 0 and site.extra_noise_hu == 0 and site.slice_thickness <= 1:
        return ct
    hu = ct.astype(np.float32)
    if site.slice_thickness > 1:  # FWHM of the slice profile from 1 to `slice_thickness` slices
        sigma = math.sqrt(site.slice_thickness**2 - 1.0) / 2.3548
        hu = ndimage.gaussian_filter1d(hu, sigma, axis=0, mode="nearest")
    hu += np.float32(site.hu_offset)
    if site.extra_noise_hu:
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(site.extra_noise_hu)
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
