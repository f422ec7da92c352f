"""DVH curves of the original and the reconstructed dose (``features.dosimetrics.cumulative_dvh``), drawn
as a PNG (matplotlib, Agg) that the page shows as a data URL: nothing is written to disk."""

from __future__ import annotations

import base64
import io
from typing import Dict, List, Tuple

import numpy as np

Curve = Tuple[np.ndarray, np.ndarray]


class _Histogram:
    """A cumulative DVH gathered slab by slab: counts of doses per ``width`` bin (doses below 0 as 0).

    Gives what ``features.dosimetrics.cumulative_dvh`` gives (axis 0, w, 2w, ... to one bin above the maximum;
    % of the voxels at or above each dose) without holding every voxel's dose at once.
    """

    def __init__(self, width: float):
        self.width = float(width)
        self.counts = np.zeros(0, np.int64)

    def add(self, doses: np.ndarray) -> None:
        if doses.size == 0:
            return
        bins = np.floor(np.maximum(doses.astype(np.float64), 0.0) / self.width).astype(np.int64)
        counts = np.bincount(bins)
        if counts.size > self.counts.size:
            counts[: self.counts.size] += self.counts
            self.counts = counts
        else:
            self.counts[: counts.size] += counts

    def curve(self) -> Curve:
        total = int(self.counts.sum())
        axis = np.arange(self.counts.size + 1, dtype=np.float64) * self.width
        at_least = total - np.concatenate([[0], np.cumsum(self.counts)])
        return axis, 100.0 * at_least / max(total, 1)


def scene_curves(current, recon_dose_path, bin_width_gy: float = 0.5, voxels: int = 4 << 20
                 ) -> Dict[str, Dict[str, Curve]]:
    """structure -> {"original": (dose, volume%), "reconstruction": ...}: the cumulative DVHs of the patient's
    structures from its nodes in the scene (``review.scene.PatientScene``): the dose node's voxels and each
    structure's labelmap box, a few slices at a time; the reconstructed dose is read from its file slab by
    slab (no volume read again, no float copy of a whole structure)."""
    import slicer

    from DeepDosimetricsLib.review.scene import VolumeFile, segment_masks

    if current.dose is None or current.segmentation is None:
        return {}
    dose = slicer.util.arrayFromVolume(current.dose)  # the node's voxels (its non-zero box), no copy
    offset = current.dose_offset
    recon = ceiling = None
    if recon_dose_path is not None:
        recon = VolumeFile(recon_dose_path)
        if recon.shape != tuple(reversed(current.ct.GetImageData().GetDimensions())):
            recon = None
        else:  # a poorly trained model may decode anything: bound the axis by the original's range
            ceiling = float(np.nanmax(dose)) * 2.0 + 1.0 if dose.size else 1.0
    curves: Dict[str, Dict[str, Curve]] = {}
    for name, box, mask in segment_masks(current.segmentation):
        if not mask.any():
            continue
        original, decoded = _Histogram(bin_width_gy), _Histogram(bin_width_gy)
        step = max(1, voxels // max(1, mask[0].size))
        for z in range(box[0].start, box[0].stop, step):
            part = (slice(z, min(z + step, box[0].stop)), box[1], box[2])
            inside = mask[part[0].start - box[0].start : part[0].stop - box[0].start]
            values = np.zeros(inside.shape, np.float32)  # the dose is 0 outside its node's box
            inner = tuple(slice(max(b.start, o), min(b.stop, o + n)) for b, o, n in zip(part, offset, dose.shape))
            if all(s.stop > s.start for s in inner):
                values[tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(inner, part))] = \
                    dose[tuple(slice(s.start - o, s.stop - o) for s, o in zip(inner, offset))]
            original.add(values[inside])
            if recon is not None:
                values = np.nan_to_num(recon.read(part), copy=False)
                np.clip(values, 0.0, ceiling, out=values)
                decoded.add(values[inside])
        entry = {"original": original.curve()}
        if recon is not None:
            entry["reconstruction"] = decoded.curve()
        curves[name] = entry
    return curves


def dvh_png(curves: Dict[str, Dict[str, Curve]], shown: List[str], title: str = "") -> str:
    """A data URL (PNG) of the curves of ``shown``: solid original, dashed reconstruction."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2, 3.4), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    colors = matplotlib.colormaps["tab10"]
    for index, name in enumerate(n for n in shown if n in curves):
        color = colors(index % 10)
        dose, volume = curves[name]["original"]
        axes.plot(dose, volume, color=color, lw=1.6, label=name)
        if "reconstruction" in curves[name]:
            dose, volume = curves[name]["reconstruction"]
            axes.plot(dose, volume, color=color, lw=1.4, ls="--")
    axes.set_xlabel("dose (Gy)")
    axes.set_ylabel("volume (%)")
    axes.set_ylim(0, 102)
    axes.grid(alpha=0.3)
    axes.set_title(title or "DVH: original (solid), reconstruction (dashed)", fontsize=9)
    if axes.lines:
        axes.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
