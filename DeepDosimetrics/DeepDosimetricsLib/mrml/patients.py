"""A `Patient` <-> scene nodes: the library's patient built from CT, segmentation, labelmap and dose nodes,
and a patient added to the scene as nodes under a subject-hierarchy patient item."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Union

import SimpleITK as sitk
import slicer

from DeepDosimetricsLib.mrml.display import set_ct_display, set_dose_display
from DeepDosimetricsLib.mrml.headless import current_scene
from DeepDosimetricsLib.mrml.segments import add_segmentation, labelmap_to_images, segmentation_to_images
from DeepDosimetricsLib.mrml.volumes import (
    DOSE_ATTRIBUTE,
    image_to_volume,
    is_dose_volume,
    node_label,
    volume_to_image,
)
from DeepDosimetricsLib.runtime.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from DeepDosimetricsLib.data.patient import Patient

log = logging.getLogger(__name__)


def _patient_id_for(ct_node: Any) -> str:
    """The subject-hierarchy patient name above the CT, else the CT node's name."""
    scene = ct_node.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene) if scene else None
    if hierarchy is not None:
        item = hierarchy.GetItemByDataNode(ct_node)
        while item and item != hierarchy.GetSceneItemID():
            if hierarchy.GetItemLevel(item) == "Patient":
                return hierarchy.GetItemName(item)
            item = hierarchy.GetItemParent(item)
    return ct_node.GetName()


def patient_from_nodes(
    ct_node: Any,
    segmentation_node: Any = None,
    labelmap_nodes: Sequence[Any] = (),
    dose_node: Any = None,
    patient_id: Optional[str] = None,
) -> Patient:
    """The same `Patient` the library reads from files, built from scene nodes.

    Segments are exported on the CT geometry; labelmap and dose nodes keep their own grid and are
    resampled onto the CT grid by `Patient` (nearest neighbour for masks, linear for dose).
    """
    from DeepDosimetricsLib.data.patient import Patient

    if ct_node is None:
        raise InputError("no CT volume node selected")
    if is_dose_volume(ct_node):
        raise InputError(f"the CT {node_label(ct_node)} is marked as a dose volume ({DOSE_ATTRIBUTE})")
    ct = volume_to_image(ct_node, "CT")
    structures: Dict[str, sitk.Image] = {}
    if segmentation_node is not None:
        structures.update(segmentation_to_images(segmentation_node, ct_node))
    for labelmap_node in labelmap_nodes:
        for name, mask in labelmap_to_images(labelmap_node).items():
            if name in structures:
                raise InputError(f"structure '{name}' is given twice (labelmap {node_label(labelmap_node)})")
            structures[name] = mask
    dose = None
    if dose_node is not None:
        if not is_dose_volume(dose_node):
            log.info("dose %s has no %s attribute; used as dose anyway", node_label(dose_node), DOSE_ATTRIBUTE)
        dose = sitk.Cast(volume_to_image(dose_node, "dose"), sitk.sitkFloat32)
    pid = patient_id or _patient_id_for(ct_node)
    return Patient.from_images(pid, ct, structures, dose=dose, source=f"MRML scene, CT {node_label(ct_node)}")


@dataclass
class PatientNodes:
    """The nodes that show one patient: CT, structures as a segmentation, dose (or None)."""

    patient_id: str
    ct: Any
    segmentation: Any = None
    dose: Any = None


def add_patient_nodes(patient: Patient, scene: Any = None, structures: Optional[Sequence[str]] = None) -> PatientNodes:
    """Add a Patient to the scene: CT volume, a segmentation of its structures, the dose volume (marked)."""
    scene = current_scene(scene)
    ct_node = image_to_volume(patient.ct_image(), f"{patient.id} CT", scene)
    set_ct_display(ct_node)
    names = list(patient.structure_names if structures is None else structures)
    segmentation_node = None
    if names:
        masks = {name: patient.structure(name) for name in names}
        segmentation_node = add_segmentation(masks, ct_node, f"{patient.id} structures", scene)
    dose_node = None
    if patient.has_dose:
        dose_node = image_to_volume(patient.dose_image(), f"{patient.id} dose", scene, dose=True)
        set_dose_display(dose_node)
    _place_in_hierarchy(scene, patient.id, [ct_node, segmentation_node, dose_node])
    return PatientNodes(patient.id, ct_node, segmentation_node, dose_node)


def load_patient_folder(path: Union[str, os.PathLike], scene: Any = None) -> PatientNodes:
    """Read a patient folder (canonical or flat layout) into CT, segmentation and dose nodes."""
    from DeepDosimetricsLib.data.patient import Patient

    return add_patient_nodes(Patient.from_folder(path), scene)


def _place_in_hierarchy(scene: Any, patient_id: str, nodes: Sequence[Any]) -> None:
    """Group the nodes under a subject-hierarchy patient item (as the DICOM browser does)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    patient_item = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), patient_id)
    for node in nodes:
        if node is None:
            continue
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, patient_item)
        else:  # headless: no subject-hierarchy plugins create the items
            hierarchy.CreateItem(patient_item, node)


def export_patient_folder(
    ct_node: Any,
    segmentation_node: Any = None,
    dose_node: Any = None,
    folder: Union[str, os.PathLike, None] = None,
    patient_id: Optional[str] = None,
) -> Path:
    """Write the nodes as one patient of a cohort in the importers' layout (ct.nrrd, structures/, dose.nrrd,
    import.json) under ``folder`` (a new temporary cohort by default); returns the patient folder."""
    import tempfile

    from DeepDosimetricsLib.data.importers.layout import ImportOptions, PatientWriter
    from DeepDosimetricsLib.data.synonyms import safe_name

    patient = patient_from_nodes(ct_node, segmentation_node, (), dose_node, patient_id)
    cohort = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="DeepDosimetrics-cohort-"))
    options = ImportOptions(out=cohort, overwrite=True, quiet=True)
    with PatientWriter(options, safe_name(patient.id), str(patient.source), "slicer-scene") as writer:
        writer.write_ct(patient.ct_image(), modality=patient.modality)
        for name in patient.structure_names:
            writer.write_structure(name, patient.structure_image(name))
        if patient.has_dose:
            writer.write_dose(patient.dose_image())
        return writer.commit()
