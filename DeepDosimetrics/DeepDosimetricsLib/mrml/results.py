"""Encoding results in the scene: reconstructed channels, residuals and labelmaps as nodes, shown over the CT.

One implementation for the module's Logic (a patient encoded from the scene) and for the per-patient
``.mrb`` scenes the ``encode --scene`` job writes (:func:`DeepDosimetricsLib.mrml.snapshots.write_patient_scene`).
A patient's ``recon/`` folder holds ``<stem>.nrrd`` (reconstruction), ``<stem>_residual.nrrd`` (residual)
and, for structure channels, ``<stem>_label.nrrd`` (the thresholded reconstruction), where ``stem`` is
:func:`DeepDosimetricsLib.deep.encode.reconstruction.channel_stem` of the channel label.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import SimpleITK as sitk

from DeepDosimetricsLib.deep.channels import ChannelSpec, parse_channels
from DeepDosimetricsLib.deep.encode.reconstruction import channel_stem
from DeepDosimetricsLib.mrml.display import (
    set_ct_display,
    set_dose_display,
    set_residual_display,
    show_reconstruction,
)
from DeepDosimetricsLib.mrml.headless import current_scene
from DeepDosimetricsLib.mrml.patients import export_patient_folder
from DeepDosimetricsLib.mrml.tables import table_from_dataframe
from DeepDosimetricsLib.mrml.volumes import image_to_volume
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError, InputError
from DeepDosimetricsLib.runtime.jobs import PARTIAL_EXIT

PathLike = Union[str, os.PathLike]
#: the window shown when the model has several (first match wins); snapshots use the same order
PREFERRED_WINDOWS = ("window:soft_tissue", "window:full", "window:lung", "window:bone", "window:brain")


@dataclass
class ReconstructionNodes:
    """The nodes of one patient's reconstruction, by channel label, and the channel to show."""

    reconstructions: Dict[str, Any] = field(default_factory=dict)
    residuals: Dict[str, Any] = field(default_factory=dict)
    labels: Dict[str, Any] = field(default_factory=dict)
    specs: List[ChannelSpec] = field(default_factory=list)

    @property
    def shown(self) -> Optional[ChannelSpec]:
        """The channel to show: a preferred window, else any window, else the first channel."""
        by_label = {spec.label: spec for spec in self.specs if spec.label in self.reconstructions}
        for label in PREFERRED_WINDOWS:
            if label in by_label:
                return by_label[label]
        windows = [spec for spec in by_label.values() if spec.kind == "window"]
        return windows[0] if windows else next(iter(by_label.values()), None)

    def by_stem(self) -> Dict[str, Any]:
        """File stem -> node (``window_soft_tissue``, ``window_soft_tissue_residual``, ``mask_PTV_label``)."""
        nodes: Dict[str, Any] = {}
        for spec in self.specs:
            stem = channel_stem(spec.label)
            for suffix, table in (("", self.reconstructions), ("_residual", self.residuals), ("_label", self.labels)):
                if spec.label in table:
                    nodes[stem + suffix] = table[spec.label]
        return nodes


def specs_from_folder(recon_dir: PathLike) -> List[ChannelSpec]:
    """The channels of a ``recon/`` folder, read back from its file stems (when the model is not at hand).

    A stem is taken for the channel whose :func:`channel_stem` it is (``window_-200_600`` ->
    ``window:-200/600``); a file no channel label gives back raises InputError.
    """
    specs = []
    for path in sorted(Path(recon_dir).glob("*.nrrd")):
        stem = path.name[: -len(".nrrd")]
        if stem.endswith(("_residual", "_label")):
            continue
        kind, _, rest = stem.partition("_")
        candidates = {"window": [f"window:{rest}", "window:" + rest.replace("_", "/", 1)],
                      "mask": [f"mask:{rest}"], "dose": ["dose" if not rest else f"dose:{rest}"]}.get(kind, [])
        spec = None
        for label in candidates:
            try:
                parsed = parse_channels(label)[0]
            except InputError:
                continue
            if channel_stem(parsed.label) == stem:
                spec = parsed
                break
        if spec is None:
            raise InputError(f"{path}: no channel label gives the file name {stem!r}")
        specs.append(spec)
    return specs


def add_reconstruction_nodes(
    recon_dir: PathLike,
    name_prefix: str,
    specs: Optional[Sequence[ChannelSpec]] = None,
    scene: Any = None,
) -> ReconstructionNodes:
    """Add a patient's reconstructed channels (and residuals, labelmaps when present) to the scene.

    Args:
        recon_dir: the patient's ``recon/`` folder.
        name_prefix: node names start with it (``<prefix> reconstruction <channel>``).
        specs: the model's channels (default: read back from the file names).
        scene: the scene (default: the current one).
    """
    recon_dir = Path(recon_dir)
    scene = current_scene(scene)
    specs = list(specs) if specs is not None else specs_from_folder(recon_dir)
    nodes = ReconstructionNodes(specs=specs)
    for spec in specs:
        stem = channel_stem(spec.label)
        path = recon_dir / f"{stem}.nrrd"
        if not path.is_file():
            raise InputError(f"reconstruction {path} does not exist")
        node = image_to_volume(sitk.ReadImage(str(path)), f"{name_prefix} reconstruction {spec.label}", scene)
        if spec.kind == "dose":
            set_dose_display(node)
        nodes.reconstructions[spec.label] = node
        residual_path = recon_dir / f"{stem}_residual.nrrd"
        if residual_path.is_file():
            residual = image_to_volume(sitk.ReadImage(str(residual_path)), f"{name_prefix} residual {spec.label}", scene)
            set_residual_display(residual)
            nodes.residuals[spec.label] = residual
        label_path = recon_dir / f"{stem}_label.nrrd"
        if spec.kind == "mask" and label_path.is_file():
            nodes.labels[spec.label] = image_to_volume(
                sitk.ReadImage(str(label_path)), f"{name_prefix} reconstruction {spec.label} label", scene,
                labelmap=True,
            )
    return nodes


def show_reconstruction_nodes(
    nodes: ReconstructionNodes, ct_node: Any, dose_node: Any = None, segmentation_node: Any = None,
    opacity: float = 0.5,
) -> None:
    """CT below, the shown channel's reconstruction above at ``opacity``; a window channel's CT and
    reconstruction in that channel's window/level."""
    shown = nodes.shown
    recon = nodes.reconstructions.get(shown.label) if shown else None
    residual = nodes.residuals.get(shown.label) if shown else None
    show_reconstruction(ct_node, recon, residual, dose_node, segmentation_node, opacity)
    if shown is not None and shown.kind == "window" and shown.width:
        for node in (ct_node, recon):
            set_ct_display(node, window=shown.width, level=shown.level)


def load_encoding_results(
    output_dir: PathLike,
    patient_id: str,
    ct_node: Any,
    dose_node: Any = None,
    segmentation_node: Any = None,
    specs: Optional[Sequence[ChannelSpec]] = None,
    scene: Any = None,
) -> Dict[str, Any]:
    """Add one patient's encoding results to the scene and show them over the CT.

    Reads ``<out>/<patient>/features.csv`` (a table node, key ``features``) and the ``recon/`` folder when
    the job reconstructed (keys are file stems, see :meth:`ReconstructionNodes.by_stem`). A patient the
    job skipped raises InputError with the job's reason (from ``skipped.csv``).
    """
    import pandas as pd

    scene = current_scene(scene if scene is not None else ct_node.GetScene())
    patient_dir = Path(output_dir) / str(patient_id)
    if not patient_dir.is_dir():
        skipped = Path(output_dir) / "skipped.csv"
        if skipped.is_file():
            reasons = pd.read_csv(skipped, dtype=str)
            reasons = reasons[reasons["patient"] == str(patient_id)]
            if len(reasons):
                raise InputError(f"patient {patient_id} was not encoded: {reasons['reason'].iloc[0]}")
        raise InputError(f"encoding output {patient_dir} does not exist")
    added: Dict[str, Any] = {}
    features = patient_dir / "features.csv"
    if features.is_file():
        added["features"] = table_from_dataframe(pd.read_csv(features), f"{ct_node.GetName()} deep features", scene)
    recon_dir = patient_dir / "recon"
    if recon_dir.is_dir() and any(recon_dir.glob("*.nrrd")):
        nodes = add_reconstruction_nodes(recon_dir, ct_node.GetName(), specs, scene)
        added.update(nodes.by_stem())
        show_reconstruction_nodes(nodes, ct_node, dose_node, segmentation_node)
    return added


def encode_nodes(
    ct_node: Any,
    segmentation_node: Any,
    dose_node: Any,
    model_folder: Optional[PathLike],
    output_folder: Optional[PathLike],
    arguments: Callable[[Path, Path], List[str]],
    run_job: Callable[[List[str], bool], Any],
    blocking: bool = True,
    scene: Any = None,
) -> Any:
    """Encode the patient of the scene nodes: a one-patient cohort in a temporary folder, encoded by a job.

    ``arguments(cohort_folder, output_folder)`` gives the ``encode`` command line (a ``--cache`` in the
    temporary folder is added) and ``run_job(arguments, blocking)`` runs it (the module Logic's ``runJob``).
    Blocking: the results are added to the scene (:func:`load_encoding_results`), the temporary folder is
    removed and file stem -> node is returned. Not blocking: the started job is returned with ``patientId``
    and ``workFolder`` (the temporary folder, for the caller to remove once the job has finished) set.
    Without ``output_folder`` the results go to the temporary folder.
    """
    if model_folder is None or not Path(model_folder).is_dir():
        raise InputError(f"model folder {model_folder} does not exist")
    work = Path(tempfile.mkdtemp(prefix="DeepDosimetrics-encode-"))
    try:
        patient_folder = export_patient_folder(ct_node, segmentation_node, dose_node, work / "cohort")
        output_folder = Path(output_folder) if output_folder else work / "out"
        job = run_job(arguments(patient_folder.parent, output_folder) + ["--cache", str(work / "cache")], blocking)
        job.patientId = patient_folder.name
        if not blocking:
            job.workFolder = work
            return job
        if job.returncode == PARTIAL_EXIT:  # the one patient was left out (e.g. a channel the model needs)
            raise DeepDosimetricsError(f"the patient could not be encoded: {job.left_out_message()}")
        return load_encoding_results(output_folder, patient_folder.name, ct_node, dose_node, segmentation_node,
                                     scene=scene)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if blocking:
            shutil.rmtree(work, ignore_errors=True)


def load_prediction_results(out_dir: PathLike, scene: Any = None) -> Dict[str, Any]:
    """An outcome analysis (``predict --out``) in the scene: ``summary.csv`` as a table node and, for a
    binary endpoint, the ROC curves of ``predictions.csv`` as a plot chart: {"summary": ..., "roc": ... or None}.
    """
    import pandas as pd

    from DeepDosimetricsLib.mrml.tables import roc_chart

    out = Path(out_dir)
    scene = current_scene(scene)
    if not (out / "summary.csv").is_file():
        raise InputError(f"{out / 'summary.csv'} does not exist: run the outcome analysis first")
    summary = table_from_dataframe(pd.read_csv(out / "summary.csv"), f"{out.name} outcome summary", scene)
    added = {"summary": summary, "roc": None}
    predictions = out / "predictions.csv"
    if predictions.is_file():
        frame = pd.read_csv(predictions)
        if "event" not in frame.columns:  # a binary endpoint (a time-to-event one has no ROC curve)
            added["roc"] = roc_chart(frame, f"{out.name} ROC", scene)[1]
    return added
