"""Classic features of scene nodes as table nodes: radiomics (the library's pyradiomics path or SlicerRadiomics)
and dose-volume metrics with their DVH chart. The computation is the library's (``features.radiomics.
image_radiomics``, ``features.dosimetrics.image_dvh``, ``features.tables.to_wide``); this module only turns
nodes into images and tables into nodes."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from DeepDosimetricsLib.mrml.headless import current_scene
from DeepDosimetricsLib.mrml.patients import patient_from_nodes
from DeepDosimetricsLib.mrml.segments import masks_from_node
from DeepDosimetricsLib.mrml.tables import (
    RADIOMICS_PATH_ATTRIBUTE,
    dataframe_from_table,
    dvh_chart,
    table_from_dataframe,
)
from DeepDosimetricsLib.mrml.volumes import is_dose_volume, volume_to_image
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError, InputError

log = logging.getLogger(__name__)

SKIPPED_ATTRIBUTE = "DeepDosimetrics.SkippedStructures"
SLICER_RADIOMICS_KEYS = ("Image type", "Feature Class", "Feature Name")


def slicer_radiomics_table(raw, mask_name: str, image: str):
    """SlicerRadiomics' table (``Image type``, ``Feature Class``, ``Feature Name``, then one text column per
    ROI named ``<mask>_segment_<name>`` or ``<mask>_label_<N>``) as the library's long table.

    SlicerRadiomics splits a pyradiomics key ``<image type>_<class>_<name>`` over the three columns, so a
    diagnostic key (``diagnostics_Versions_PyRadiomics``) has ``diagnostics`` as its *image type*: those rows
    are dropped (either column is checked), as the pyradiomics path drops them.
    """
    from DeepDosimetricsLib.features.tables import long_table, value_rows

    keys = list(SLICER_RADIOMICS_KEYS)
    if not set(keys).issubset(raw.columns) or raw.empty:
        raise DeepDosimetricsError("SlicerRadiomics returned no features (an empty table); run with "
                                   "useSlicerRadiomics=False to use pyradiomics directly")
    diagnostic = (raw["Image type"].astype(str) == "diagnostics") | (raw["Feature Class"].astype(str) == "diagnostics")
    raw = raw[~diagnostic]
    names = raw[keys].astype(str).agg("_".join, axis=1)
    rows = []
    for column in (c for c in raw.columns if c not in keys):
        prefix = f"{mask_name}_segment_"
        structure = column[len(prefix):] if column.startswith(prefix) else column
        values = {name: _number(value) for name, value in zip(names, raw[column])}
        rows += value_rows("", structure, image, values)
    return long_table(rows)


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def radiomics_table(
    volume_node: Any,
    mask_node: Any,
    parameters: Any = None,
    table_node: Any = None,
    structures: Optional[Sequence[str]] = None,
    slicer_radiomics_logic: Any = None,
) -> Tuple[Any, str]:
    """Radiomics per structure as a table node: a ``Feature`` column, one column per structure; returns
    (table node, path used: ``pyradiomics`` or ``SlicerRadiomics``).

    Args:
        volume_node: the image (a dose volume, marked ``DicomRtImport.DoseVolume``, gets the dose variant
            of a preset).
        mask_node: a segmentation (segments on the image geometry) or a labelmap (one structure per label).
        parameters: preset name, parameter file or settings (``features.radiomics.resolve_parameters``).
        table_node: the table to fill (default: a new one).
        structures: only these structures.
        slicer_radiomics_logic: SlicerRadiomics' logic, run synchronously with the parameter file; None:
            the library's pyradiomics path.
    """
    from DeepDosimetricsLib.features.radiomics import image_radiomics, resolve_parameters
    from DeepDosimetricsLib.features.tables import to_wide

    if volume_node is None:
        raise InputError("no image volume selected for radiomics")
    if mask_node is None:
        raise InputError("no segmentation or labelmap selected for radiomics")
    image = "dose" if is_dose_volume(volume_node) else "ct"
    params = resolve_parameters(parameters, image)
    if table_node is None:
        label = params.name if params.path is None or "/" not in params.name else Path(params.name).stem
        table_node = current_scene(volume_node.GetScene()).AddNewNodeByClass(
            "vtkMRMLTableNode", f"{volume_node.GetName()} radiomics ({label})")
    masks, skipped = masks_from_node(mask_node, volume_node, structures)
    if slicer_radiomics_logic is not None:
        slicer_radiomics_logic.runSync = True
        parameter_file = params.parameter_file(tempfile.mkdtemp(prefix="DeepDosimetrics-radiomics-"))
        slicer_radiomics_logic.runCLIWithParameterFile(volume_node, mask_node, table_node, str(parameter_file))
        table = slicer_radiomics_table(dataframe_from_table(table_node), mask_node.GetName(), image)
        table = table[table["structure"].isin(list(masks))]
        path = "SlicerRadiomics"
    else:
        table = image_radiomics(volume_to_image(volume_node, "image"), masks, params, image)
        path = "pyradiomics"
    skipped.update({row.structure: row.reason for row in table.itertuples() if row.reason})
    frame = to_wide(table, with_patient=False).reset_index().rename(columns={"feature": "Feature"})
    table_from_dataframe(frame, table_node=table_node)
    table_node.SetAttribute(RADIOMICS_PATH_ATTRIBUTE, path)
    table_node.SetAttribute("DeepDosimetrics.RadiomicsParameters", str(params.name))
    table_node.SetAttribute(SKIPPED_ATTRIBUTE, json.dumps(skipped))
    log.info("radiomics of %s on %d structures through %s (%s)", volume_node.GetName(), frame.shape[1] - 1,
             path, params.name)
    for name, reason in skipped.items():
        log.warning("radiomics: structure %s skipped: %s", name, reason)
    return table_node, path


def dvh_tables(
    dose_node: Any,
    segmentation_node: Any,
    ct_node: Any = None,
    table_node: Any = None,
    bin_width_gy: float = 0.1,
    structures: Optional[Sequence[str]] = None,
    spatial: bool = False,
) -> Tuple[Any, Any]:
    """Dose-volume metrics per structure -> (table node, plot chart node of the cumulative DVHs).

    With ``ct_node`` the dose is resampled onto the CT grid (as the ``dvh`` command does); without it the
    segments are exported on the dose grid. The table has a ``Metric`` column (``volume_cc``, ``Dmean_Gy``,
    ``D95_Gy``, ``V20Gy_pct``...) and one column per structure; ``spatial`` adds the spatial descriptors
    (``Dmean_cranial_half_Gy``, ``dose_centroid_cc_mm``...: ``features.spatial``).
    """
    from DeepDosimetricsLib.features.dosimetrics import image_dvh
    from DeepDosimetricsLib.features.tables import to_wide

    if dose_node is None:
        raise InputError("no dose volume selected")
    if segmentation_node is None:
        raise InputError("no segmentation selected for the dose-volume metrics")
    skipped: Dict[str, str] = {}
    if ct_node is not None:  # the dose on the CT grid, the structures as the library reads them
        patient = patient_from_nodes(ct_node, segmentation_node, dose_node=dose_node)
        names = patient.structure_names if structures is None else list(structures)
        dose, masks = patient.dose_image(), {name: patient.structure_image(name) for name in names}
    else:
        dose = volume_to_image(dose_node, "dose")
        masks, skipped = masks_from_node(segmentation_node, dose_node, structures)
    tables = image_dvh(dose, masks, curves=True, bin_width_gy=bin_width_gy, spatial=spatial)
    skipped.update({row.structure: row.reason for row in tables.metrics.itertuples() if row.reason})
    frame = to_wide(tables.metrics, with_patient=False)
    if frame.empty:
        raise InputError(
            f"no structure of segmentation '{segmentation_node.GetName()}' overlaps the dose "
            f"'{dose_node.GetName()}': " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
        )
    scene = current_scene(dose_node.GetScene())
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{dose_node.GetName()} DVH metrics")
    table_from_dataframe(frame.reset_index().rename(columns={"feature": "Metric"}), table_node=table_node)
    table_node.SetAttribute(SKIPPED_ATTRIBUTE, json.dumps(skipped))
    curves = {structure: (rows["dose_gy"].to_numpy(), rows["volume_pct"].to_numpy())
              for structure, rows in tables.curves.groupby("structure", sort=False)}
    _, chart = dvh_chart(curves, f"{dose_node.GetName()} DVH", scene)
    for name, reason in skipped.items():
        log.warning("DVH: structure %s skipped: %s", name, reason)
    return table_node, chart
