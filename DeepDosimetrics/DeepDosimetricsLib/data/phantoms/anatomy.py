"""Deterministic CT-like phantom cohort: CT, structures, a multi-beam dose and clinical data.

The embedded default data set of DeepDosimetrics (``deepdosimetrics synth``). Every patient is drawn
from its own random stream, ``SeedSequence([seed, index])``, so patient ``i`` is the same whatever the
cohort size, and the same seed gives identical files.

Anatomy (analytic shapes, painted slice by slice so a 512x512x350 patient stays well under 2 GB):
  * variant by index: ``index % 3 == 2`` is a pelvis, the others thoraxes; pelvises alternate one leg
    (indices 2, 8, 14, ...: a high above-knee amputee, like the group's prototype case) and two legs
    (indices 5, 11, ...). A cohort of >= 4 patients therefore holds a one-legged patient, >= 6 both.
  * thorax: super-elliptic body outline varying along z, subcutaneous fat, chest wall, lungs with
    diaphragm domes and apices, heart, descending aorta, oesophagus, trachea and main bronchi,
    vertebrae with discs and spinal canal, spinal cord, ribs (sloping bands), sternum, liver below the
    right dome; PTV in the left or right lung or in the mediastinum (tumour as soft tissue inside).
  * pelvis: abdomen/pelvis outline that splits into two thighs, or one thigh and a short stump;
    lumbar spine, sacrum, iliac wings, pubis, ischium, femoral heads, necks and shafts, bladder,
    rectum with gas, bowel gas; prostate-like PTV (prostate + margin) between bladder and rectum.
  * HU: air -1000, lung about -850, fat about -100, muscle/soft tissue/blood 40-55, urine 10,
    cancellous bone 200-300, cortical bone 700-1200; an in-plane point-spread blur (sigma 0.45 mm), Gaussian
    noise (sigma 10-20 HU per patient), rounded to int16 and clipped to [-1024, 3071].

Geometry: the in-plane field of view is 400 mm whatever the shape (``spacing = 400 / size``; 0.78 mm at
512) and the scan is 320 mm long (``320 / slices``: 5 mm at 64 slices, 0.91 mm at 350), so the anatomy is
the same in millimetres at every default shape. The body size is fitted per patient so that the body
fills 40-50% of the voxels (one-legged: 38-46%), as in real chest CTs. An explicit ``spacing`` keeps the
anatomy in millimetres in-plane (it may then be cut by a small field of view) and stretches the 320-mm
template along z to the scan length. Origin: x centred on 0, y shifted by a table offset, z at a
couch position; identity direction (LPS).

Dose: 5-7 coplanar beams, equally spaced from a random start angle, all aimed at the PTV centre and
shaped to the PTV's beam's-eye-view projection plus 7 mm (multi-leaf-collimator-like), computed on a
coarse grid (5 mm by default): primary fluence attenuated as exp(-mu * radiological depth) through the
density (from HU) with a build-up term and the inverse-square law (SAD 1000 mm), a smoothed field
edge (penumbra sigma 3.5 mm) and a small scatter blur; each beam is weighted to give the same dose at
the isocentre. The sum is resampled linearly onto the CT grid, set to zero outside the body and scaled
so that the mean PTV dose equals the prescription (thorax 60 Gy in 30 fractions, pelvis 70 Gy in 35).

Files (canonical cohort layout): ``phantom_NNN/ct.nrrd`` (int16 HU), ``dose.nrrd`` (float32 Gy, CT
grid), ``structures/<Name>.nrrd`` (uint8 0/1; thorax: Body, Lung_L, Lung_R, Heart, Esophagus,
SpinalCord, Bones, PTV; pelvis: Body, Bladder, Rectum, Femur_L, Femur_R, Bones, PTV; the pelvis has no
spinal cord: the cord ends above the scanned region), ``phantom.json`` (all generating parameters, plan,
dose metrics, clinical row). The root holds ``clinical.csv`` and ``cohort.json`` (configuration and the
outcome model). NRRDs are gzip-compressed; patient folders appear atomically (written under a hidden
temporary name, then renamed); a rerun skips patients already generated with the same settings and
removes generated patients beyond the requested number.

Outcome model (binary ``outcome`` in clinical.csv, drawn per patient from its own stream)::

    organ   = Heart (thorax) or Rectum (pelvis)
    logit   = -0.2 + 0.15 / Gy * (mean organ dose - reference dose of the organ)
                   + 0.012 / cc * (PTV volume - 100 cc)
    p       = 1 / (1 + exp(-logit));  outcome = 1 if uniform(0, 1) < p
    reference dose: Heart 3 Gy, Rectum 20 Gy  (see ``OutcomeModel``; written to cohort.json)

Clinical columns: patient, age (years), sex (M/F; pelvis patients are male), smoking
(never/former/current), ecog (0-2), site (lung_left, lung_right, mediastinum, prostate), outcome (0/1).
Only ``outcome`` depends on dose and PTV volume; the other variables are noise.

Scanner sites (``sites=N``, ``synth --sites N``; default 0 keeps the files of generator version 1): each
patient is assigned at random, from its own fifth random stream, to one of the first N of
``SCANNER_SITES`` (site_A native; site_B +40 HU, +15 HU noise, slices 2x thicker; site_C -35 HU, +30 HU
noise, 1.5x; site_D +20 HU, +8 HU noise, 3x). The site's effect is applied to the finished CT only, so
dose, structures and outcome are those of the same patient without sites. clinical.csv then has
``site`` (the scanner site) and ``tumour_site`` (the PTV site), and cohort.json lists the sites.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from DeepDosimetricsLib.runtime.errors import InputError

GENERATOR_VERSION = 1
DEFAULT_SHAPE: Tuple[int, int, int] = (96, 96, 64)
FIELD_OF_VIEW_MM = 400.0
SCAN_LENGTH_MM = 320.0
TEMPLATE_LENGTH_MM = 320.0  # anatomy is described on a 320-mm z template spanning the scan
MIN_SHAPE: Tuple[int, int, int] = (24, 24, 12)
HU_MIN, HU_MAX = -1024, 3071
PATIENT_PREFIX = "phantom_"
APERTURE_MARGIN_MM = 7.0
POINT_SPREAD_MM = 0.45  # sigma of the in-plane blur (scanner point-spread)

THORAX_STRUCTURES = ("Body", "Lung_L", "Lung_R", "Heart", "Esophagus", "SpinalCord", "Bones", "PTV")
PELVIS_STRUCTURES = ("Body", "Bladder", "Rectum", "Femur_L", "Femur_R", "Bones", "PTV")

HU_AIR = -1000.0
HU_FAT = -100.0
HU_MUSCLE = 40.0
HU_SOFT = 40.0
HU_BLOOD = 45.0
HU_LIVER = 55.0
HU_URINE = 10.0
HU_CSF = 15.0
HU_CORD = 35.0
HU_TUMOUR = 35.0
HU_DISC = 80.0
HU_GAS = -850.0
HU_CANCELLOUS = 250.0
HU_CORTICAL = 1000.0


# --------------------------------------------------------------------------------------------------
# configuration and models


@dataclass(frozen=True)
class PhantomConfig:
    """What a phantom cohort is generated from (the number of patients is not part of it)."""

    shape: Tuple[int, int, int] = DEFAULT_SHAPE
    spacing: Optional[Tuple[float, float, float]] = None  # None: 400-mm field of view, 320-mm scan
    seed: int = 0
    dose_grid_mm: float = 5.0
    #: scanner sites (0: none, the cohort of generator version 1 byte for byte); see SCANNER_SITES
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


@dataclass(frozen=True)
class OutcomeModel:
    """Logistic model of the binary outcome: mean dose to an organ at risk and PTV volume."""

    intercept: float = -0.2
    per_gy_organ_mean_dose: float = 0.15
    per_cc_ptv_volume: float = 0.012
    reference_ptv_cc: float = 100.0
    reference_dose_gy: Dict[str, float] = field(default_factory=lambda: {"Heart": 3.0, "Rectum": 20.0})
    organ_by_variant: Dict[str, str] = field(default_factory=lambda: {"thorax": "Heart", "pelvis": "Rectum"})

    def logit(self, organ: str, organ_mean_dose_gy: float, ptv_volume_cc: float) -> float:
        """The log-odds of outcome = 1."""
        return (
            self.intercept
            + self.per_gy_organ_mean_dose * (organ_mean_dose_gy - self.reference_dose_gy[organ])
            + self.per_cc_ptv_volume * (ptv_volume_cc - self.reference_ptv_cc)
        )

    def describe(self) -> dict:
        """The model as written to cohort.json."""
        return {
            "formula": "logit = intercept + per_gy_organ_mean_dose * (organ mean dose [Gy] - reference_dose_gy"
            "[organ]) + per_cc_ptv_volume * (PTV volume [cc] - reference_ptv_cc); p = 1/(1+exp(-logit)); "
            "outcome = 1 if uniform(0,1) < p (per-patient random stream)",
            **asdict(self),
        }


OUTCOME_MODEL = OutcomeModel()


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


def _apply_scanner(ct: np.ndarray, site: ScannerSite, rng: np.random.Generator) -> np.ndarray:
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


def patient_id(index: int) -> str:
    """The folder name of patient ``index``."""
    return f"{PATIENT_PREFIX}{index:03d}"


def patient_variant(index: int) -> Tuple[str, Optional[int]]:
    """(variant, legs) of patient ``index``: every third patient is a pelvis, one leg and two alternating."""
    if index % 3 == 2:
        return "pelvis", 1 if (index // 3) % 2 == 0 else 2
    return "thorax", None


# --------------------------------------------------------------------------------------------------
# 2D shape primitives; x has shape (1, X), y has shape (Y, 1) (mm), results broadcast to (Y, X)


def _ellipse(x, y, cx, cy, ax, ay, angle_deg: float = 0.0):
    """Inside an ellipse with semi-axes ax, ay rotated by angle_deg."""
    if ax <= 0 or ay <= 0:
        return np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), bool)
    if angle_deg == 0.0:
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    return (u / ax) ** 2 + (v / ay) ** 2 <= 1.0


def _superellipse(x, y, cx, cy, ax, ay_anterior, ay_posterior, power):
    """Inside |x/ax|^p + |y/ay|^p <= 1, with a different AP semi-axis in front of and behind cy."""
    if ax <= 0 or ay_anterior <= 0 or ay_posterior <= 0:
        return np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), bool)
    ay = np.where(y < cy, ay_anterior, ay_posterior)
    return np.abs((x - cx) / ax) ** power + np.abs((y - cy) / ay) ** power <= 1.0


def _ball_slice(x, y, za, center, radius):
    """The cross-section of a sphere at height za (all mm)."""
    dz = za - center[2]
    if abs(dz) >= radius:
        return None
    r = math.sqrt(radius * radius - dz * dz)
    return _ellipse(x, y, center[0], center[1], r, r)


def _smoothstep(value: float) -> float:
    value = min(max(value, 0.0), 1.0)
    return value * value * (3.0 - 2.0 * value)


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return round(float(rng.uniform(low, high)), 3)


# --------------------------------------------------------------------------------------------------
# anatomy


@dataclass
class Ptv:
    """The planning target: a lobulated ellipsoid (tumour/prostate inside = radii - margin)."""

    site: str
    center: Tuple[float, float, float]  # x, y (mm, field-of-view centred), z (template mm)
    radii: Tuple[float, float, float]  # mm (z in template mm)
    margin_mm: float
    lobes: Tuple[float, float, float, float]  # amplitude, phase of 3 in-plane lobes; amplitude, phase along z

    def masks(self, x, y, za):
        """(PTV, tumour) cross-sections at za, or (None, None) outside."""
        rx, ry, rz = self.radii
        dz = (za - self.center[2]) / rz
        if abs(dz) > 1.15:
            return None, None
        dx = (x - self.center[0]) / rx
        dy = (y - self.center[1]) / ry
        rho2 = dx * dx + dy * dy + dz * dz
        angle = np.arctan2(dy, dx)
        bump = (
            1.0
            + self.lobes[0] * np.sin(3.0 * angle + self.lobes[1])
            + self.lobes[2] * math.cos(2.5 * dz + self.lobes[3])
        )
        ptv = rho2 <= bump * bump
        shrink = [max(r - self.margin_mm, 0.4 * r) / r for r in self.radii]
        tx, ty, tz = dx / shrink[0], dy / shrink[1], dz / shrink[2]
        tumour = tx * tx + ty * ty + tz * tz <= bump * bump
        return ptv, tumour


@dataclass
class Anatomy:
    """Parameters shared by both variants (in-plane mm are field-of-view centred, z is template mm)."""

    variant: str
    width_mm: float  # lateral semi-axis of the body before scaling
    depth_mm: float  # anterior semi-axis of the body before scaling
    power: float  # super-ellipse exponent of the outline
    scale: float  # fitted so that the body fills the target share of the voxels
    y_center: float
    fat_mm: float
    wall_mm: float
    wobble: Tuple[float, float, float, float]  # amplitudes and phases of the outline's z variation
    disc_phase: float
    noise_hu: float
    ptv: Ptv

    # outline ----------------------------------------------------------------------------------
    def outline(self, za: float) -> Tuple[float, float, float]:
        """(lateral, anterior, posterior) semi-axes of the trunk at za."""
        t = za / TEMPLATE_LENGTH_MM
        wa, pa, wb, pb = self.wobble
        a = self.width_mm * self.scale * (1.0 + wa * math.sin(2.0 * math.pi * 0.8 * t + pa) - 0.05 * t)
        b = self.depth_mm * self.scale * (1.0 + wb * math.sin(2.0 * math.pi * 0.7 * t + pb) - 0.03 * t)
        return a, b, 0.92 * b

    def body(self, x, y, za):
        raise NotImplementedError

    def paint(self, x, y, za) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        raise NotImplementedError

    def structure_names(self) -> Tuple[str, ...]:
        raise NotImplementedError

    def organ_at_risk(self) -> str:
        return OUTCOME_MODEL.organ_by_variant[self.variant]

    # shared pieces -----------------------------------------------------------------------------
    def spine_positions(self, za: float) -> Tuple[float, float]:
        """(canal centre y, vertebral body centre y) at za."""
        _, _, b_post = self.outline(za)
        canal_y = self.y_center + b_post - self.fat_mm - 38.0
        return canal_y, canal_y - 31.0

    def paint_vertebra(self, hu, bones, x, y, za, lumbar: bool = False):
        """A vertebra (or a disc) with its arch and canal; returns (canal, cord-sized core) masks."""
        canal_y, body_y = self.spine_positions(za)
        body_ax, body_ay = (26.0, 20.0) if lumbar else (21.0, 17.0)
        disc = (za - self.disc_phase) % (32.0 if lumbar else 26.0) < 5.0
        vertebral_body = _ellipse(x, y, 0.0, body_y, body_ax, body_ay)
        if disc:
            hu[vertebral_body] = HU_DISC
        else:
            arch = (
                _ellipse(x, y, 0.0, canal_y, 15.0, 14.0)
                | _ellipse(x, y, 0.0, canal_y + 22.0, 5.0, 14.0)
                | _ellipse(x, y, 0.0, canal_y + 4.0, 40.0 if lumbar else 34.0, 5.5)
            )
            hu[arch] = 700.0
            hu[vertebral_body] = HU_CORTICAL * 0.9
            hu[_ellipse(x, y, 0.0, body_y, body_ax - 3.0, body_ay - 3.0)] = HU_CANCELLOUS
            bones |= vertebral_body | arch
        canal = _ellipse(x, y, 0.0, canal_y, 9.0, 8.0)
        hu[canal] = HU_CSF
        bones &= ~canal
        return canal, _ellipse(x, y, 0.0, canal_y, 6.0, 5.5)


@dataclass
class ThoraxAnatomy(Anatomy):
    """A chest: lungs, heart, mediastinum, spine, ribs and sternum."""

    lung_base: Tuple[float, float] = (30.0, 40.0)  # z of the lung bases at the periphery (left, right)
    lung_apex: float = 320.0
    dome_mm: float = 35.0
    heart_center: Tuple[float, float, float] = (25.0, 0.0, 90.0)
    heart_radii: Tuple[float, float, float] = (60.0, 48.0, 55.0)
    heart_angle: float = -30.0
    carina_z: float = 215.0
    rib_phase: float = 0.0
    lung_hu: float = -850.0

    def structure_names(self) -> Tuple[str, ...]:
        return THORAX_STRUCTURES

    def cavity(self, za: float) -> Tuple[float, float, float]:
        """(lateral, anterior, posterior) semi-axes of the thoracic cavity."""
        a, b_ant, b_post = self.outline(za)
        return a - self.fat_mm - self.wall_mm, b_ant - self.fat_mm - self.wall_mm, b_post - self.fat_mm - 48.0

    def lung_ellipse(self, za: float, side: str) -> Tuple[float, float, float, float]:
        """(cx, cy, ax, ay) of a lung's cross-section before the apex taper (side 'L' or 'R')."""
        a_c, b_c, _ = self.cavity(za)
        sign = 1.0 if side == "L" else -1.0
        return sign * 0.5 * a_c, self.y_center + 0.08 * b_c, (0.44 if side == "L" else 0.47) * a_c, 0.86 * b_c

    def body(self, x, y, za):
        a, b_ant, b_post = self.outline(za)
        return _superellipse(x, y, 0.0, self.y_center, a, b_ant, b_post, self.power)

    def paint(self, x, y, za):
        a, b_ant, b_post = self.outline(za)
        yc = self.y_center
        hu = np.full(np.broadcast_shapes(x.shape, y.shape), HU_AIR, np.float32)
        body = _superellipse(x, y, 0.0, yc, a, b_ant, b_post, self.power)
        hu[body] = HU_FAT
        f = self.fat_mm
        hu[_superellipse(x, y, 0.0, yc, a - f, b_ant - f, b_post - f, self.power)] = HU_MUSCLE
        a_c, b_c, b_cp = self.cavity(za)
        cavity = _superellipse(x, y, 0.0, yc, a_c, b_c, b_cp, self.power)
        hu[cavity] = HU_SOFT
        canal_y, body_y = self.spine_positions(za)

        # lungs (domes at the base, taper at the apex), then what the mediastinum takes from them
        lungs = {}
        for side, base in zip(("L", "R"), self.lung_base):
            cx, cy, ax, ay = self.lung_ellipse(za, side)
            taper = math.sqrt(min(max((self.lung_apex - za) / 55.0, 0.0), 1.0))
            if taper <= 0 or za < base:
                lungs[side] = np.zeros_like(body)
                continue
            r2 = ((x - cx) / (ax * taper)) ** 2 + ((y - cy) / (ay * taper)) ** 2
            lungs[side] = (r2 <= 1.0) & (za >= base + self.dome_mm * (1.0 - r2)) & cavity
        if za < self.lung_base[1] + self.dome_mm:  # liver under the right dome
            liver = cavity & (x < 35.0) & ~lungs["R"] & ~lungs["L"]
            hu[liver] = HU_LIVER
        mediastinum = _ellipse(x, y, 6.0, yc - 0.2 * b_c, 0.17 * a_c, 0.8 * b_c)
        spine_block = _ellipse(x, y, 0.0, body_y + 12.0, 30.0, 45.0)
        hx, hy, hz = self.heart_center
        rx, ry, rz = self.heart_radii
        heart = None
        if abs(za - hz) < rz:
            k = math.sqrt(1.0 - ((za - hz) / rz) ** 2)
            heart = _ellipse(x, y, hx, hy, rx * k, ry * k, self.heart_angle) & cavity
        aorta = _ellipse(x, y, 27.0, body_y - 6.0, 12.0, 12.0)
        esophagus = _ellipse(x, y, 6.0, body_y - 27.0, 8.5, 7.5)
        airway = np.zeros_like(body)
        if za >= self.carina_z:
            airway = _ellipse(x, y, 0.0, body_y - 50.0, 9.5, 9.0)
        elif za >= self.carina_z - 30.0:
            shift = (self.carina_z - za) * 1.1
            airway = _ellipse(x, y, shift, body_y - 48.0, 6.5, 6.5) | _ellipse(
                x, y, -shift, body_y - 48.0, 6.5, 6.5
            )
        taken = mediastinum | spine_block | aorta | esophagus | airway
        if heart is not None:
            taken |= heart
        for side in lungs:
            lungs[side] &= ~taken
            hu[lungs[side]] = self.lung_hu
        hu[aorta & cavity] = HU_BLOOD
        if heart is not None:
            hu[heart] = HU_BLOOD
        hu[esophagus] = HU_SOFT
        hu[airway] = HU_AIR

        # tumour and PTV
        ptv, tumour = self.ptv.masks(x, y, za)
        if tumour is not None:
            hu[tumour & cavity] = HU_TUMOUR

        # bones: vertebra, ribs, sternum
        bones = np.zeros_like(body)
        canal, cord = self.paint_vertebra(hu, bones, x, y, za)
        hu[cord] = HU_CORD
        if self.lung_base[0] - 25.0 <= za <= 312.0:
            outer = _superellipse(x, y, 0.0, yc, a - f - 2.0, b_ant - f - 2.0, b_post - f - 2.0, self.power)
            inner = _superellipse(
                x, y, 0.0, yc, a - f - 11.0, b_ant - f - 11.0, b_post - f - 11.0, self.power
            )
            shell = outer & ~inner
            polar = np.arccos(np.clip((y - yc) / np.maximum(np.hypot(x, y - yc), 1e-3), -1.0, 1.0))
            band = np.mod(za + 16.0 * polar - self.rib_phase, 26.0) < 10.0
            ribs = shell & band & (polar > 0.35) & ~((np.abs(x) < 22.0) & (y < yc))
            hu[ribs] = 650.0
            bones |= ribs
        if self.lung_base[0] + 30.0 <= za <= 300.0:
            sternum = _ellipse(x, y, 0.0, yc - b_ant + f + 11.0, 16.0, 7.0)
            hu[sternum] = 450.0
            bones |= sternum

        masks = {
            "Body": body,
            "Lung_L": lungs["L"],
            "Lung_R": lungs["R"],
            "Heart": heart,
            "Esophagus": esophagus,
            "SpinalCord": cord,
            "Bones": bones,
            "PTV": ptv,
        }
        return hu, masks


@dataclass
class PelvisAnatomy(Anatomy):
    """An abdomen/pelvis that splits into thighs (one of which may end in a stump)."""

    legs: int = 2
    amputated_side: Optional[str] = None  # "L" or "R" when legs == 1
    split_z: float = 65.0  # below: thighs only
    stump_z: float = 30.0  # lowest z of the amputated thigh
    thigh_radii: Tuple[float, float] = (75.0, 80.0)
    hip_z: float = 135.0  # femoral head centres
    bladder_center: Tuple[float, float, float] = (0.0, -40.0, 165.0)
    bladder_radii: Tuple[float, float, float] = (45.0, 35.0, 35.0)
    rectum_center: Tuple[float, float] = (0.0, 40.0)
    rectum_radius: float = 16.0
    gas_bubbles: Tuple[Tuple[float, float, float, float], ...] = ()

    def structure_names(self) -> Tuple[str, ...]:
        return PELVIS_STRUCTURES

    def thighs(self, za: float) -> List[Tuple[str, float, float, float, float]]:
        """(side, cx, cy, ax, ay) of each thigh present at za."""
        a, _, _ = self.outline(max(za, self.split_z))
        taper = 0.82 + 0.18 * min(za / max(self.split_z, 1.0), 1.0)
        out = []
        for side, sign in (("L", 1.0), ("R", -1.0)):
            ax, ay = self.thigh_radii[0] * self.scale * taper, self.thigh_radii[1] * self.scale * taper
            if side == self.amputated_side:
                end = min(max((za - self.stump_z) / 25.0, 0.0), 1.0)
                if end <= 0.0:
                    continue
                ax, ay = ax * math.sqrt(end), ay * math.sqrt(end)
            out.append((side, sign * 0.5 * a, self.y_center + 8.0, ax, ay))
        return out

    def trunk(self, za: float) -> Tuple[float, float, float]:
        """(lateral, anterior, posterior) semi-axes of the trunk, shrinking through the crotch."""
        a, b_ant, b_post = self.outline(za)
        g = _smoothstep((za - self.split_z) / 30.0)
        return a * (0.6 + 0.4 * g), b_ant * g, b_post * g

    def _outline_masks(self, x, y, za, inset: float):
        a, b_ant, b_post = self.trunk(za)
        mask = _superellipse(x, y, 0.0, self.y_center, a - inset, b_ant - inset, b_post - inset, self.power)
        for _, cx, cy, ax, ay in self.thighs(za):
            mask |= _ellipse(x, y, cx, cy, ax - inset, ay - inset)
        return mask

    def body(self, x, y, za):
        return self._outline_masks(x, y, za, 0.0)

    def femur_masks(self, x, y, za) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
        """Per side: (femur, marrow) cross-sections: head, neck, greater trochanter and shaft."""
        a, _, _ = self.outline(max(za, self.split_z))
        out = {}
        for side, sign in (("L", 1.0), ("R", -1.0)):
            head = (sign * 0.43 * a, self.y_center + 2.0, self.hip_z)
            shaft_x = sign * 0.53 * a
            femur = np.zeros(np.broadcast_shapes(x.shape, y.shape), bool)
            marrow = np.zeros_like(femur)
            ball = _ball_slice(x, y, za, head, 24.0)
            if ball is not None:
                femur |= ball
                marrow |= _ball_slice(x, y, za, head, 21.0) if abs(za - head[2]) < 21.0 else False
            if self.hip_z - 45.0 <= za <= self.hip_z:
                s = (self.hip_z - za) / 45.0
                femur |= _ellipse(x, y, head[0] + s * (shaft_x - head[0]), head[1], 13.0, 13.0)
            if self.hip_z - 45.0 <= za <= self.hip_z - 5.0:
                femur |= _ellipse(x, y, shaft_x + sign * 16.0, head[1] + 4.0, 17.0, 19.0)
            bottom = self.stump_z + 12.0 if side == self.amputated_side else -1e9
            if bottom <= za <= self.hip_z - 35.0:
                sx = shaft_x * (0.88 + 0.12 * min(za / self.hip_z, 1.0))
                femur |= _ellipse(x, y, sx, head[1] + 2.0, 14.0, 14.0)
                marrow |= _ellipse(x, y, sx, head[1] + 2.0, 9.0, 9.0)
            if femur.any():
                out[side] = (femur, marrow & femur)
        return out

    def paint(self, x, y, za):
        yc = self.y_center
        hu = np.full(np.broadcast_shapes(x.shape, y.shape), HU_AIR, np.float32)
        body = self.body(x, y, za)
        hu[body] = HU_FAT
        hu[self._outline_masks(x, y, za, self.fat_mm)] = HU_MUSCLE
        a, b_ant, b_post = self.trunk(za)
        f = self.fat_mm
        cavity = _superellipse(
            x, y, 0.0, yc, a - f - self.wall_mm, b_ant - f - self.wall_mm, b_post - f - 48.0, self.power
        )
        hu[cavity] = 30.0
        for bx, by, bz, br in self.gas_bubbles:
            bubble = _ball_slice(x, y, za, (bx, by, bz), br)
            if bubble is not None:
                hu[bubble & cavity] = HU_GAS

        bladder = None
        cx, cy, cz = self.bladder_center
        rx, ry, rz = self.bladder_radii
        if abs(za - cz) < rz:
            k = math.sqrt(1.0 - ((za - cz) / rz) ** 2)
            bladder = _ellipse(x, y, cx, cy, rx * k, ry * k) & cavity
            hu[bladder] = HU_URINE
        rectum = None
        rectum_low, rectum_high = self.ptv.center[2] - 45.0, self.ptv.center[2] + 75.0
        if rectum_low <= za <= rectum_high:
            bend = max(za - (self.ptv.center[2] + 25.0), 0.0) * 0.35
            rx0, ry0 = self.rectum_center[0], self.rectum_center[1] + bend
            rectum = _ellipse(x, y, rx0, ry0, self.rectum_radius, self.rectum_radius * 0.85) & body
            hu[rectum] = 30.0
            hu[_ellipse(x, y, rx0, ry0 - 2.0, 5.0, 4.0) & body] = HU_GAS

        ptv, prostate = self.ptv.masks(x, y, za)
        if prostate is not None:
            hu[prostate & body] = HU_SOFT

        bones = np.zeros_like(body)
        if self.split_z < za:
            canal_y, _ = self.spine_positions(za)
            if za >= self.hip_z + 95.0:
                self.paint_vertebra(hu, bones, x, y, za, lumbar=True)
            elif za >= self.hip_z + 10.0:  # sacrum, widening upwards
                w = 25.0 + 25.0 * (za - self.hip_z - 10.0) / 85.0
                sacrum = _ellipse(x, y, 0.0, canal_y - 8.0, w, 14.0) & ~_ellipse(
                    x, y, 0.0, canal_y - 6.0, 8.0, 6.0
                )
                hu[sacrum] = 400.0
                bones |= sacrum
            a_c = a - f - self.wall_mm
            if self.hip_z + 15.0 <= za <= self.hip_z + 125.0:  # iliac wings
                w = 30.0 + 30.0 * (za - self.hip_z - 15.0) / 110.0
                for sign in (1.0, -1.0):
                    wing = _ellipse(x, y, sign * (0.58 * a_c), yc + 12.0, w, 7.0, sign * 40.0)
                    hu[wing] = 550.0
                    bones |= wing
            if self.hip_z - 35.0 <= za <= self.hip_z + 5.0:  # pubis
                for sign in (1.0, -1.0):
                    pubis = _ellipse(x, y, sign * 32.0, yc - 0.72 * b_ant + f, 33.0, 9.0, -sign * 25.0)
                    hu[pubis] = 600.0
                    bones |= pubis
            if self.hip_z - 55.0 <= za <= self.hip_z - 5.0:  # ischium
                for sign in (1.0, -1.0):
                    ischium = _ellipse(x, y, sign * 52.0, yc + 0.25 * b_ant, 13.0, 20.0)
                    hu[ischium] = 600.0
                    bones |= ischium
        femurs = self.femur_masks(x, y, za)
        for femur, marrow in femurs.values():
            hu[femur] = HU_CORTICAL * 1.1
            hu[marrow] = 200.0
            bones |= femur
        bones &= body
        masks = {
            "Body": body,
            "Bladder": bladder,
            "Rectum": rectum,
            "Femur_L": femurs["L"][0] if "L" in femurs else None,
            "Femur_R": femurs["R"][0] if "R" in femurs else None,
            "Bones": bones,
            "PTV": ptv,
        }
        return hu, masks


def _draw_anatomy(index: int, rng: np.random.Generator) -> Anatomy:
    """The anatomy parameters of patient ``index`` (before the body-size fit)."""
    variant, legs = patient_variant(index)
    common = dict(
        variant=variant,
        power=_uniform(rng, 2.2, 2.7) if variant == "thorax" else _uniform(rng, 2.1, 2.5),
        scale=1.0,
        y_center=_uniform(rng, -8.0, 8.0),
        fat_mm=_uniform(rng, 8.0, 26.0) if variant == "thorax" else _uniform(rng, 12.0, 32.0),
        wall_mm=_uniform(rng, 12.0, 17.0),
        wobble=(
            _uniform(rng, 0.02, 0.05),
            _uniform(rng, 0.0, 2 * math.pi),
            _uniform(rng, 0.02, 0.04),
            _uniform(rng, 0.0, 2 * math.pi),
        ),
        disc_phase=_uniform(rng, 0.0, 26.0),
        noise_hu=_uniform(rng, 10.0, 20.0),
    )
    lobes = (
        _uniform(rng, 0.0, 0.1),
        _uniform(rng, 0.0, 2 * math.pi),
        _uniform(rng, 0.0, 0.08),
        _uniform(rng, 0.0, 2 * math.pi),
    )
    if variant == "thorax":
        width, depth = _uniform(rng, 148.0, 168.0), _uniform(rng, 118.0, 138.0)
        base_l = _uniform(rng, 20.0, 40.0)
        anatomy = ThoraxAnatomy(
            width_mm=width,
            depth_mm=depth,
            ptv=Ptv("pending", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 5.0, lobes),
            lung_base=(base_l, round(base_l + _uniform(rng, 5.0, 15.0), 3)),
            lung_apex=_uniform(rng, 310.0, 345.0),
            dome_mm=_uniform(rng, 30.0, 42.0),
            heart_radii=(_uniform(rng, 55.0, 66.0), _uniform(rng, 42.0, 52.0), _uniform(rng, 48.0, 58.0)),
            heart_angle=_uniform(rng, -40.0, -20.0),
            carina_z=_uniform(rng, 205.0, 235.0),
            rib_phase=_uniform(rng, 0.0, 26.0),
            lung_hu=_uniform(rng, -870.0, -825.0),
            **common,
        )
        return anatomy
    width, depth = _uniform(rng, 155.0, 172.0), _uniform(rng, 118.0, 136.0)
    split_z = _uniform(rng, 45.0, 65.0)
    hip_z = round(split_z + _uniform(rng, 65.0, 80.0), 3)
    bladder_scale = _uniform(rng, 0.75, 1.2)
    bladder_radii = (
        round(42.0 * bladder_scale, 3),
        round(32.0 * bladder_scale, 3),
        round(32.0 * bladder_scale, 3),
    )
    gas = []
    for _ in range(int(rng.integers(3, 8))):
        gas.append(
            (
                _uniform(rng, -90.0, 90.0),
                _uniform(rng, -60.0, 20.0),
                _uniform(rng, hip_z + 80.0, 315.0),
                _uniform(rng, 6.0, 14.0),
            )
        )
    return PelvisAnatomy(
        width_mm=width,
        depth_mm=depth,
        ptv=Ptv("prostate", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 7.0, lobes),
        legs=int(legs),
        amputated_side=(("L", "R")[int(rng.integers(0, 2))] if legs == 1 else None),
        split_z=split_z,
        stump_z=round(split_z - _uniform(rng, 15.0, 35.0), 3),
        thigh_radii=(_uniform(rng, 76.0, 90.0), _uniform(rng, 80.0, 95.0)),
        hip_z=hip_z,
        bladder_radii=bladder_radii,
        rectum_radius=_uniform(rng, 14.0, 18.0),
        gas_bubbles=tuple(gas),
        **common,
    )


def _place_heart(anatomy: ThoraxAnatomy, rng: np.random.Generator) -> ThoraxAnatomy:
    """The heart of a (size-fitted) thorax: on the left dome, against the anterior chest wall."""
    rx, ry, rz = anatomy.heart_radii
    hz = round(anatomy.lung_base[0] + anatomy.dome_mm + 0.55 * rz, 3)
    _, b_c, _ = anatomy.cavity(hz)
    center = (
        _uniform(rng, 15.0, 30.0),
        round(anatomy.y_center - b_c + 0.9 * ry + _uniform(rng, 0.0, 6.0), 3),
        hz,
    )
    return replace(anatomy, heart_center=center)


def _place_ptv(anatomy: Anatomy, rng: np.random.Generator) -> Ptv:
    """The PTV of a (size-fitted) anatomy: in a lung or the mediastinum, or prostate-like."""
    lobes = anatomy.ptv.lobes
    if isinstance(anatomy, ThoraxAnatomy):
        site = ("lung_left", "lung_right", "mediastinum")[int(rng.choice(3, p=[0.4, 0.4, 0.2]))]
        if site == "mediastinum":
            radii = tuple(_uniform(rng, 16.0, 28.0) for _ in range(3))
            za = _uniform(
                rng, anatomy.heart_center[2] + 0.6 * anatomy.heart_radii[2], anatomy.carina_z + 10.0
            )
            _, body_y = anatomy.spine_positions(za)
            center = (_uniform(rng, -5.0, 15.0), round(body_y - 45.0 - radii[1] * 0.4, 3), za)
            return Ptv(site, center, radii, 5.0, lobes)
        side = "L" if site == "lung_left" else "R"
        base = anatomy.lung_base[0 if side == "L" else 1]
        heart_top = anatomy.heart_center[2] + 0.8 * anatomy.heart_radii[2]
        if rng.random() < 0.6:  # at the level of the heart (lower lobes), else above it
            za = _uniform(rng, base + anatomy.dome_mm + 10.0, heart_top)
        else:
            za = _uniform(rng, heart_top, anatomy.lung_apex - 80.0)
        cx, cy, ax, ay = anatomy.lung_ellipse(za, side)
        limit = 0.5 * min(ax, ay)
        mean_radius = min(float(rng.uniform(14.0, 34.0)), limit)
        radii = tuple(round(min(mean_radius * float(rng.uniform(0.85, 1.15)), limit), 3) for _ in range(3))
        angle = float(rng.uniform(0.0, 2.0 * math.pi))
        reach = float(rng.uniform(0.0, 0.4))
        lateral = 0.6 * ax - radii[0]
        center = (
            round(cx + math.cos(angle) * reach * max(lateral, 0.0), 3),
            round(cy + math.sin(angle) * reach * max(0.6 * ay - radii[1], 0.0), 3),
            za,
        )
        return Ptv(site, center, radii, 5.0, lobes)
    assert isinstance(anatomy, PelvisAnatomy)
    prostate = (_uniform(rng, 17.0, 24.0), _uniform(rng, 14.0, 20.0), _uniform(rng, 16.0, 24.0))
    za = round(anatomy.hip_z - _uniform(rng, 5.0, 20.0), 3)
    cy = _uniform(rng, -25.0, -10.0) + anatomy.y_center
    margin = 7.0
    radii = tuple(round(r + margin, 3) for r in prostate)
    return Ptv("prostate", (_uniform(rng, -4.0, 4.0), cy, za), radii, margin, lobes)


def _finish_pelvis(anatomy: PelvisAnatomy, rng: np.random.Generator) -> PelvisAnatomy:
    """Bladder above and rectum behind the prostate, once the PTV is placed."""
    px, py, pz = anatomy.ptv.center
    _, pry, prz = anatomy.ptv.radii
    bz = anatomy.bladder_radii[2]
    bladder_center = (round(px, 3), round(py - 6.0, 3), round(pz + prz - anatomy.ptv.margin_mm + bz - 4.0, 3))
    rectum_center = (
        round(px + _uniform(rng, -4.0, 4.0), 3),
        round(py + pry - anatomy.ptv.margin_mm + anatomy.rectum_radius + 1.0, 3),
    )
    return replace(anatomy, bladder_center=bladder_center, rectum_center=rectum_center)


def _fit_body_scale(anatomy: Anatomy, target: float, max_half_extent: float) -> float:
    """The scale at which the body fills ``target`` of a default field of view (kept inside it)."""
    n = 160
    coords = (np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * (FIELD_OF_VIEW_MM / n)
    x, y = coords[None, :], coords[:, None]
    samples = (np.arange(48) + 0.5) * (TEMPLATE_LENGTH_MM / 48)
    scale = 1.0
    for _ in range(4):
        trial = replace(anatomy, scale=scale)
        inside = 0
        extent = 0.0
        for za in samples:
            mask = trial.body(x, y, float(za))
            inside += int(mask.sum())
            if mask.any():
                cols, rows = np.nonzero(mask.any(axis=0))[0], np.nonzero(mask.any(axis=1))[0]
                extent = max(extent, abs(float(coords[cols[0]])), abs(float(coords[cols[-1]])))
                extent = max(extent, abs(float(coords[rows[0]])), abs(float(coords[rows[-1]])))
        fraction = inside / (n * n * len(samples))
        scale *= math.sqrt(target / max(fraction, 1e-6))
        scale = min(scale, (trial.scale * max_half_extent) / max(extent, 1.0))
    return round(scale, 4)


# --------------------------------------------------------------------------------------------------
# grids, painting and dose


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


def _ct_grid(config: PhantomConfig, rng: np.random.Generator) -> Tuple[Grid, float, float]:
    """The CT grid of a patient, the scan start z (world, slab edge) and the scan length (mm)."""
    (nx, ny, nz), (sx, sy, sz) = config.shape, config.grid_spacing
    table_shift = _uniform(rng, -40.0, 40.0)
    couch = _uniform(rng, -450.0, -150.0)
    origin = (round(-(nx - 1) / 2.0 * sx, 4), round(-(ny - 1) / 2.0 * sy + table_shift, 4), round(couch, 4))
    grid = Grid((nx, ny, nz), (sx, sy, sz), origin, table_shift)
    return grid, couch - sz / 2.0, nz * sz


def _coarse_grid(ct: Grid, scan_start: float, scan_length: float, step: float) -> Grid:
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
    dose = (
        aperture[:, None, :]
        * np.exp(-0.0048 * depth)
        * (1.0 - np.exp(-depth / 6.0))
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


def _plan(anatomy: Anatomy, rng: np.random.Generator) -> dict:
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


def _coarse_dose(
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


def _image(array: np.ndarray, grid: Grid):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(v) for v in grid.spacing))
    image.SetOrigin(tuple(float(v) for v in grid.origin))
    return image


# --------------------------------------------------------------------------------------------------
# one patient


@dataclass
class PhantomPatient:
    """One generated patient in memory: arrays (z, y, x) on the CT grid and its parameters."""

    id: str
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    ct: np.ndarray  # int16 HU
    dose: np.ndarray  # float32 Gy
    structures: Dict[str, np.ndarray]  # uint8 0/1
    parameters: dict

    def image(self, array: np.ndarray):
        """A SimpleITK image of ``array`` with this patient's CT geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        return image

    def write(self, folder: Union[str, Path]) -> Path:
        """Write the canonical layout into ``folder`` (created; files replaced)."""
        import SimpleITK as sitk

        folder = Path(folder)
        (folder / "structures").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(self.image(self.ct), str(folder / "ct.nrrd"), True)
        sitk.WriteImage(self.image(self.dose), str(folder / "dose.nrrd"), True)
        for name, mask in self.structures.items():
            sitk.WriteImage(self.image(mask), str(folder / "structures" / f"{name}.nrrd"), True)
        _write_text(folder / "phantom.json", json.dumps(self.parameters, indent=2) + "\n")
        return folder


def _rounded(value):
    """JSON-friendly copy with floats rounded (stable text)."""
    if isinstance(value, dict):
        return {str(k): _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return round(float(value), 4)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _clinical_row(index: int, variant: str, site: str, rng: np.random.Generator) -> dict:
    """The clinical variables of a patient (outcome is added from the model)."""
    pelvis = variant == "pelvis"
    age = int(np.clip(round(rng.normal(68.0 if pelvis else 65.0, 9.0)), 38, 90))
    sex = "M" if pelvis else ("M", "F")[int(rng.integers(0, 2))]
    smoking = ("never", "former", "current")[
        int(rng.choice(3, p=[0.4, 0.4, 0.2] if pelvis else [0.15, 0.5, 0.35]))
    ]
    ecog = int(rng.choice(3, p=[0.45, 0.45, 0.10]))
    return {
        "patient": patient_id(index),
        "age": age,
        "sex": sex,
        "smoking": smoking,
        "ecog": ecog,
        "site": site,
    }


def generate_patient(index: int, config: PhantomConfig = PhantomConfig()) -> PhantomPatient:
    """Generate patient ``index`` of the cohort defined by ``config`` in memory."""
    from scipy import ndimage

    if index < 0:
        raise InputError(f"phantom patient index must be >= 0, got {index}")
    streams = config.seed_sequence(index).spawn(5)  # children 0-3 are those of generator version 1
    rng_anatomy, rng_noise, rng_clinical, rng_outcome, rng_site = (np.random.default_rng(s) for s in streams)
    anatomy = _draw_anatomy(index, rng_anatomy)
    one_leg = isinstance(anatomy, PelvisAnatomy) and anatomy.legs == 1
    target = _uniform(rng_anatomy, 0.38, 0.46) if one_leg else _uniform(rng_anatomy, 0.40, 0.50)
    anatomy = replace(anatomy, scale=_fit_body_scale(anatomy, target, 0.47 * FIELD_OF_VIEW_MM))
    if isinstance(anatomy, ThoraxAnatomy):
        anatomy = _place_heart(anatomy, rng_anatomy)
    anatomy.ptv = _place_ptv(anatomy, rng_anatomy)
    if isinstance(anatomy, PelvisAnatomy):
        anatomy = _finish_pelvis(anatomy, rng_anatomy)
    plan = _plan(anatomy, rng_anatomy)
    grid, scan_start, scan_length = _ct_grid(config, rng_anatomy)

    # CT and structures, slice by slice
    nx, ny, nz = grid.size
    x, y = grid.axes()
    names = anatomy.structure_names()
    structures = {name: np.zeros((nz, ny, nx), np.uint8) for name in names}
    ct = np.empty((nz, ny, nx), np.int16)
    sigma_blur = [min(POINT_SPREAD_MM / s, 0.6) for s in grid.spacing[1::-1]]  # (y, x) pixels
    for k, za in enumerate(grid.template_z(scan_start, scan_length)):
        hu, masks = anatomy.paint(x, y, float(za))
        body = masks["Body"]
        for name in names:
            mask = masks.get(name)
            if mask is not None:
                structures[name][k] = mask & body
        hu = ndimage.gaussian_filter(hu, sigma_blur, mode="nearest")
        hu += rng_noise.standard_normal(hu.shape, dtype=np.float32) * np.float32(anatomy.noise_hu)
        ct[k] = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    scanner = None
    if config.sites:  # after the anatomy and on the CT only: dose, structures and outcome do not change
        scanner = SCANNER_SITES[int(rng_site.integers(config.sites))]
        ct = _apply_scanner(ct, scanner, rng_site)
    empty = [name for name in names if not structures[name].any()]
    for name in empty:
        del structures[name]
    if "PTV" not in structures:
        raise InputError(
            f"phantom {patient_id(index)}: the PTV vanishes on a {config.shape} grid with spacing "
            f"{config.grid_spacing}; use a finer grid"
        )

    # dose: coarse grid, resampled linearly onto the CT grid, zero outside the body, mean PTV = Rx
    import SimpleITK as sitk

    coarse = _coarse_grid(grid, scan_start, scan_length, config.dose_grid_mm)
    coarse_dose = _coarse_dose(anatomy, plan, coarse, scan_start, scan_length)
    reference = sitk.Image(nx, ny, nz, sitk.sitkFloat32)
    reference.SetSpacing(grid.spacing)
    reference.SetOrigin(grid.origin)
    resampled = sitk.Resample(
        _image(coarse_dose, coarse), reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    del reference
    dose = sitk.GetArrayFromImage(resampled)
    del resampled
    dose *= structures["Body"]
    ptv = structures["PTV"].astype(bool)
    ptv_mean = float(dose[ptv].mean())
    if not ptv_mean > 0:
        raise InputError(f"phantom {patient_id(index)}: the beams miss the PTV on this grid")
    dose *= np.float32(plan["prescription_gy"] / ptv_mean)

    voxel_cc = float(np.prod(grid.spacing)) / 1000.0
    metrics = {}
    for name, mask in structures.items():
        values = dose[mask.astype(bool)]
        metrics[name] = {
            "volume_cc": values.size * voxel_cc,
            "mean_gy": float(values.mean()),
            "max_gy": float(values.max()),
        }
    ptv_values = dose[ptv]
    metrics["PTV"].update(
        {"D95_gy": float(np.percentile(ptv_values, 5)), "D2_gy": float(np.percentile(ptv_values, 98))}
    )
    body_fraction = float(structures["Body"].mean())

    organ = anatomy.organ_at_risk()
    organ_dose = metrics[organ]["mean_gy"] if organ in metrics else 0.0
    ptv_cc = metrics["PTV"]["volume_cc"]
    logit = config.outcome_model().logit(organ, organ_dose, ptv_cc)
    probability = 1.0 / (1.0 + math.exp(-logit))
    outcome = int(rng_outcome.random() < probability)
    clinical = _clinical_row(index, anatomy.variant, anatomy.ptv.site, rng_clinical)
    if scanner is not None:  # `site` is the scanner site; the PTV's site is then `tumour_site`
        clinical["tumour_site"] = clinical.pop("site")
        clinical["site"] = scanner.name
    clinical["outcome"] = outcome

    def world(center):
        return [
            center[0],
            center[1] + grid.table_shift,
            scan_start + center[2] / TEMPLATE_LENGTH_MM * scan_length,
        ]

    z_scale = scan_length / TEMPLATE_LENGTH_MM
    ptv_radii_mm = [anatomy.ptv.radii[0], anatomy.ptv.radii[1], anatomy.ptv.radii[2] * z_scale]
    anatomy_dict = asdict(anatomy)
    parameters = _rounded(
        {
            "generator": {
                "name": "DeepDosimetrics phantom",
                **config.settings(),
                "index": index,
                "seed_sequence_entropy": [config.seed, index],
            },
            "patient": patient_id(index),
            "variant": anatomy.variant,
            "legs": getattr(anatomy, "legs", 2),
            "amputated_side": {"L": "left", "R": "right", None: None}[
                getattr(anatomy, "amputated_side", None)
            ],
            "geometry": {
                "size": list(grid.size),
                "spacing": list(grid.spacing),
                "origin": list(grid.origin),
                "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
                "scan_start_z_mm": scan_start,
                "scan_length_mm": scan_length,
                "template_z_scale": z_scale,
            },
            "body": {"target_fraction": target, "fraction": body_fraction, "scale": anatomy.scale},
            "ptv": {
                "site": anatomy.ptv.site,
                "center_mm": world(anatomy.ptv.center),
                "radii_mm": ptv_radii_mm,
                "margin_mm": anatomy.ptv.margin_mm,
                "volume_cc": ptv_cc,
            },
            "plan": plan,
            "dose_grid": {"size": list(coarse.size), "spacing": list(coarse.spacing)},
            "noise_hu": anatomy.noise_hu,
            **({"scanner": asdict(scanner)} if scanner is not None else {}),
            "structures": list(structures),
            "dose_metrics": metrics,
            "clinical": clinical,
            "outcome_model": {
                "organ": organ,
                "organ_mean_dose_gy": organ_dose,
                "ptv_volume_cc": ptv_cc,
                "logit": logit,
                "probability": probability,
                "outcome": outcome,
            },
            "anatomy_template": {
                "note": "in-plane mm centred on the field of view (world y = y + table shift); z in template "
                "mm (0..320 spans the scan)",
                "table_shift_mm": grid.table_shift,
                **anatomy_dict,
            },
        }
    )
    return PhantomPatient(
        id=patient_id(index),
        spacing=tuple(float(v) for v in grid.spacing),
        origin=tuple(float(v) for v in grid.origin),
        ct=ct,
        dose=dose,
        structures=structures,
        parameters=parameters,
    )


# --------------------------------------------------------------------------------------------------
# files


def _write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _is_done(folder: Path, config: PhantomConfig, index: int) -> bool:
    """Whether ``folder`` already holds patient ``index`` generated with the same settings."""
    try:
        parameters = json.loads((folder / "phantom.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = _rounded(
        {
            "name": "DeepDosimetrics phantom",
            **config.settings(),
            "index": index,
            "seed_sequence_entropy": [config.seed, index],
        }
    )
    if parameters.get("generator") != expected:
        return False
    names = parameters.get("structures", [])
    files = [folder / "ct.nrrd", folder / "dose.nrrd"] + [folder / "structures" / f"{n}.nrrd" for n in names]
    return all(path.is_file() for path in files)


def synthesize_patient(
    out_dir: Union[str, Path], index: int, config: PhantomConfig = PhantomConfig()
) -> Path:
    """Write patient ``index`` into ``out_dir/phantom_NNN`` (atomically; skipped when already there)."""
    out_dir = Path(out_dir)
    folder = out_dir / patient_id(index)
    if _is_done(folder, config, index):
        return folder
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the phantom cohort folder {out_dir}: {error}") from error
    patient = generate_patient(index, config)
    tmp = out_dir / f".{patient.id}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        patient.write(tmp)
        del patient
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=out_dir))
            os.replace(folder, old / folder.name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _remove_surplus_patients(out_dir: Path, patients: int) -> None:
    """Remove phantom patients beyond ``patients`` left by an earlier, larger run (only our own folders)."""
    for folder in sorted(out_dir.glob(f"{PATIENT_PREFIX}[0-9][0-9][0-9]*")):
        suffix = folder.name[len(PATIENT_PREFIX) :]
        if not (folder.is_dir() and suffix.isdigit() and int(suffix) >= patients):
            continue
        try:
            generator = json.loads((folder / "phantom.json").read_text(encoding="utf-8")).get("generator", {})
        except (OSError, ValueError):
            continue
        if generator.get("name") == "DeepDosimetrics phantom":
            shutil.rmtree(folder)


CLINICAL_COLUMNS = ("patient", "age", "sex", "smoking", "ecog", "site", "outcome")
#: with scanner sites: ``site`` is the scanner's, the PTV site moves to ``tumour_site``
CLINICAL_COLUMNS_SITES = ("patient", "age", "sex", "smoking", "ecog", "tumour_site", "site", "outcome")


def synthesize_cohort(
    out_dir: Union[str, Path],
    patients: int = 6,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Optional[Sequence[float]] = None,
    seed: int = 0,
    quiet: bool = True,
    sites: int = 0,
    outcome_scale: float = 1.0,
) -> Path:
    """Write a phantom cohort of ``patients`` patients into ``out_dir``; returns ``out_dir``.

    ``sites`` > 0 assigns each patient at random (its own stream) to one of the first ``sites`` scanner
    sites of ``SCANNER_SITES``: a ``site`` column in clinical.csv and the site's CT effect (HU offset, noise,
    slice thickness), which changes no dose, structure or outcome. ``outcome_scale`` multiplies the dose and
    volume coefficients of the outcome model (a stronger, easier-to-find signal for analysis demos).
    """
    from DeepDosimetricsLib.runtime.progress import progress_bar

    if int(patients) != patients or patients < 1:
        raise InputError(f"the number of phantom patients must be a positive integer, got {patients!r}")
    config = PhantomConfig(
        shape=tuple(shape), spacing=None if spacing is None else tuple(spacing), seed=seed, sites=sites,
        outcome_scale=outcome_scale,
    )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"phantom output {out_dir} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the phantom cohort folder {out_dir}: {error}") from error
    for pattern in (f".{PATIENT_PREFIX}*.tmp-*", f".{PATIENT_PREFIX}*.old-*"):
        for stale in out_dir.glob(pattern):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
    rows = []
    for index in progress_bar(range(int(patients)), total=int(patients), desc="synth", quiet=quiet):
        folder = synthesize_patient(out_dir, index, config)
        parameters = json.loads((folder / "phantom.json").read_text(encoding="utf-8"))
        rows.append(parameters["clinical"])
    _remove_surplus_patients(out_dir, int(patients))
    buffer = io.StringIO()
    columns = CLINICAL_COLUMNS_SITES if config.sites else CLINICAL_COLUMNS
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row[key] for key in columns})
    _write_text(out_dir / "clinical.csv", buffer.getvalue())
    cohort = {
        "generator": {"name": "DeepDosimetrics phantom", **config.settings()},
        "patients": [row["patient"] for row in rows],
        "layout": "one folder per patient: ct.nrrd (int16 HU), dose.nrrd (float32 Gy), structures/<Name>.nrrd "
        "(uint8 0/1), phantom.json (generating parameters); clinical.csv at the root",
        "variants": "index % 3 == 2: pelvis (one leg for indices 2, 8, 14, ..., two legs for 5, 11, ...); "
        "otherwise thorax",
        "clinical_columns": {
            "patient": "patient folder name",
            "age": "years at treatment",
            "sex": "M or F (pelvis patients are male)",
            "smoking": "never, former or current",
            "ecog": "ECOG performance status 0-2",
            "site": "PTV site: lung_left, lung_right, mediastinum or prostate",
            "outcome": "binary toxicity-like outcome drawn from outcome_model",
        },
        "outcome_model": config.outcome_model().describe(),
    }
    if config.sites:
        cohort["clinical_columns"]["tumour_site"] = cohort["clinical_columns"].pop("site")
        cohort["clinical_columns"]["site"] = (
            "scanner site (scanner_sites): changes the CT only, not the dose, structures or outcome"
        )
        cohort["clinical_columns"]["outcome"] = cohort["clinical_columns"].pop("outcome")
        cohort["scanner_sites"] = [asdict(site) for site in SCANNER_SITES[: config.sites]]
    _write_text(out_dir / "cohort.json", json.dumps(_rounded(cohort), indent=2) + "\n")
    return out_dir


__all__ = [
    "PhantomConfig",
    "PhantomPatient",
    "OutcomeModel",
    "OUTCOME_MODEL",
    "SCANNER_SITES",
    "ScannerSite",
    "generate_patient",
    "synthesize_patient",
    "synthesize_cohort",
    "patient_id",
    "patient_variant",
]
