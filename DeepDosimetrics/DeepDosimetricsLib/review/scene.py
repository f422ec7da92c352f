"""One patient's volumes as MRML nodes in the review station's scene, each held once and compact.

- the CT (int16 HU) in the background, with window/level presets;
- the foreground: the reconstruction or the residual of one channel, loaded when asked (only the one shown is
  kept), read a few slices at a time: window channels int16 HU, probabilities uint8 x255, dose and the other
  residuals float32 in their non-zero box; the residual in a diverging map centred on 0; a traversal result
  replaces it on the cache grid (see :mod:`.traversal`);
- the original dose as a colour wash with zero hidden (a further slice layer), holding its non-zero box;
- structures as one segmentation drawn as outlines in the slice views, each labelmap its structure's bounding
  box, and as closed surfaces in the 3D view (:func:`show_surfaces`, built once per patient after the slice
  images, from a 2x-downsampled copy for a large CT; the PTV always visible).

Nodes are made through the MRML layer (``mrml.volumes``, ``mrml.display``) in the scene that trame-slicer's
``SlicerApp`` owns; the patient object that read the files is dropped after loading (no CT copy kept).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

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


#: volumes above this many voxels get their 3D surfaces from a labelmap downsampled by 2 on each axis
SURFACE_DOWNSAMPLE_VOXELS = 24_000_000
#: voxels sampled (at most) for the residual's colour range
RANGE_SAMPLE = 2_000_000


def bounding_box(array: np.ndarray, outside: float = 0) -> Optional[Tuple[slice, slice, slice]]:
    """(z, y, x) slices of the smallest box holding every voxel of ``array`` that differs from ``outside``."""
    inside = array != outside
    boxes = []
    for axis in range(3):
        hit = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        boxes.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(boxes)


_NRRD_TYPES = {"float": "f4", "double": "f8", "short": "i2", "signed short": "i2", "int16": "i2", "short int": "i2",
               "unsigned char": "u1", "uchar": "u1", "uint8": "u1", "int": "i4", "signed int": "i4", "int32": "i4"}


class VolumeFile:
    """A 3D image file read a few slices at a time: an uncompressed (raw) NRRD straight from the file, any
    other file read whole once. Values come as float32 (z, y, x) blocks; nothing of the whole volume is kept
    for a raw NRRD (the reconstructions ``encode`` writes are raw NRRD unless --compress)."""

    def __init__(self, path):
        import SimpleITK as sitk

        self.path = str(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(self.path)
        reader.ReadImageInformation()
        self.spacing, self.origin = reader.GetSpacing(), reader.GetOrigin()
        self.direction = reader.GetDirection()
        size = reader.GetSize()
        self.shape = (int(size[2]), int(size[1]), int(size[0]))
        self._raw = self._raw_layout()
        self._view = None
        if self._raw is None:  # compressed or another format: read once, as float32
            self._image = sitk.ReadImage(self.path, sitk.sitkFloat32)
            self._view = sitk.GetArrayViewFromImage(self._image)

    def _raw_layout(self):
        try:
            with open(self.path, "rb") as handle:
                head = handle.read(1 << 16)
        except OSError:
            return None
        end = head.find(b"\n\n")
        if not head.startswith(b"NRRD") or end < 0:
            return None
        fields = {}
        for line in head[:end].decode("latin-1").splitlines()[1:]:
            if line.startswith("#") or ":" not in line:
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.lstrip("=").strip()
        code = _NRRD_TYPES.get(fields.get("type", "").lower())
        sizes = [int(v) for v in fields.get("sizes", "").split()] if fields.get("sizes") else []
        if (fields.get("encoding", "").lower() != "raw" or code is None or "data file" in fields
                or "datafile" in fields or len(sizes) != 3 or tuple(reversed(sizes)) != self.shape):
            return None
        order = ">" if fields.get("endian", "little").lower() == "big" else "<"
        return end + 2, np.dtype(order + code)

    def block(self, z0: int, z1: int) -> np.ndarray:
        """Slices z0..z1-1 as float32 (z, y, x)."""
        if self._raw is None:
            return np.asarray(self._view[z0:z1], np.float32)
        offset, dtype = self._raw
        plane = self.shape[1] * self.shape[2]
        values = np.fromfile(self.path, dtype, count=(z1 - z0) * plane, offset=offset + z0 * plane * dtype.itemsize)
        return values.reshape(z1 - z0, self.shape[1], self.shape[2]).astype(np.float32, copy=False)

    def blocks(self, box=None, voxels: int = 4 << 20):
        """(z0, block) over the (z, y, x) ``box`` (default the whole volume), block cropped to the box."""
        box = box or tuple(slice(0, n) for n in self.shape)
        step = max(1, voxels // max(1, self.shape[1] * self.shape[2]))
        for z in range(box[0].start, box[0].stop, step):
            yield z, self.block(z, min(z + step, box[0].stop))[:, box[1], box[2]]

    def read(self, box) -> np.ndarray:
        """The (z, y, x) ``box`` as float32."""
        out = np.empty(tuple(b.stop - b.start for b in box), np.float32)
        for z, block in self.blocks(box):
            out[z - box[0].start : z - box[0].start + block.shape[0]] = block
        return out

    def nonzero_box(self):
        """The box of voxels not 0 (None when all are)."""
        found = [None, None, None]
        for z, block in self.blocks():
            inside = block != 0
            hits = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
            if hits[0].size == 0:
                continue
            spans = [(z + hits[0][0], z + hits[0][-1] + 1)] + [(h[0], h[-1] + 1) for h in hits[1:]]
            found = [span if old is None else (min(old[0], span[0]), max(old[1], span[1]))
                     for old, span in zip(found, spans)]
        return None if found[0] is None else tuple(slice(int(a), int(b)) for a, b in found)


def load_compact(path, channel: str, mode: str, name: str, scene: Any) -> Any:
    """A reconstruction or residual file as a volume node, as compact as the cache keeps the channel.

    Window channels: int16 HU (the reconstruction and the residual). Mask probabilities: uint8 x255 (their
    residual float32). Dose and the other residuals: float32 in the box of non-zero voxels (zero is hidden
    or white there). Filled a few slices at a time: no float copy of the whole volume.
    """
    import SimpleITK as sitk
    import slicer
    import vtk

    from DeepDosimetricsLib.mrml import volumes

    source = VolumeFile(path)
    if channel.startswith("window"):
        dtype, scale, box = np.int16, 1.0, None
    elif channel.startswith("mask") and mode != "residual":
        dtype, scale, box = np.uint8, 255.0, None
    else:
        dtype, scale = np.float32, 1.0
        box = source.nonzero_box() or (slice(0, 1),) * 3
    box = box or tuple(slice(0, n) for n in source.shape)
    seed = sitk.Image(1, 1, 1, sitk.sitkFloat32)
    seed.SetSpacing(source.spacing)
    seed.SetDirection(source.direction)
    seed.SetOrigin(source.origin)
    seed.SetOrigin(seed.TransformContinuousIndexToPhysicalPoint([float(b.start) for b in reversed(box)]))
    node = volumes.image_to_volume(seed, name, scene=scene)
    image = node.GetImageData()
    image.SetDimensions(*(b.stop - b.start for b in reversed(box)))
    image.AllocateScalars({np.int16: vtk.VTK_SHORT, np.uint8: vtk.VTK_UNSIGNED_CHAR}.get(dtype, vtk.VTK_FLOAT), 1)
    target = slicer.util.arrayFromVolume(node)
    for z, block in source.blocks(box):
        rows = slice(z - box[0].start, z - box[0].start + block.shape[0])
        if dtype is np.float32:
            target[rows] = np.nan_to_num(block)
        else:
            target[rows] = _convert(block, dtype, scale)
    slicer.util.arrayFromVolumeModified(node)
    return node


def _convert(values: np.ndarray, dtype, scale: float = 1.0) -> np.ndarray:
    """``values * scale`` rounded into the integer ``dtype`` (clipped to its range, NaN as 0)."""
    info = np.iinfo(dtype)
    block = np.nan_to_num(np.asarray(values, np.float32) * np.float32(scale))
    np.clip(block, info.min, info.max, out=block)
    return np.rint(block, out=block).astype(dtype)


def _ijk_to_ras(image) -> Any:
    """The IJK -> RAS matrix (vtkMatrix4x4) of a SimpleITK image (LPS): what its volume node will have."""
    import vtk

    flip = np.diag([-1.0, -1.0, 1.0])
    rotation = flip @ np.array(image.GetDirection(), float).reshape(3, 3) @ np.diag(image.GetSpacing())
    origin = flip @ np.array(image.GetOrigin(), float)
    matrix = vtk.vtkMatrix4x4()
    for row in range(3):
        for column in range(3):
            matrix.SetElement(row, column, float(rotation[row, column]))
        matrix.SetElement(row, 3, float(origin[row]))
    return matrix


def _array_view(image) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(image)


def crop_image(image, box):
    """The (z, y, x) box of a SimpleITK image as a new image with its own origin (a copy of the box only)."""
    import SimpleITK as sitk

    index = [int(box[2].start), int(box[1].start), int(box[0].start)]
    size = [int(box[2].stop - box[2].start), int(box[1].stop - box[1].start), int(box[0].stop - box[0].start)]
    return sitk.RegionOfInterest(image, size, index)


def sample_limit(array: np.ndarray) -> float:
    """The 99th percentile of |array| from a strided sample (no full-size copy), for a residual's colours."""
    step = max(1, int(round((array.size / RANGE_SAMPLE) ** (1.0 / 3.0))))
    values = np.abs(np.asarray(array[::step, ::step, ::step], np.float32))
    limit = float(np.percentile(values, 99)) if values.size else 1.0
    return limit or float(values.max() if values.size else 0.0) or 1.0


def oriented_labelmap(mask: np.ndarray, box, ijk_to_ras, step: int = 1):
    """A uint8 ``vtkOrientedImageData`` holding ``mask[box]`` (every ``step``-th voxel) at its place on the
    reference grid (``ijk_to_ras`` a vtkMatrix4x4): the labelmap holds the structure's box, not the volume."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    starts = [(b.start // step) * step for b in box]
    crop = np.ascontiguousarray(mask[tuple(slice(s, b.stop, step) for s, b in zip(starts, box))], np.uint8)
    first = [s // step for s in starts]
    oriented = slicer.vtkOrientedImageData()
    oriented.SetExtent(first[2], first[2] + crop.shape[2] - 1, first[1], first[1] + crop.shape[1] - 1,
                       first[0], first[0] + crop.shape[0] - 1)
    oriented.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars()).reshape(crop.shape)[...] = crop
    matrix = vtk.vtkMatrix4x4()
    matrix.DeepCopy(ijk_to_ras)
    if step != 1:
        for row in range(3):
            for column in range(3):
                matrix.SetElement(row, column, matrix.GetElement(row, column) * step)
    oriented.SetImageToWorldMatrix(matrix)
    return oriented


def segment_masks(segmentation_node: Any) -> Iterator[Tuple[str, Tuple[slice, slice, slice], np.ndarray]]:
    """(name, (z, y, x) box on the reference grid, bool mask of the box) of each segment of the node."""
    import slicer
    from vtk.util import numpy_support

    segmentation = segmentation_node.GetSegmentation()
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        labelmap = segment.GetRepresentation(binary)
        if labelmap is None:
            continue
        x0, x1, y0, y1, z0, z1 = labelmap.GetExtent()
        if x1 < x0 or y1 < y0 or z1 < z0:
            continue
        shape = (z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)
        values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(shape)
        yield (segment.GetName(), (slice(z0, z1 + 1), slice(y0, y1 + 1), slice(x0, x1 + 1)),
               values == segment.GetLabelValue())


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
    #: (z, y, x) index of the dose node's first voxel on the CT grid (the dose node holds its non-zero box)
    dose_offset: Tuple[int, int, int] = (0, 0, 0)
    #: the segmentation the 3D view draws (the structures downsampled for a large CT, else ``segmentation``)
    surfaces: Optional[Any] = None
    #: RAS centre of the target (PTV), found while its mask was read
    target_ras: Optional[Tuple[float, float, float]] = None


class SceneBuilder:
    """Loads patients into ``scene`` and sets the layers of the slice views."""

    def __init__(self, scene: Any, catalog: Catalog):
        self.scene = scene
        self.catalog = catalog
        self.current: Optional[PatientScene] = None
        self.preset = "soft tissue"

    # ------------------------------------------------------------------ patients
    def load(self, patient: object) -> PatientScene:
        """Replace the patient on show (id checked by the catalog).

        Each volume lives once, in its node: the CT (int16), the dose (float32, its non-zero box only) and
        the structures (one labelmap per structure, each its own bounding box). The patient object that read
        them is dropped afterwards (it would keep a CT copy); masks are read one at a time.
        """
        from DeepDosimetricsLib.mrml import display, volumes
        from DeepDosimetricsLib.mrml.display import STRUCTURE_COLORS

        files = self.catalog.files(patient)
        self.clear()
        p = self.catalog.patient(files.patient)  # a fresh object: its CT copy goes with it
        reference = p.ct_image()  # the grid of the dose and the structures (kept by ``p`` while they load)
        ijk_to_ras = _ijk_to_ras(reference)
        nodes = []
        dose, offset = None, (0, 0, 0)
        if p.has_dose:
            image = p.dose_image()
            box = bounding_box(_array_view(image)) or (slice(0, 1),) * 3
            offset = tuple(b.start for b in box)
            dose = volumes.image_to_volume(crop_image(image, box), f"{files.patient} dose", scene=self.scene,
                                           dose=True)
            del image
            display.set_dose_display(dose)
            nodes.append(dose)
        names = list(p.structure_names)
        segmentation = surfaces = target = None
        if names:
            step = 2 if int(np.prod(reference.GetSize())) > SURFACE_DOWNSAMPLE_VOXELS else 1
            segmentation = self._segmentation(f"{files.patient} structures")
            nodes.append(segmentation)
            if step > 1:  # the 3D view's surfaces from a labelmap 8 times smaller (built later, quicker)
                surfaces = self._segmentation(f"{files.patient} surfaces")
                nodes.append(surfaces)
            kept = []
            for index, name in enumerate(names):
                try:
                    mask = p.structure(name)
                except Exception as error:  # noqa: BLE001 - a bad structure is left out, not fatal
                    log.warning("patient %s: structure %s left out (%s)", files.patient, name, error)
                    continue
                box = bounding_box(mask)
                if box is None:
                    continue
                color = STRUCTURE_COLORS[index % len(STRUCTURE_COLORS)]
                segmentation.AddSegmentFromBinaryLabelmapRepresentation(
                    oriented_labelmap(mask, box, ijk_to_ras), name, color)
                if surfaces is not None:
                    surfaces.AddSegmentFromBinaryLabelmapRepresentation(
                        oriented_labelmap(mask, box, ijk_to_ras, step), name, color)
                if target is None and name.upper().startswith(TARGET):
                    k, j, i = np.argwhere(mask > 0).mean(axis=0)
                    target = tuple(float(v) for v in (np.array([[ijk_to_ras.GetElement(r, c) for c in range(4)]
                                                                 for r in range(3)]) @ [i, j, k, 1.0]))
                kept.append(name)
                del mask
            names = kept
            shown = segmentation.GetDisplayNode()
            shown.SetVisibility2DFill(False)
            shown.SetVisibility2DOutline(True)
            shown.SetSliceIntersectionThickness(2)
            if surfaces is not None:
                shown.SetVisibility3D(False)
                surfaces.GetDisplayNode().SetVisibility2D(False)
        # the CT node last: the two CT copies (the patient's and the node's) meet when nothing else is read
        del p
        ct = volumes.image_to_volume(reference, f"{files.patient} CT", scene=self.scene)
        del reference
        display.set_ct_display(ct, *WL_PRESETS[self.preset])
        nodes.insert(0, ct)
        for node in {segmentation, surfaces} - {None}:
            node.SetReferenceImageGeometryParameterFromVolumeNode(ct)
        self.current = PatientScene(files.patient, files, ct, dose, segmentation, names, nodes=nodes,
                                    dose_offset=offset, surfaces=surfaces or segmentation, target_ras=target)
        return self.current

    def _segmentation(self, name: str) -> Any:
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        return node

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
        node = load_compact(path, channel, mode, f"{current.patient} {channel} {mode}", self.scene)
        limit = None
        if mode == "residual":
            import slicer

            limit = sample_limit(slicer.util.arrayFromVolume(node))
        self.style_foreground(node, channel, mode, limit)
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
        else:  # a probability in [0, 1] (x255 in a uint8 file volume): the dose map, nothing below 0.05
            scale = 255.0 if node.GetImageData().GetScalarType() == 3 else 1.0  # VTK_UNSIGNED_CHAR
            display.set_dose_display(node, maximum=scale, hide_below=0.05 * scale)

    def replace_foreground(self, node: Any, key: tuple, later: Optional[Callable[[Callable[[], None]], None]] = None
                           ) -> None:
        """Show a node made elsewhere (a traversal result) as the foreground, dropping the previous one (through
        ``later(drop)`` when given: removing a large node from the scene takes about a second at full size, which
        need not delay the new frames)."""
        current = self._require()
        if current.foreground is not node:
            old = current.foreground
            if later is None:
                self._remove(old)
            else:
                later(lambda: self._remove(old) if old is not self._shown_foreground() else None)
        current.foreground, current.foreground_key = node, key

    def _shown_foreground(self) -> Optional[Any]:
        return None if self.current is None else self.current.foreground

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
        """Show the outlines (and surfaces) of ``names``; the PTV (the target) is always shown."""
        current = self.current
        if current is None or current.segmentation is None:
            return
        wanted = set(names)
        for node in {current.segmentation, current.surfaces} - {None}:
            segmentation = node.GetSegmentation()
            shown = node.GetDisplayNode()
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
