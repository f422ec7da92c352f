"""Inspection pictures of a reconstruction: PNG snapshots (numpy + matplotlib, no Slicer) and the
per-patient Slicer scene (``.mrb``, written through the MRML modules, imported only when needed).

A snapshot is one PNG per plane (axial, coronal, sagittal) through the centre of the PTV, with three
panels: original | reconstruction | residual. The original is read back as reconstruction minus
residual (both on the original CT grid), i.e. the CT clipped to the channel's window, the dose or the
mask exactly as the model had to reproduce it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from DeepDosimetricsLib.deep.channels import ChannelSpec
from DeepDosimetricsLib.deep.encode.reconstruction import channel_stem

PathLike = Union[str, os.PathLike]
PLANES = ("axial", "coronal", "sagittal")
#: the window shown in snapshots when the model has several (first match wins); the same order as the
#: scenes of :mod:`DeepDosimetricsLib.mrml.results` (which imports slicer, so it is repeated here)
PREFERRED_WINDOWS = ("window:soft_tissue", "window:full", "window:lung", "window:bone", "window:brain")


def display_channel(specs: Sequence[ChannelSpec]) -> ChannelSpec:
    """The channel to show: the soft-tissue (or another preset) window, else any window, else the first."""
    by_label = {spec.label: spec for spec in specs}
    for label in PREFERRED_WINDOWS:
        if label in by_label:
            return by_label[label]
    windows = [spec for spec in specs if spec.kind == "window"]
    return windows[0] if windows else specs[0]


def _read(path: Path):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def centre_index(mask: Optional[np.ndarray], shape: Sequence[int]) -> tuple[int, int, int]:
    """(z, y, x) index of the mask's centre of mass, or the volume centre for a missing or empty mask."""
    if mask is not None and np.any(mask):
        return tuple(int(round(v)) for v in np.argwhere(mask).mean(axis=0))  # type: ignore[return-value]
    return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]


def plane(volume: np.ndarray, name: str, index: Sequence[int]) -> np.ndarray:
    """A 2D plane of a (z, y, x) volume, rows top to bottom as a radiologist reads it."""
    z, y, x = index
    if name == "axial":
        return volume[z]  # rows: anterior (low y in LPS) at the top
    if name == "coronal":
        return volume[::-1, y, :]  # superior at the top
    if name == "sagittal":
        return volume[::-1, :, x]
    raise ValueError(f"unknown plane {name!r}")


def _aspect(name: str, spacing_xyz: Sequence[float]) -> float:
    sx, sy, sz = spacing_xyz
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[name]


def write_snapshots(
    recon_dir: PathLike,
    out_dir: PathLike,
    specs: Sequence[ChannelSpec],
    channel: Optional[ChannelSpec] = None,
    target: str = "mask:PTV",
) -> dict[str, Path]:
    """``<out_dir>/<plane>.png`` for the three planes through the PTV centre; returns plane -> path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    recon_dir, out = Path(recon_dir), Path(out_dir)
    spec = channel or display_channel(specs)
    stem = channel_stem(spec.label)
    image, recon = _read(recon_dir / f"{stem}.nrrd")
    residual_path = recon_dir / f"{stem}_residual.nrrd"
    residual = _read(residual_path)[1] if residual_path.is_file() else np.zeros_like(recon)
    original = recon - residual
    target_mask = None
    target_path = recon_dir / f"{channel_stem(target)}.nrrd"
    target_residual = recon_dir / f"{channel_stem(target)}_residual.nrrd"
    if target_path.is_file() and target_residual.is_file():
        target_mask = (_read(target_path)[1] - _read(target_residual)[1]) >= 0.5  # the original PTV
    index = centre_index(target_mask, recon.shape)
    if spec.kind == "window":
        vmin, vmax, unit = spec.lower_hu, spec.upper_hu, "HU"
    else:
        vmin, vmax = 0.0, float(max(np.max(original), np.max(recon), 1e-6))
        unit = "Gy" if spec.kind == "dose" else "probability"
    limit = float(np.max(np.abs(residual))) or 1.0
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in PLANES:
        figure = plt.figure(figsize=(12, 4.2))
        aspect = _aspect(name, image.GetSpacing())
        panels = [(original, "original", "gray", vmin, vmax), (recon, "reconstruction", "gray", vmin, vmax),
                  (residual, "residual", "RdBu_r", -limit, limit)]
        for column, (volume, title, cmap, lo, hi) in enumerate(panels):
            # fixed axes positions: no layout engine (it costs seconds per figure)
            axis = figure.add_axes((0.01 + column / 3.0, 0.04, 0.25, 0.84))
            colorbar_axis = figure.add_axes((0.27 + column / 3.0, 0.1, 0.012, 0.72))
            shown = axis.imshow(plane(volume, name, index), cmap=cmap, vmin=lo, vmax=hi, aspect=aspect,
                                interpolation="nearest")
            if target_mask is not None and target_mask.any():
                axis.contour(plane(target_mask.astype(np.float32), name, index), levels=[0.5],
                             colors="yellow", linewidths=0.8)
            axis.set_title(title)
            axis.set_axis_off()
            figure.colorbar(shown, cax=colorbar_axis, label=unit)
        figure.suptitle(f"{spec.label}: {name} plane through the PTV centre (z, y, x) = {index}")
        path = out / f"{name}.png"
        partial = out / f".{name}.{os.getpid()}.part.png"
        figure.savefig(partial, dpi=90)
        plt.close(figure)
        os.replace(partial, path)
        written[name] = path
    return written


def slicer_available() -> bool:
    """Whether slicer (the application or the slicer-core wheel) can be imported."""
    import importlib.util

    return importlib.util.find_spec("slicer") is not None


def write_patient_scene(
    cohort_dir: PathLike,
    patient_id: str,
    recon_dir: PathLike,
    out_path: PathLike,
    specs: Sequence[ChannelSpec],
    snapshot_dir: Optional[PathLike] = None,
) -> Path:
    """A ``.mrb`` scene: CT background, reconstruction foreground at 50%, residual (diverging map),
    dose (zero hidden), structures as a segmentation, reconstructed channels as volumes.

    With ``snapshot_dir``, also the MRML slice-logic pictures ``mrml_<view>.png`` through the PTV centre.
    """
    from DeepDosimetricsLib.data.cohort import Cohort
    from DeepDosimetricsLib.data.synonyms import choose_target
    from DeepDosimetricsLib.mrml import bundles, headless, patients, results, slices

    patient = Cohort.open(cohort_dir, patient_ids=[patient_id])[patient_id]
    wired = headless.create_headless_scene()
    try:
        nodes = patients.add_patient_nodes(patient)
        recon = results.add_reconstruction_nodes(recon_dir, patient_id, specs, wired.scene)
        results.show_reconstruction_nodes(recon, nodes.ct, nodes.dose, nodes.segmentation, 0.5)
        if snapshot_dir is not None:
            point = None
            target = choose_target(patient.structure_names) if patient.structure_names else None
            if target:  # else the volume centre
                from DeepDosimetricsLib.mrml.volumes import mask_center_ras

                point = mask_center_ras(patient.structure(target), nodes.ct)
            shown = recon.shown
            foreground = recon.reconstructions.get(shown.label) if shown else None
            slices.write_snapshots(Path(snapshot_dir) / "mrml", nodes.ct, point, foreground, 0.5)
        return bundles.save_scene_bundle(out_path, wired.scene)
    finally:
        headless.close_headless_scene(wired)
