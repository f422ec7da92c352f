"""The anatomy of a phantom patient: analytic shapes painted slice by slice (HU and structure masks).

Anatomy (painted slice by slice so a 512x512x350 patient stays well under 2 GB):
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
    cancellous bone 200-300, cortical bone 700-1200 (before the scanner's blur and noise, see ``scanner``).

Coordinates: in-plane mm centred on the field of view (``FIELD_OF_VIEW_MM``); z in template mm, 0..320
spanning the scan whatever its length. The body size is fitted per patient (``fit_body_scale``) so that
the body fills 40-50% of a default field of view (one-legged: 38-46%), as in real chest CTs.

Drawing order (each from the patient's anatomy stream): ``draw_anatomy``, the body-size fit,
``place_heart`` (thorax), ``place_ptv``, ``finish_pelvis`` (pelvis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import numpy as np

from DeepDosimetricsLib.data.phantoms.outcome import OUTCOME_MODEL

FIELD_OF_VIEW_MM = 400.0
TEMPLATE_LENGTH_MM = 320.0  # anatomy is described on a 320-mm z template spanning the scan

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


def rounded_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A uniform draw from [low, high) rounded to 3 decimals (stable text in phantom.json)."""
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


def draw_anatomy(index: int, rng: np.random.Generator) -> Anatomy:
    """The anatomy parameters of patient ``index`` (before the body-size fit)."""
    variant, legs = patient_variant(index)
    common = dict(
        variant=variant,
        power=rounded_uniform(rng, 2.2, 2.7) if variant == "thorax" else rounded_uniform(rng, 2.1, 2.5),
        scale=1.0,
        y_center=rounded_uniform(rng, -8.0, 8.0),
        fat_mm=rounded_uniform(rng, 8.0, 26.0) if variant == "thorax" else rounded_uniform(rng, 12.0, 32.0),
        wall_mm=rounded_uniform(rng, 12.0, 17.0),
        wobble=(
            rounded_uniform(rng, 0.02, 0.05),
            rounded_uniform(rng, 0.0, 2 * math.pi),
            rounded_uniform(rng, 0.02, 0.04),
            rounded_uniform(rng, 0.0, 2 * math.pi),
        ),
        disc_phase=rounded_uniform(rng, 0.0, 26.0),
        noise_hu=rounded_uniform(rng, 10.0, 20.0),
    )
    lobes = (
        rounded_uniform(rng, 0.0, 0.1),
        rounded_uniform(rng, 0.0, 2 * math.pi),
        rounded_uniform(rng, 0.0, 0.08),
        rounded_uniform(rng, 0.0, 2 * math.pi),
    )
    if variant == "thorax":
        width, depth = rounded_uniform(rng, 148.0, 168.0), rounded_uniform(rng, 118.0, 138.0)
        base_l = rounded_uniform(rng, 20.0, 40.0)
        anatomy = ThoraxAnatomy(
            width_mm=width,
            depth_mm=depth,
            ptv=Ptv("pending", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 5.0, lobes),
            lung_base=(base_l, round(base_l + rounded_uniform(rng, 5.0, 15.0), 3)),
            lung_apex=rounded_uniform(rng, 310.0, 345.0),
            dome_mm=rounded_uniform(rng, 30.0, 42.0),
            heart_radii=(rounded_uniform(rng, 55.0, 66.0), rounded_uniform(rng, 42.0, 52.0), rounded_uniform(rng, 48.0, 58.0)),
            heart_angle=rounded_uniform(rng, -40.0, -20.0),
            carina_z=rounded_uniform(rng, 205.0, 235.0),
            rib_phase=rounded_uniform(rng, 0.0, 26.0),
            lung_hu=rounded_uniform(rng, -870.0, -825.0),
            **common,
        )
        return anatomy
    width, depth = rounded_uniform(rng, 155.0, 172.0), rounded_uniform(rng, 118.0, 136.0)
    split_z = rounded_uniform(rng, 45.0, 65.0)
    hip_z = round(split_z + rounded_uniform(rng, 65.0, 80.0), 3)
    bladder_scale = rounded_uniform(rng, 0.75, 1.2)
    bladder_radii = (
        round(42.0 * bladder_scale, 3),
        round(32.0 * bladder_scale, 3),
        round(32.0 * bladder_scale, 3),
    )
    gas = []
    for _ in range(int(rng.integers(3, 8))):
        gas.append(
            (
                rounded_uniform(rng, -90.0, 90.0),
                rounded_uniform(rng, -60.0, 20.0),
                rounded_uniform(rng, hip_z + 80.0, 315.0),
                rounded_uniform(rng, 6.0, 14.0),
            )
        )
    return PelvisAnatomy(
        width_mm=width,
        depth_mm=depth,
        ptv=Ptv("prostate", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 7.0, lobes),
        legs=int(legs),
        amputated_side=(("L", "R")[int(rng.integers(0, 2))] if legs == 1 else None),
        split_z=split_z,
        stump_z=round(split_z - rounded_uniform(rng, 15.0, 35.0), 3),
        thigh_radii=(rounded_uniform(rng, 76.0, 90.0), rounded_uniform(rng, 80.0, 95.0)),
        hip_z=hip_z,
        bladder_radii=bladder_radii,
        rectum_radius=rounded_uniform(rng, 14.0, 18.0),
        gas_bubbles=tuple(gas),
        **common,
    )


def place_heart(anatomy: ThoraxAnatomy, rng: np.random.Generator) -> ThoraxAnatomy:
    """The heart of a (size-fitted) thorax: on the left dome, against the anterior chest wall."""
    rx, ry, rz = anatomy.heart_radii
    hz = round(anatomy.lung_base[0] + anatomy.dome_mm + 0.55 * rz, 3)
    _, b_c, _ = anatomy.cavity(hz)
    center = (
        rounded_uniform(rng, 15.0, 30.0),
        round(anatomy.y_center - b_c + 0.9 * ry + rounded_uniform(rng, 0.0, 6.0), 3),
        hz,
    )
    return replace(anatomy, heart_center=center)


def place_ptv(anatomy: Anatomy, rng: np.random.Generator) -> Ptv:
    """The PTV of a (size-fitted) anatomy: in a lung or the mediastinum, or prostate-like."""
    lobes = anatomy.ptv.lobes
    if isinstance(anatomy, ThoraxAnatomy):
        site = ("lung_left", "lung_right", "mediastinum")[int(rng.choice(3, p=[0.4, 0.4, 0.2]))]
        if site == "mediastinum":
            radii = tuple(rounded_uniform(rng, 16.0, 28.0) for _ in range(3))
            za = rounded_uniform(
                rng, anatomy.heart_center[2] + 0.6 * anatomy.heart_radii[2], anatomy.carina_z + 10.0
            )
            _, body_y = anatomy.spine_positions(za)
            center = (rounded_uniform(rng, -5.0, 15.0), round(body_y - 45.0 - radii[1] * 0.4, 3), za)
            return Ptv(site, center, radii, 5.0, lobes)
        side = "L" if site == "lung_left" else "R"
        base = anatomy.lung_base[0 if side == "L" else 1]
        heart_top = anatomy.heart_center[2] + 0.8 * anatomy.heart_radii[2]
        if rng.random() < 0.6:  # at the level of the heart (lower lobes), else above it
            za = rounded_uniform(rng, base + anatomy.dome_mm + 10.0, heart_top)
        else:
            za = rounded_uniform(rng, heart_top, anatomy.lung_apex - 80.0)
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
    prostate = (rounded_uniform(rng, 17.0, 24.0), rounded_uniform(rng, 14.0, 20.0), rounded_uniform(rng, 16.0, 24.0))
    za = round(anatomy.hip_z - rounded_uniform(rng, 5.0, 20.0), 3)
    cy = rounded_uniform(rng, -25.0, -10.0) + anatomy.y_center
    margin = 7.0
    radii = tuple(round(r + margin, 3) for r in prostate)
    return Ptv("prostate", (rounded_uniform(rng, -4.0, 4.0), cy, za), radii, margin, lobes)


def finish_pelvis(anatomy: PelvisAnatomy, rng: np.random.Generator) -> PelvisAnatomy:
    """Bladder above and rectum behind the prostate, once the PTV is placed."""
    px, py, pz = anatomy.ptv.center
    _, pry, prz = anatomy.ptv.radii
    bz = anatomy.bladder_radii[2]
    bladder_center = (round(px, 3), round(py - 6.0, 3), round(pz + prz - anatomy.ptv.margin_mm + bz - 4.0, 3))
    rectum_center = (
        round(px + rounded_uniform(rng, -4.0, 4.0), 3),
        round(py + pry - anatomy.ptv.margin_mm + anatomy.rectum_radius + 1.0, 3),
    )
    return replace(anatomy, bladder_center=bladder_center, rectum_center=rectum_center)


def fit_body_scale(anatomy: Anatomy, target: float, max_half_extent: float) -> float:
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
