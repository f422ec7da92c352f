"""One phantom patient in memory: ``generate_patient`` draws its anatomy, CT, structures, dose and
clinical row from its own random streams; ``PhantomPatient.write`` writes its folder.

The patient's streams are the children of ``SeedSequence([seed, index])``: 0 anatomy (then plan and
grid), 1 CT noise, 2 clinical variables, 3 outcome, 4 scanner site (the first four are those of generator
version 1). ``phantom.json`` holds every generating parameter, the plan, dose metrics and the clinical row.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, Tuple, Union

import numpy as np

from DeepDosimetricsLib.data.phantoms.anatomy import (
    FIELD_OF_VIEW_MM,
    TEMPLATE_LENGTH_MM,
    PelvisAnatomy,
    ThoraxAnatomy,
    draw_anatomy,
    finish_pelvis,
    fit_body_scale,
    place_heart,
    place_ptv,
    rounded_uniform,
)
from DeepDosimetricsLib.data.phantoms.config import GENERATOR_NAME, PhantomConfig, patient_id
from DeepDosimetricsLib.data.phantoms.dose import beam_plan, coarse_dose
from DeepDosimetricsLib.data.phantoms.grid import coarse_grid, ct_grid, grid_image
from DeepDosimetricsLib.data.phantoms.outcome import clinical_row, draw_outcome
from DeepDosimetricsLib.data.phantoms.scanner import (
    HU_MAX,
    HU_MIN,
    POINT_SPREAD_MM,
    SCANNER_SITES,
    apply_scanner,
)
from DeepDosimetricsLib.runtime.atomic import write_text_atomic
from DeepDosimetricsLib.runtime.errors import InputError


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
        write_text_atomic(folder / "phantom.json", json.dumps(self.parameters, indent=2) + "\n")
        return folder


def rounded(value):
    """JSON-friendly copy with floats rounded (stable text)."""
    if isinstance(value, dict):
        return {str(k): rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return round(float(value), 4)
    if isinstance(value, np.integer):
        return int(value)
    return value


def generate_patient(index: int, config: PhantomConfig = PhantomConfig()) -> PhantomPatient:
    """Generate patient ``index`` of the cohort defined by ``config`` in memory."""
    from scipy import ndimage

    if index < 0:
        raise InputError(f"phantom patient index must be >= 0, got {index}")
    streams = config.seed_sequence(index).spawn(5)  # children 0-3 are those of generator version 1
    rng_anatomy, rng_noise, rng_clinical, rng_outcome, rng_site = (np.random.default_rng(s) for s in streams)
    anatomy = draw_anatomy(index, rng_anatomy)
    one_leg = isinstance(anatomy, PelvisAnatomy) and anatomy.legs == 1
    low, high = (0.38, 0.46) if one_leg else (0.40, 0.50)
    target = rounded_uniform(rng_anatomy, low, high)
    anatomy = replace(anatomy, scale=fit_body_scale(anatomy, target, 0.47 * FIELD_OF_VIEW_MM))
    if isinstance(anatomy, ThoraxAnatomy):
        anatomy = place_heart(anatomy, rng_anatomy)
    anatomy.ptv = place_ptv(anatomy, rng_anatomy)
    if isinstance(anatomy, PelvisAnatomy):
        anatomy = finish_pelvis(anatomy, rng_anatomy)
    plan = beam_plan(anatomy, rng_anatomy)
    grid, scan_start, scan_length = ct_grid(config, rng_anatomy)

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
        ct = apply_scanner(ct, scanner, rng_site)
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

    coarse = coarse_grid(grid, scan_start, scan_length, config.dose_grid_mm)
    coarse_gy = coarse_dose(anatomy, plan, coarse, scan_start, scan_length)
    reference = sitk.Image(nx, ny, nz, sitk.sitkFloat32)
    reference.SetSpacing(grid.spacing)
    reference.SetOrigin(grid.origin)
    resampled = sitk.Resample(
        grid_image(coarse_gy, coarse), reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32
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
    logit, probability, outcome = draw_outcome(config.outcome_model(), organ, organ_dose, ptv_cc, rng_outcome)
    clinical = clinical_row(patient_id(index), anatomy.variant, anatomy.ptv.site, rng_clinical)
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
    parameters = rounded(
        {
            "generator": {
                "name": GENERATOR_NAME,
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
