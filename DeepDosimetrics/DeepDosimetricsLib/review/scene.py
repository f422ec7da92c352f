"""One patient's volumes as MRML nodes in the review station's scene, kept compact.

- the CT (int16 HU) in the background, with window/level presets;
- the foreground: the reconstruction or the residual of one channel, loaded when asked (only the one shown is
  kept): window channels as int16 HU, dose and probabilities as float32; the residual in a diverging map
  centred on 0; a traversal result replaces it on the cache grid (see :mod:`.traversal`);
- the original dose as a colour wash with zero hidden (a further slice layer);
- structures as one segmentation drawn as outlines in the slice views and as closed surfaces in the 3D view
  (:func:`show_surfaces`, built once per patient after the slice images; the PTV always visible).

Nodes are made through the MRML layer (``mrml.volumes``, ``mrml.display``, ``mrml.segments``) in the scene
that trame-slicer's ``SlicerApp`` owns.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from DeepDosimetricsLib.review.catalog import Catalog, PatientFiles

log = logging.getLogger(__name__)

#: window/level presets (window, level) in HU
WL_PRESETS = {"soft tissue": (400.0, 40.0), "lung": (1500.0, -600.0), "bone": (1800.0, 400.0)}
#: the slice-composite layer index of the dose wash (0 background, 1 foreground, 2 label, 3.. additional)
DOSE_LAYER = 3
TARGET = "PTV"
#: smoothing of the structure surfaces in the 3D view (Slicer's default 0.5; lower is quicker, blockier)
SURFACE_SMOOTHING = 0.3


def channel_stems(catalog: Catalog) -> Dict[str, str]:
    """channel label -> file stem (``window:soft_tissue`` -> ``window_soft_tissue``)."""
    from DeepDosimetricsLib.deep.encode.reconstruction import channel_stem

    return {label: channel_stem(label) for label in catalog.channels}


def _read_image(path, pixel: str):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if pixel == "int16":
        image = sitk.Cast(sitk.Round(sitk.Clamp(image, sitk.sitkFloat32, -32768, 32767)), sitk.sitkInt16)
    elif image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    return image


class _LazyMasks(Mapping):
    """structure name -> mask, each read when asked (a structure that cannot be read is left out)."""

    def __init__(self, patient: Any, names: List[str], label: str):
        self.patient, self.names, self.label = patient, list(names), label

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.patient.structure(name)

    def items(self):
        for name in self.names:
            try:
                mask = self.patient.structure(name)
            except Exception as error:  # noqa: BLE001 - a bad structure is left out, not fatal
                log.warning("patient %s: structure %s left out (%s)", self.label, name, error)
                continue
            yield name, mask
            del mask


@dataclass
class PatientScene:
    """The nodes of the patient on show."""

    patient: str
    files: PatientFiles
    ct: Any
    dose: Optional[Any]
    segmentation: Optional[Any]
    structures: List[str]
    foreground: Optional[Any] = None
    foreground_key: tuple = ()
    nodes: List[Any] = field(default_factory=list)


class SceneBuilder:
    """Loads patients into ``scene`` and sets the layers of the slice views."""

    def __init__(self, scene: Any, catalog: Catalog):
        self.scene = scene
        self.catalog = catalog
        self.current: Optional[PatientScene] = None
        self.preset = "soft tissue"

    # ------------------------------------------------------------------ patients
    def load(self, patient: object) -> PatientScene:
        """Replace the patient on show (id checked by the catalog)."""
        from DeepDosimetricsLib.mrml import display, segments, volumes

        files = self.catalog.files(patient)
        self.clear()
        p = self.catalog.patient(files.patient)
        ct = volumes.image_to_volume(p.ct_image(), f"{files.patient} CT", scene=self.scene)
        display.set_ct_display(ct, *WL_PRESETS[self.preset])
        nodes = [ct]
        dose = None
        if p.has_dose:
            dose = volumes.image_to_volume(p.dose_image(), f"{files.patient} dose", scene=self.scene, dose=True)
            display.set_dose_display(dose)
            nodes.append(dose)
        names = list(p.structure_names)
        segmentation = None
        if names:
            # one mask in memory at a time (8 masks of a 512x512x350 CT held together would be 730 MB more)
            masks = _LazyMasks(p, names, files.patient)
            segmentation = segments.add_segmentation(masks, ct, name=f"{files.patient} structures", scene=self.scene)
            shown = segmentation.GetDisplayNode()
            shown.SetVisibility2DFill(False)
            shown.SetVisibility2DOutline(True)
            shown.SetSliceIntersectionThickness(2)
            nodes.append(segmentation)
        self.current = PatientScene(files.patient, files, ct, dose, segmentation, names, nodes=nodes)
        return self.current

    def clear(self) -> None:
        """Remove the nodes of the patient on show."""
        if self.current is None:
            return
        for node in [*self.current.nodes, self.current.foreground]:
            self._remove(node)
        self.current = None

    def _remove(self, node: Any) -> None:
        if node is None or node.GetScene() is None:
            return
        for index in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
            display = node.GetNthDisplayNode(index)
            if display is not None:
                self.scene.RemoveNode(display)
        self.scene.RemoveNode(node)

    # ------------------------------------------------------------------ foreground
    def foreground(self, channel: str, mode: str) -> Optional[Any]:
        """The node of ``channel``'s reconstruction (``mode`` "reconstruction") or residual, loaded once."""
        from DeepDosimetricsLib.mrml import volumes

        current = self._require()
        key = ("file", channel, mode)
        if current.foreground is not None and current.foreground_key == key:
            return current.foreground
        stem = channel_stems(self.catalog).get(channel)
        path = current.files.recon_volume(stem, residual=(mode == "residual")) if stem else None
        self._remove(current.foreground)
        current.foreground, current.foreground_key = None, ()
        if path is None:
            return None
        pixel = "int16" if channel.startswith("window") else "float32"
        node = volumes.image_to_volume(_read_image(path, pixel), f"{current.patient} {channel} {mode}",
                                       scene=self.scene)
        self.style_foreground(node, channel, mode)
        current.foreground, current.foreground_key = node, key
        return node

    def style_foreground(self, node: Any, channel: str, mode: str, limit: Optional[float] = None) -> None:
        from DeepDosimetricsLib.mrml import display

        if mode == "residual":
            display.set_residual_display(node, limit)
        elif channel.startswith("window"):
            display.set_ct_display(node, *WL_PRESETS[self.preset])
        elif channel.startswith("dose"):
            maximum = self._dose_max()
            display.set_dose_display(node, maximum=maximum)
        else:  # a probability in [0, 1]: the dose map, nothing below 0.05
            display.set_dose_display(node, maximum=1.0, hide_below=0.05)

    def replace_foreground(self, node: Any, key: tuple) -> None:
        """Show a node made elsewhere (a traversal result) as the foreground, dropping the previous one."""
        current = self._require()
        if current.foreground is not node:
            self._remove(current.foreground)
        current.foreground, current.foreground_key = node, key

    def _dose_max(self) -> Optional[float]:
        import slicer

        current = self._require()
        if current.dose is None:
            return None
        return float(np.max(slicer.util.arrayFromVolume(current.dose))) or 1.0

    def _require(self) -> PatientScene:
        if self.current is None:
            raise RuntimeError("no patient loaded")
        return self.current

    # ------------------------------------------------------------------ display settings
    def set_preset(self, preset: str) -> None:
        from DeepDosimetricsLib.mrml import display

        if preset not in WL_PRESETS:
            return
        self.preset = preset
        if self.current is None:
            return
        display.set_ct_display(self.current.ct, *WL_PRESETS[preset])
        key = self.current.foreground_key
        if self.current.foreground is not None and len(key) == 3 and key[1].startswith("window") and key[2] != "residual":
            display.set_ct_display(self.current.foreground, *WL_PRESETS[preset])

    def set_structures_visible(self, names: List[str]) -> None:
        """Show the outlines of ``names``; the PTV (the target) is always shown."""
        current = self.current
        if current is None or current.segmentation is None:
            return
        segmentation = current.segmentation.GetSegmentation()
        shown = current.segmentation.GetDisplayNode()
        wanted = set(names)
        for index in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(index)
            name = segmentation.GetSegment(segment_id).GetName()
            shown.SetSegmentVisibility(segment_id, name in wanted or name.upper().startswith(TARGET))


def show_surfaces(segmentation_node: Any, smoothing: float = SURFACE_SMOOTHING) -> None:
    """Show the structures in the 3D view as closed surfaces (made once from the labelmaps; no volume rendering).

    The slice views keep drawing outlines from the labelmaps; segment visibility (PTV always) applies to both.
    """
    if segmentation_node is None:
        return
    segmentation = segmentation_node.GetSegmentation()
    segmentation.SetConversionParameter("Smoothing factor", f"{float(smoothing):g}")
    segmentation_node.CreateClosedSurfaceRepresentation()
    shown = segmentation_node.GetDisplayNode()
    if shown is not None:
        shown.SetPreferredDisplayRepresentationName3D("Closed surface")
        shown.SetVisibility3D(True)
        shown.SetOpacity3D(1.0)


def composite_node(scene: Any, slice_view: Any) -> Any:
    """The slice-composite node of a trame-slicer slice view (matched by layout name through the scene)."""
    name = slice_view.get_view_node().GetLayoutName()
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if node.GetLayoutName() == name:
            return node
    return None


def set_layers(scene: Any, slice_view: Any, background: Any, foreground: Any, opacity: float, dose: Any,
               dose_visible: bool, dose_opacity: float = 0.4) -> None:
    """Background, foreground with its opacity, and the dose wash as a further layer of one slice view."""
    slice_view.set_background_volume_id(background.GetID() if background is not None else None)
    slice_view.set_foreground_volume_id(foreground.GetID() if foreground is not None else None)
    slice_view.set_foreground_opacity(float(opacity))
    composite = composite_node(scene, slice_view)
    if composite is not None:
        composite.SetNthLayerVolumeID(DOSE_LAYER, dose.GetID() if (dose is not None and dose_visible) else None)
        composite.SetNthLayerOpacity(DOSE_LAYER, float(dose_opacity))
    slice_view.schedule_render()
