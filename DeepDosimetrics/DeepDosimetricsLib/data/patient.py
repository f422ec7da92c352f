"""A patient: CT, structures and dose, read lazily, with structures and dose on the CT grid.

Structures and dose may come on any grid (shifted, differently spaced, rotated): they are resampled
onto the CT by physical coordinates, nearest neighbour for masks and linear for dose. This is where
the prototype's misalignment bugs are avoided once and for all.

A patient folder holds ``ct.nrrd`` (or ``ct.nii.gz``/``ct.nii``/``ct.mha``), an optional ``dose.*``,
and structures as ``structures/<Name>.nrrd``, a Slicer ``structures.seg.nrrd``, or (flat layout, as
in OpenKBP exports) ``<Name>.nrrd`` beside the CT.

The image in the CT's place may be of another modality (an MR, a PET): ``Patient.modality`` says which
(from ``import.json``, the image header or the ``modality`` option; see :mod:`DeepDosimetricsLib.data.modality`),
and its values are checked as that modality's, not as HU.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import numpy as np
import SimpleITK as sitk

from DeepDosimetricsLib.data.checks import check_image
from DeepDosimetricsLib.data.geometry import Geometry, snap_direction
from DeepDosimetricsLib.data.headers import check_image_file
from DeepDosimetricsLib.data.modality import (
    AUTO,
    CT,
    MODALITY_CHOICES,
    image_modality,
    normalize_modality,
    parse_modality_option,
    resolve_modality,
)
from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha", ".mhd")
CT_STEMS = ("ct",)
DOSE_STEMS = ("dose",)
SEGMENTATION_FILE = "structures.seg.nrrd"
STRUCTURES_FOLDER = "structures"
#: files of a flat layout that are neither CT, dose nor structures
NON_STRUCTURE_STEMS = {"possible_dose_mask"}
BODY_NAMES = ("body", "external", "skin", "outline", "bodys")
#: NRRD/NIfTI metadata keys that may carry a patient id
PATIENT_ID_KEYS = ("PatientID", "patient_id", "0010|0020")
#: the importers' record of a patient (written by data/importers/layout.py), which may name its modality
IMPORT_RECORD = "import.json"
#: ends the message of an un-rescaled CT whose modality nobody stated
NOT_A_CT_HINT = (
    "; if the image is not a CT, say which modality it is (--modality "
    + "|".join(code for code in MODALITY_CHOICES if code not in (AUTO, CT))
    + ", or a Modality key in its header)"
)
BODY_THRESHOLD_HU = -500


def image_stem(path: Path) -> str:
    """File name without its image suffix (``PTV70.nrrd`` -> ``PTV70``, ``a.nii.gz`` -> ``a``)."""
    name = path.name
    for suffix in (".seg.nrrd",) + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def is_image_file(path: Path) -> bool:
    """Whether a path looks like a readable image file."""
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def is_image_name(path: Path) -> bool:
    """Whether a path is named like an image file, whatever it is (a folder, a broken link...): such an
    entry is taken as the image it names, so that reading it reports the problem instead of skipping it."""
    return not path.name.startswith(".") and path.name.lower().endswith(IMAGE_SUFFIXES)


def read_image(path: Path, what: str) -> sitk.Image:
    """Read an image, turning any reader failure into one clear InputError.

    The header is checked first (declared size against the memory limit, spacing and direction) and a
    compressed payload is verified (see :mod:`DeepDosimetricsLib.data.headers`), before voxels are read.
    """
    if not path.exists():
        if path.is_symlink():
            raise InputError(f"{what}: {path} is a broken symbolic link")
        raise InputError(f"{what}: file {path} does not exist")
    check_image_file(path, what)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise InputError(f"{what}: cannot read {path} ({reason})") from None


def require_3d(image: sitk.Image, what: str) -> sitk.Image:
    """Refuse 2D, 4D and multi-component images with a message naming them."""
    if image.GetDimension() != 3:
        raise InputError(
            f"{what} is a {image.GetDimension()}D image of size {image.GetSize()}; a 3D volume is expected"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel (a 4D or vector "
            "image); a 3D scalar volume is expected"
        )
    direction = image.GetDirection()
    snapped = snap_direction(direction)
    if snapped != tuple(direction):  # a shallow copy: the caller's image keeps its header
        image = sitk.Image(image)
        image.SetDirection(snapped)
    return image


def image_patient_id(image: sitk.Image) -> Optional[str]:
    """The patient id recorded in an image's metadata, if any."""
    for key in PATIENT_ID_KEYS:
        if image.HasMetaDataKey(key):
            value = image.GetMetaData(key).strip()
            if value:
                return value
    return None


@dataclass(frozen=True)
class SegmentSource:
    """One segment of a Slicer ``.seg.nrrd`` file: its layer (component) and label value."""

    path: Path
    layer: int
    label: int


ImageSource = Union[Path, sitk.Image, SegmentSource]


def read_segmentation_segments(path: Path) -> Dict[str, SegmentSource]:
    """Segment name -> source for a Slicer segmentation file (one or several layers)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"segmentation {path}: cannot read the file header") from None
    keys = set(reader.GetMetaDataKeys())
    segments: Dict[str, SegmentSource] = {}
    index = 0
    while f"Segment{index}_ID" in keys or f"Segment{index}_Name" in keys:
        name = reader.GetMetaData(f"Segment{index}_Name") if f"Segment{index}_Name" in keys else f"Segment_{index}"
        label = int(reader.GetMetaData(f"Segment{index}_LabelValue")) if f"Segment{index}_LabelValue" in keys else 1
        layer = int(reader.GetMetaData(f"Segment{index}_Layer")) if f"Segment{index}_Layer" in keys else 0
        segments[name] = SegmentSource(path=path, layer=layer, label=label)
        index += 1
    if not segments:
        raise InputError(f"segmentation {path}: no segments described in its header (Segment0_Name...)")
    return segments


def nonzero_labels(array: np.ndarray) -> np.ndarray:
    """The distinct non-zero values of a labelmap, fast for the usual 0/1 uint8 masks."""
    low, high = array.min(), array.max()
    if low >= 0 and high <= 1:
        return np.array([1], dtype=array.dtype) if high == 1 else np.array([], dtype=array.dtype)
    if np.issubdtype(array.dtype, np.integer) and low >= 0 and high < 65536:
        counts = np.bincount(array.ravel(), minlength=int(high) + 1)
        labels = np.flatnonzero(counts)
        return labels[labels != 0].astype(array.dtype)
    values = np.unique(array)
    return values[values != 0]


def natural_key(text: str) -> list:
    """Sort key putting ``pt_2`` before ``pt_10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


class Patient:
    """CT, structures and dose of one patient; reads files only when asked.

    Build it with ``Patient.from_folder(path)`` or ``Patient.from_images(...)``. Arrays are (z, y, x) on
    the CT grid (the dose grid for a dose-only patient): CT in HU (int16), dose in Gy (float32),
    structures as uint8 0/1 masks.

    Args:
        patient_id: the patient's id (the folder name for ``from_folder``).
        ct: the CT as a file path or a SimpleITK image (HU); None for a dose-only patient. An image of
            another modality (MR, PET) may take its place: see ``modality``.
        structures: structure name -> file path, SimpleITK image or segment of a ``.seg.nrrd``; any grid.
        dose: the dose in Gy as a file path or SimpleITK image; any grid.
        folder: the patient folder the files came from, if any.
        source: a word for messages saying where the data came from ("files", "images", "scene").
        modality: the image's modality when the data do not say it (``auto``: CT), or a check of what
            they say (``CT``, ``MR``, ``PT``, ``OT``); see :mod:`DeepDosimetricsLib.data.modality`.
    """

    def __init__(
        self,
        patient_id: str,
        ct: Optional[ImageSource],
        structures: Optional[Mapping[str, ImageSource]] = None,
        dose: Optional[ImageSource] = None,
        folder: Optional[Path] = None,
        source: str = "files",
        modality: str = AUTO,
    ) -> None:
        self.id = str(patient_id)
        self.folder = Path(folder) if folder is not None else None
        self.source = source
        self._ct_source = ct
        self._structure_sources: Dict[str, ImageSource] = dict(structures or {})
        self._dose_source = dose
        self._ct: Optional[sitk.Image] = None
        self._dose_reference: Optional[sitk.Image] = None
        self._checked_ids = False
        self._dose_checked = False
        #: the ``modality`` option (``auto``: what the data say, else CT)
        self.modality_option = parse_modality_option(modality)
        self._modality: Optional[tuple[str, str]] = None
        #: warnings of the value checks per image ("ct", "dose"): values computed, but flagged
        self.warnings: Dict[str, List[str]] = {"ct": [], "dose": []}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_folder(cls, folder: Union[str, Path], patient_id: Optional[str] = None,
                    modality: str = AUTO) -> Patient:
        """A patient from a folder in the canonical (or flat) layout.

        Args:
            folder: the patient folder (``ct.nrrd``, optional ``dose.nrrd``, ``structures/<Name>.nrrd``,
                ``structures.seg.nrrd`` or structures beside the CT).
            patient_id: the id to use; default the folder's name.
            modality: the image's modality where the data do not say it (``auto``: CT).

        Raises:
            InputError: the folder does not exist or holds neither a CT nor a dose.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"patient folder {folder} does not exist or is not a folder")
        try:
            files = sorted(p for p in folder.iterdir() if is_image_name(p))
        except OSError as error:
            raise InputError(f"patient folder {folder} cannot be read ({error.strerror or error})") from None
        by_stem = {image_stem(p).lower(): p for p in files}
        ct = next((by_stem[s] for s in CT_STEMS if s in by_stem), None)
        dose = next((by_stem[s] for s in DOSE_STEMS if s in by_stem), None)
        if ct is None and dose is None:
            raise InputError(
                f"patient folder {folder}: no CT found (expected ct.nrrd, ct.nii.gz, ct.nii or ct.mha)"
            )
        structures: Dict[str, ImageSource] = {}
        segmentation = folder / SEGMENTATION_FILE
        if segmentation.is_file():
            structures.update(read_segmentation_segments(segmentation))
        structure_folder = folder / STRUCTURES_FOLDER
        if structure_folder.is_dir():
            for path in sorted(structure_folder.iterdir(), key=lambda p: natural_key(p.name)):
                if is_image_name(path):
                    structures[image_stem(path)] = path
        for path in files:  # flat layout: <Name>.nrrd beside ct.nrrd
            stem = image_stem(path)
            if path in (ct, dose) or path.name.lower() == SEGMENTATION_FILE:
                continue
            if stem.lower() in NON_STRUCTURE_STEMS or stem in structures:
                continue
            structures[stem] = path
        return cls(patient_id or folder.name, ct=ct, structures=structures, dose=dose, folder=folder,
                   modality=modality)

    @classmethod
    def from_images(
        cls,
        patient_id: str,
        ct: sitk.Image,
        structures: Optional[Mapping[str, sitk.Image]] = None,
        dose: Optional[sitk.Image] = None,
        source: str = "images",
        modality: str = AUTO,
    ) -> Patient:
        """A patient from in-memory SimpleITK images (e.g. converted from MRML nodes).

        Args:
            patient_id: the patient's id.
            ct: the CT (HU, 3D), or an image of the modality its metadata or ``modality`` say.
            structures: structure name -> binary labelmap image, any grid.
            dose: the dose in Gy, any grid.
            source: a word for messages saying where the images came from.
            modality: the image's modality where its metadata do not say it (``auto``: CT).
        """
        return cls(patient_id, ct=ct, structures=dict(structures or {}), dose=dose, source=source,
                   modality=modality)

    def __repr__(self) -> str:
        where = self.folder if self.folder is not None else self.source
        return (
            f"Patient({self.id!r}, {where}, structures={self.structure_names}, ct={self.has_ct}, "
            f"dose={self.has_dose})"
        )

    # ------------------------------------------------------------------ CT
    def _describe(self, what: str, source: ImageSource) -> str:
        if isinstance(source, Path):
            return f"patient {self.id}: {what} ({source})"
        if isinstance(source, SegmentSource):
            return f"patient {self.id}: {what} ({source.path}, layer {source.layer}, label {source.label})"
        return f"patient {self.id}: {what}"

    @property
    def has_ct(self) -> bool:
        """Whether the patient has a CT volume (a dose-only case, e.g. DICOM-RT with one CT slice, has not)."""
        return self._ct_source is not None

    @property
    def modality(self) -> str:
        """The modality of the image (``CT``, ``MR``, ``PT``...): what ``import.json`` or the image header
        say, else the ``modality`` option, else CT. InputError when the data and the option disagree."""
        return self._resolved_modality()[0]

    def _resolved_modality(self, image: Optional[sitk.Image] = None) -> tuple[str, str]:
        """(modality, where it comes from); ``image``: the image already read (else its header is read)."""
        if self._modality is None:
            declared, declared_by = self._declared_modality(image)
            what = self._describe("image", self._ct_source) if self._ct_source is not None else f"patient {self.id}"
            self._modality = resolve_modality(declared, declared_by, self.modality_option, what)
        return self._modality

    def _declared_modality(self, image: Optional[sitk.Image]) -> tuple[Optional[str], str]:
        """What the data say: the import record first, then the image's header."""
        record = self.folder / IMPORT_RECORD if self.folder is not None else None
        if record is not None and record.is_file():
            import json

            try:
                entry = json.loads(record.read_text(encoding="utf-8")).get("ct") or {}
                declared = normalize_modality(entry.get("modality")) if isinstance(entry, dict) else None
            except (OSError, ValueError, AttributeError, InputError) as error:
                raise InputError(f"patient {self.id}: {record} cannot be read ({error})") from None
            if declared:
                return declared, str(record)
        source = self._ct_source
        if isinstance(source, sitk.Image):
            return image_modality(source), "image metadata"
        if not isinstance(source, Path):
            return None, ""
        if image is None:
            image = sitk.ImageFileReader()  # the header alone
            image.SetFileName(str(source))
            try:
                image.ReadImageInformation()
            except RuntimeError:  # reading the image reports the problem
                return None, ""
        return image_modality(image), f"header ({source.name})"

    def ct_image(self) -> sitk.Image:
        """The image: a CT as int16 HU (read once, then kept); an image of another modality (``modality``)
        with its own pixel type and values, checked as that modality's."""
        if self._ct_source is None:
            raise InputError(
                f"patient {self.id} has no CT volume (dose and structures only); this step needs a CT"
            )
        if self._ct is None:
            image = self._ct_source
            if isinstance(image, Path):
                image = read_image(image, self._describe("CT", self._ct_source))
            modality, by = self._resolved_modality(image)
            what = self._describe("CT" if modality == CT else f"image ({modality})", self._ct_source)
            image = require_3d(image, what)
            self._warn("ct", check_image(image, what, modality, NOT_A_CT_HINT if by == "default" else ""))
            if modality == CT and image.GetPixelID() != sitk.sitkInt16:
                if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
                    image = sitk.Round(image)
                image = sitk.Cast(sitk.Clamp(image, lowerBound=-32768, upperBound=32767), sitk.sitkInt16)
            self._ct = image
        return self._ct

    def reference_image(self) -> sitk.Image:
        """The grid structures and dose are put on: the CT's, or the dose's for a dose-only patient."""
        if self.has_ct:
            return self.ct_image()
        if self._dose_reference is None:
            what = self._describe("dose", self._dose_source)
            dose = self._dose_source
            dose = read_image(dose, what) if isinstance(dose, Path) else dose
            dose = sitk.Cast(require_3d(dose, what), sitk.sitkFloat32)
            if not self._dose_checked:
                self._warn("dose", check_image(dose, what, "dose"))
                self._dose_checked = True
            self._dose_reference = dose
        return self._dose_reference

    @property
    def geometry(self) -> Geometry:
        """The CT grid (the dose grid for a dose-only patient)."""
        return Geometry.from_image(self.reference_image())

    def ct_array(self) -> np.ndarray:
        """CT in HU as an int16 (z, y, x) array (another modality: its values, see ``ct_image``)."""
        return sitk.GetArrayFromImage(self.ct_image())

    # ------------------------------------------------------------------ structures
    @property
    def structure_names(self) -> List[str]:
        """Structure names as found (file stems or segment names)."""
        return list(self._structure_sources)

    def has_structure(self, name: str) -> bool:
        """Whether a structure exists (case-insensitive)."""
        return self._resolve_structure_name(name, required=False) is not None

    def _resolve_structure_name(self, name: str, required: bool = True) -> Optional[str]:
        if name in self._structure_sources:
            return name
        matches = [n for n in self._structure_sources if n.lower() == name.lower()]
        if matches:
            return matches[0]
        if required:
            known = ", ".join(self.structure_names) or "none"
            raise InputError(f"patient {self.id}: no structure named {name!r} (structures: {known})")
        return None

    def _read_structure_native(self, name: str) -> sitk.Image:
        source = self._structure_sources[name]
        what = self._describe(f"structure {name}", source)
        if isinstance(source, SegmentSource):
            image = read_image(source.path, what)
            if image.GetNumberOfComponentsPerPixel() > 1:
                image = sitk.VectorIndexSelectionCast(image, source.layer)
            image = require_3d(image, what)
            return sitk.Cast(sitk.Equal(image, source.label), sitk.sitkUInt8)
        image = read_image(source, what) if isinstance(source, Path) else source
        image = require_3d(image, what)
        nonzero = nonzero_labels(sitk.GetArrayViewFromImage(image))
        if nonzero.size > 1:
            shown = ", ".join(str(v) for v in nonzero[:6]) + (" ..." if nonzero.size > 6 else "")
            raise InputError(
                f"{what} is not binary: it holds the labels {shown}; expected 0 and one label value"
            )
        if nonzero.size == 0:
            raise InputError(f"{what} is empty (no voxel inside)")
        return sitk.Cast(sitk.NotEqual(image, 0), sitk.sitkUInt8)

    def structure_image(self, name: str) -> sitk.Image:
        """A structure as a uint8 0/1 mask on the CT grid (nearest-neighbour resampling)."""
        name = self._resolve_structure_name(name)
        source = self._structure_sources[name]
        what = self._describe(f"structure {name}", source)
        native = self._read_structure_native(name)
        self._check_patient_id(native, what)
        ct = self.reference_image()
        if not Geometry.from_image(native).overlaps(Geometry.from_image(ct)):
            raise InputError(f"{what} does not overlap the CT (its extent lies outside the CT's field of view)")
        if Geometry.from_image(native).isclose(Geometry.from_image(ct)):
            mask = native
        else:
            mask = sitk.Resample(native, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            if not np.any(sitk.GetArrayViewFromImage(mask)):
                raise InputError(
                    f"{what} does not overlap the CT: no voxel remains inside after resampling onto the CT grid"
                )
        return mask

    def structure(self, name: str) -> np.ndarray:
        """A structure as a uint8 0/1 (z, y, x) array on the CT grid.

        Args:
            name: the structure's name (case-insensitive).

        Raises:
            InputError: the patient has no such structure, or its file cannot be read.
        """
        return sitk.GetArrayFromImage(self.structure_image(name))

    def structures(self, names: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
        """Several structures as uint8 0/1 (z, y, x) arrays on the CT grid.

        Args:
            names: structure names (case-insensitive); default every structure of the patient.
        """
        return {name: self.structure(name) for name in (names or self.structure_names)}

    def body_structure_name(self) -> Optional[str]:
        """The name of a BODY/External structure if the patient has one."""
        for name in self.structure_names:
            if name.lower().replace(" ", "").replace("_", "") in BODY_NAMES:
                return name
        return None

    def body(self) -> np.ndarray:
        """The body mask (uint8 z, y, x): the BODY/External structure, else derived from HU."""
        name = self.body_structure_name()
        if name is not None:
            return self.structure(name)
        return body_mask_from_hu(self.ct_array())

    # ------------------------------------------------------------------ dose
    @property
    def has_dose(self) -> bool:
        """Whether the patient has a dose."""
        return self._dose_source is not None

    def dose_image(self) -> sitk.Image:
        """The dose in Gy (float32) on the CT grid (linear interpolation, 0 outside the dose grid)."""
        if self._dose_source is None:
            raise InputError(f"patient {self.id} has no dose")
        if not self.has_ct:
            return self.reference_image()  # a dose-only patient: the dose, read once, is the grid
        what = self._describe("dose", self._dose_source)
        dose = self._dose_source
        if isinstance(dose, Path):
            dose = read_image(dose, what)
        dose = require_3d(dose, what)
        self._check_patient_id(dose, what)
        if dose.GetPixelID() != sitk.sitkFloat32:
            dose = sitk.Cast(dose, sitk.sitkFloat32)
        if not self._dose_checked:  # on its own grid: the counts are the file's voxels
            self._warn("dose", check_image(dose, what, "dose"))
            self._dose_checked = True
        ct = self.reference_image()
        if not Geometry.from_image(dose).overlaps(Geometry.from_image(ct)):
            raise InputError(f"{what} does not overlap the CT (its grid lies outside the CT's field of view)")
        if Geometry.from_image(dose).isclose(Geometry.from_image(ct)):
            return dose
        return sitk.Resample(dose, ct, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)

    def dose_coverage(self) -> np.ndarray:
        """uint8 (z, y, x) on the CT grid: 1 where the dose grid has a value, 0 where its 0 Gy is a fill."""
        if self._dose_source is None:
            raise InputError(f"patient {self.id} has no dose")
        dose_geometry = self._native_dose_geometry()
        reference = self.reference_image()
        if dose_geometry.isclose(Geometry.from_image(reference)):
            return np.ones(Geometry.from_image(reference).shape_zyx, dtype=np.uint8)
        ones = dose_geometry.reference_image(sitk.sitkUInt8) + 1
        covered = sitk.Resample(ones, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        return sitk.GetArrayFromImage(covered)

    def _native_dose_geometry(self) -> Geometry:
        """The dose's own grid, from the file header alone (no voxels read) when it is a file."""
        source = self._dose_source
        if not isinstance(source, Path):
            return Geometry.from_image(source)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(source))
        try:
            reader.ReadImageInformation()
            usual = reader.GetDimension() == 3 and reader.GetNumberOfComponents() == 1
        except RuntimeError:
            usual = False
        if not usual:  # read it whole, for the usual clear error
            what = self._describe("dose", source)
            return Geometry.from_image(require_3d(read_image(source, what), what))
        return Geometry(
            size=tuple(int(v) for v in reader.GetSize()),
            spacing=tuple(float(v) for v in reader.GetSpacing()),
            origin=tuple(float(v) for v in reader.GetOrigin()),
            direction=snap_direction(reader.GetDirection()),
        )

    def dose(self) -> np.ndarray:
        """The dose in Gy as a float32 (z, y, x) array on the CT grid."""
        return sitk.GetArrayFromImage(self.dose_image())

    # ------------------------------------------------------------------ checks
    def _warn(self, kind: str, warnings: List[str]) -> None:
        for text in warnings:
            if text not in self.warnings[kind]:
                self.warnings[kind].append(text)
                log.warning("%s", text)

    def _check_patient_id(self, image: sitk.Image, what: str) -> None:
        """Refuse an image whose recorded patient id differs from the CT's."""
        other = image_patient_id(image)
        if other is None:
            return
        mine = image_patient_id(self.reference_image())
        if mine is not None and mine != other:
            raise InputError(f"{what} belongs to patient id {other!r}, but the CT to patient id {mine!r}")


def body_mask_from_hu(hu: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Body outline from HU: above the threshold, largest 3D component, holes filled slice by slice."""
    from scipy import ndimage

    above = hu > threshold_hu
    labels, count = ndimage.label(above)
    if count == 0:
        return np.zeros(hu.shape, dtype=np.uint8)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    del labels
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    body = ndimage.binary_fill_holes(body, structure=in_plane)
    return body.astype(np.uint8)
