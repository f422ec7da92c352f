"""Import DICOM-RT (CT series, RTSTRUCT, RTDOSE) into the canonical cohort layout with pydicom.

Every file under the source folder is read (non-DICOM files are ignored). Files are grouped by
PatientID and frame of reference (FrameOfReferenceUID; an RTSTRUCT by the frame it references), so
several patients and studies may lie in one tree; a patient with several frames of reference gives one
cohort patient per frame (``<PatientID>_1``, ``<PatientID>_2``...).

* CT: the series with most slices; slices sorted by ImagePositionPatient along the slice normal,
  RescaleSlope/RescaleIntercept applied, HU rounded to int16 and clipped below at -1024. Gantry tilt,
  unequal slice spacing, missing or duplicate slices, mixed orientations and two files sharing one
  SOPInstanceUID (PS3.3 forbids it; nothing tells which file is what the UID names) skip the patient with
  the reason.
* MR or PET (PT) series, when a group has no CT series (and has an RTSTRUCT or RTDOSE: an MR or PET alone
  in its frame of reference is a diagnostic scan, not imported): the image in the CT's place (``ct.nrrd``),
  RescaleSlope/RescaleIntercept applied, float32, its DICOM Modality recorded in ``import.json``
  (``ct.modality``), so its values are checked as an MR's or a PET's, not as HU (data/checks.py); the
  same geometry checks as a CT. PET values are kept as stored (their Units noted; no SUV conversion).
* RTDOSE: pixel values x DoseGridScaling in Gy on its own grid (frame positions from
  GridFrameOffsetVector along the slice normal); a PLAN dose is preferred, BEAM doses on one grid are summed.
* RTSTRUCT: each closed planar contour is mapped from patient coordinates (LPS mm) into the index space of
  the CT grid (or of the dose grid when there is no CT volume, e.g. a single CT slice) and filled
  (voxel centres inside, as ``skimage.draw.polygon``; a vectorised even-odd scanline, much faster on
  contours of many points); contours of one plane are combined by XOR so holes stay empty. Each grid slice takes the nearest contour plane within half a slice (or half the contour
  spacing when contours are sparser than slices). A contour of fewer than 3 points or of zero area (points
  repeated or on one line) is left out with a warning naming the structure and the contour's index in its
  ContourSequence (from 1); the structure is made of its other contours (not written when none is left).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from DeepDosimetricsLib.data.headers import check_geometry_values, check_memory
from DeepDosimetricsLib.data.ids import safe_patient_id
from DeepDosimetricsLib.data.importers.layout import (
    ImportOptions,
    PatientTask,
    PatientWriter,
    import_each,
)
from DeepDosimetricsLib.data.importers.report import ImportReport, PatientImportStatus
from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)

HU_MIN = -1024
#: image series the importer reads, the planning CT first: an MR or PET series is the image of a group
#: without a CT series
IMAGE_MODALITIES = ("CT", "MR", "PT")
#: slices whose spacing differs from the median by more than this (mm, or fraction) are reported
SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_FRACTION = 0.02
#: largest in-plane drift of slice positions off the slice normal (fraction of the pixel size)
TILT_TOLERANCE_FRACTION = 0.1
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: the attributes kept from each file while scanning a tree (contours and pixels are read when imported),
#: so scanning an archive of many patients holds only a few hundred bytes per file
HEADER_TAGS = [
    "Modality", "PatientID", "FrameOfReferenceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "SOPClassUID", "StudyDate", "StudyTime", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "NumberOfFrames", "GantryDetectorTilt",
    "DoseSummationType", "DoseUnits", "InstanceCreationDate", "InstanceCreationTime", "Units",
    "ReferencedFrameOfReferenceSequence", "StructureSetROISequence",
    # read only to remove them from every text the import writes (data/pseudonym.py), never written
    "PatientName", "PatientBirthDate", "AccessionNumber", "InstitutionName",
]


@dataclass
class DicomFile:
    """The header (no pixel data) of one DICOM file and where it lies."""

    path: Path
    header: object  # pydicom Dataset

    @property
    def modality(self) -> str:
        return str(self.header.get("Modality", "")).upper()

    @property
    def patient_id(self) -> str:
        return str(self.header.get("PatientID", "") or "").strip() or "unknown"

    @property
    def frame_of_reference(self) -> str:
        """The frame of reference; for an RTSTRUCT the one its contours are drawn in."""
        if self.modality == "RTSTRUCT":
            for item in self.header.get("ReferencedFrameOfReferenceSequence", []):
                if item.get("FrameOfReferenceUID"):
                    return str(item.FrameOfReferenceUID)
            for item in self.header.get("StructureSetROISequence", []):
                if item.get("ReferencedFrameOfReferenceUID"):
                    return str(item.ReferencedFrameOfReferenceUID)
        return str(self.header.get("FrameOfReferenceUID", "") or "")


@dataclass
class DicomGroup:
    """The files of one patient in one frame of reference."""

    patient_id: str
    frame_of_reference: str
    files: list[DicomFile] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # e.g. unreadable files in its folders

    def of_modality(self, modality: str) -> list[DicomFile]:
        return [f for f in self.files if f.modality == modality]

    @property
    def study_sort_key(self) -> tuple:
        first = self.files[0].header
        return (str(first.get("StudyDate", "")), str(first.get("StudyTime", "")), self.frame_of_reference)


# ------------------------------------------------------------------------------------------------ scan
def read_header(path: Path):
    """The header of a DICOM file, None for a file that is not DICOM; InputError when unreadable."""
    import warnings

    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except InvalidDicomError:
        pass
    except Exception as error:  # pydicom raises many kinds for a damaged file
        raise InputError(f"unreadable file {path}: {error}") from None
    try:  # DICOM without the 128-byte preamble
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = pydicom.dcmread(str(path), stop_before_pixels=True, force=True,
                                     specific_tags=HEADER_TAGS)
        if header.get("SOPInstanceUID") and header.get("Modality"):
            return header
    except Exception:
        pass
    if path.suffix.lower() in DICOM_SUFFIXES:
        raise InputError(f"unreadable file {path}: not a valid DICOM file")
    return None


def scan_tree(source: Path, quiet: bool = False) -> tuple[list[DicomFile], list[tuple[Path, str]]]:
    """All DICOM headers under ``source`` and the unreadable files with their reasons."""
    from DeepDosimetricsLib.runtime.progress import progress_bar

    paths = []
    for folder, subfolders, names in os.walk(source):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        paths += [Path(folder) / name for name in sorted(names) if not name.startswith(".")]
    files, unreadable = [], []
    for path in progress_bar(paths, desc="read DICOM headers", quiet=quiet):
        try:
            header = read_header(path)
        except InputError as error:
            unreadable.append((path, str(error)))
            continue
        if header is not None:
            files.append(DicomFile(path, header))
    return files, unreadable


def group_files(files: list[DicomFile], unreadable: list[tuple[Path, str]], name_of=safe_patient_id,
                ) -> tuple[dict[str, DicomGroup], list[tuple[Path, str]]]:
    """Cohort patient id -> group, and the unreadable files that belong to no single group.

    ``name_of`` maps a DICOM PatientID to the cohort's id (file-system safe, or a pseudonym)."""
    groups: dict[tuple[str, str], DicomGroup] = {}
    for item in files:
        if item.modality not in IMAGE_MODALITIES + ("RTSTRUCT", "RTDOSE"):
            continue
        key = (item.patient_id, item.frame_of_reference)
        groups.setdefault(key, DicomGroup(*key)).files.append(item)
    by_patient: dict[str, list[DicomGroup]] = defaultdict(list)
    for group in groups.values():
        if not any(item.modality in ("CT", "RTSTRUCT", "RTDOSE") for item in group.files):
            # an MR or PET series alone in its frame of reference is no planning image (a diagnostic scan
            # beside a CT plan): not a patient of the cohort, as before such series were read
            log.info("an %s series without CT, RTSTRUCT or RTDOSE in its frame of reference is not imported",
                     "/".join(sorted({item.modality for item in group.files})))
            continue
        by_patient[group.patient_id].append(group)
    named: dict[str, DicomGroup] = {}
    for patient_id, patient_groups in sorted(by_patient.items()):
        base = name_of(patient_id)
        patient_groups.sort(key=lambda g: g.study_sort_key)
        for index, group in enumerate(patient_groups, start=1):
            name = base if len(patient_groups) == 1 else f"{base}_{index}"
            while name in named:  # two PatientIDs that become the same folder name
                name += "_"
            named[name] = group
    # an unreadable file belongs to the patient whose files share its folder, when there is one
    folders: dict[Path, set[str]] = defaultdict(set)
    for name, group in named.items():
        for item in group.files:
            folders[item.path.parent].add(name)
    orphans = []
    for path, reason in unreadable:
        owners = folders.get(path.parent, set())
        if len(owners) == 1:
            named[next(iter(owners))].problems.append(reason)
        else:
            orphans.append((path, reason))
    return named, orphans


# ------------------------------------------------------------------------------------------------ CT
def read_dataset(path: Path):
    """The whole dataset of a file already recognised as DICOM (with or without the preamble)."""
    import warnings

    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            return pydicom.dcmread(str(path))
        except InvalidDicomError:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return pydicom.dcmread(str(path), force=True)
    except Exception as error:  # damaged or truncated
        raise InputError(f"unreadable file {path}: {error}") from None


def _read_full(path: Path):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    dataset = read_dataset(path)
    if "TransferSyntaxUID" not in getattr(dataset, "file_meta", {}):  # no file meta: as it was read
        implicit, little = getattr(dataset, "original_encoding", (True, True))
        meta = getattr(dataset, "file_meta", None) or FileMetaDataset()
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        dataset.file_meta = meta
    try:
        return dataset, dataset.pixel_array
    except Exception as error:  # damaged, truncated, or compressed without a decoder
        raise InputError(f"unreadable pixel data in {path}: {error}") from None


def numbers(header, keyword: str, count: Optional[int], what: str, required: bool = True) -> Optional[np.ndarray]:
    """A numeric DICOM attribute as a float array of ``count`` values; InputError when it is missing,
    garbled (not numbers, wrong count) or not finite."""
    try:
        value = header.get(keyword) if keyword in header else None
    except Exception as error:  # pydicom raises several kinds for a garbled value
        raise InputError(f"{what}: {keyword} cannot be read ({error})") from None
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        if not required:
            return None
        raise InputError(f"{what}: no {keyword}")
    try:
        if isinstance(value, bytes):
            value = value.decode("ascii", errors="replace").split("\\")
        elif isinstance(value, str):
            value = value.split("\\")
        items = list(value) if hasattr(value, "__iter__") else [value]
        array = np.asarray([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{what}: {keyword} is not numeric ({str(value)[:60]!r})") from None
    if count is not None and array.size != count:
        raise InputError(f"{what}: {keyword} has {array.size} values, {count} expected")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what}: {keyword} is not finite ({array.tolist()})")
    return array


def number(header, keyword: str, default: float, what: str) -> float:
    """A single numeric attribute (``default`` when absent or empty); InputError when garbled."""
    values = numbers(header, keyword, 1, what, required=False)
    return default if values is None else float(values[0])


def integer(header, keyword: str, what: str, default: Optional[int] = None) -> int:
    """A positive integer attribute (Rows, Columns, NumberOfFrames)."""
    values = numbers(header, keyword, 1, what, required=default is None)
    if values is None:
        return int(default)
    value = float(values[0])
    if value != int(value) or value < 1:
        raise InputError(f"{what}: {keyword} is {value:g}, a positive integer expected")
    return int(value)


def _orientation(header, what: str = "DICOM file") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cosines = numbers(header, "ImageOrientationPatient", 6, what)
    row, column = cosines[:3], cosines[3:]
    normal = np.cross(row, column)
    check_geometry_values(what, (1, 1, 1), (1, 1, 1), (0, 0, 0), np.column_stack([row, column, normal]).ravel())
    return row, column, normal


def _direction(row, column, normal) -> tuple[float, ...]:
    return tuple(np.column_stack([row, column, normal]).ravel().tolist())


def check_slice_positions(along: np.ndarray, what: str) -> float:
    """The slice spacing of sorted positions along the normal; InputError for gaps or uneven spacing."""
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        duplicate = along[1:][steps < 1e-3][0]
        raise InputError(f"{what}: duplicate slices at {duplicate:.2f} mm")
    step = float(np.median(steps))
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * step)
    off = np.abs(steps - step) > tolerance
    if not off.any():
        return step
    multiples = np.rint(steps / step)
    gaps = off & (multiples >= 2) & (np.abs(steps - multiples * step) <= tolerance)
    if np.array_equal(gaps, off):
        first = int(np.flatnonzero(gaps)[0])
        missing = int((multiples[gaps] - 1).sum())
        raise InputError(f"{what}: {missing} missing slice(s), e.g. between {along[first]:.2f} and "
                         f"{along[first + 1]:.2f} mm (slice spacing {step:.2f} mm)")
    raise InputError(f"{what}: inconsistent slice spacing ({', '.join(f'{s:.3g}' for s in np.unique(steps.round(3))[:6])} mm)")


def check_unique_instances(slices: list[DicomFile], what: str) -> None:
    """Refuse a series in which two files share one SOPInstanceUID, naming the two files.

    PS3.3 gives every instance its own UID; two slices with one UID (series merged by hand, a file copied
    under another name) mean that one of them is not the instance its UID names, and nothing in the files
    tells which: the series is refused rather than a slice guessed away."""
    common = Path(os.path.commonpath([str(s.path.parent) for s in slices])) if slices else Path()
    first: dict[str, DicomFile] = {}
    for item in slices:
        uid = str(item.header.get("SOPInstanceUID", "") or "").strip()
        if not uid:
            continue
        if uid not in first:
            first[uid] = item
            continue
        other = first[uid]
        where = [_position_text(s, what) for s in (other, item)]
        positions = ("at the same position " + where[0] if where[0] == where[1]
                     else f"at positions {where[0]} and {where[1]}")
        raise InputError(
            f"{what}: {other.path.relative_to(common)} and {item.path.relative_to(common)} share one "
            f"SOPInstanceUID ({positions}); PS3.3 forbids it (series merged by hand?): one of them is not "
            "the instance its UID names, so the series is refused; remove the wrong file"
        )


def _position_text(item: DicomFile, what: str) -> str:
    try:
        return "(" + ", ".join(f"{v:g}" for v in numbers(item.header, "ImagePositionPatient", 3, what)) + ") mm"
    except InputError:
        return "(unknown)"


def ct_volume(slices: list[DicomFile], what: str, modality: str = "CT"):
    """A CT series as an int16 HU SimpleITK image (another modality: float32, rescaled values); InputError
    with the reason when it is not a volume."""
    import SimpleITK as sitk

    check_unique_instances(slices, what)
    headers = [s.header for s in slices]
    if any(integer(s.header, "NumberOfFrames", f"{what}: {s.path.name}", 1) > 1 for s in slices):
        raise InputError(f"{what}: multi-frame (enhanced) {modality} is not supported")
    for attribute in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        missing = [s.path.name for s in slices if attribute not in s.header]
        if missing:
            raise InputError(f"{what}: {missing[0]} has no {attribute}")
    row, column, normal = _orientation(headers[0], f"{what}: {slices[0].path.name}")
    for item in slices[1:]:
        other = np.concatenate(_orientation(item.header, f"{what}: {item.path.name}")[:2])
        if not np.allclose(other, np.concatenate([row, column]), atol=1e-4):
            raise InputError(f"{what}: slices with different orientations ({item.path.name})")
    shapes = {(integer(s.header, "Rows", f"{what}: {s.path.name}"),
               integer(s.header, "Columns", f"{what}: {s.path.name}")) for s in slices}
    spacings = {tuple(round(float(v), 4) for v in numbers(s.header, "PixelSpacing", 2, f"{what}: {s.path.name}"))
                for s in slices}
    if len(shapes) > 1 or len(spacings) > 1:
        raise InputError(f"{what}: slices of different sizes or pixel spacings ({sorted(shapes)}, {sorted(spacings)})")
    tilts = {round(number(s.header, "GantryDetectorTilt", 0.0, f"{what}: {s.path.name}"), 3) for s in slices}
    if tilts - {0.0}:
        raise InputError(f"{what}: gantry tilt of {max(tilts, key=abs)} degrees (not supported: resample "
                         "the series to a regular grid first)")
    (rows, columns), = shapes
    pixel_spacing = list(next(iter(spacings)))
    check_geometry_values(what, (columns, rows, len(slices)), (pixel_spacing[1], pixel_spacing[0], 1.0), (0, 0, 0))
    dtype = np.int16 if modality == "CT" else np.float32
    check_memory(float(rows) * columns * len(slices), np.dtype(dtype).itemsize + 8.0 / len(slices), what,
                 (columns, rows, len(slices)))
    positions = np.asarray([numbers(s.header, "ImagePositionPatient", 3, f"{what}: {s.path.name}") for s in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    drift = positions - positions[:1] - np.outer(along - along[0], normal)
    if np.abs(drift).max() > TILT_TOLERANCE_FRACTION * min(pixel_spacing):
        raise InputError(f"{what}: gantry tilt (slice positions drift {np.abs(drift).max():.2f} mm off the "
                         "slice normal; not supported: resample the series to a regular grid first)")
    step = check_slice_positions(along, what)
    volume = np.empty((len(slices), rows, columns), dtype=dtype)
    for index, slice_index in enumerate(order):
        path = slices[slice_index].path
        dataset, pixels = _read_full(path)
        slope = number(dataset, "RescaleSlope", 1.0, f"{what}: {path.name}")
        intercept = number(dataset, "RescaleIntercept", 0.0, f"{what}: {path.name}")
        if slope == 0:
            raise InputError(f"{what}: {path.name} has RescaleSlope 0")
        if pixels.shape != (rows, columns):
            raise InputError(f"{what}: {path.name} holds pixels of shape {pixels.shape}, not Rows x Columns "
                             f"{(rows, columns)}")
        values = pixels.astype(np.float64) * slope + intercept
        if modality == "CT":
            volume[index] = np.clip(np.rint(values), HU_MIN, np.iinfo(np.int16).max)
        else:
            volume[index] = values
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((pixel_spacing[1], pixel_spacing[0], step))
    image.SetOrigin(tuple(positions[0].tolist()))
    image.SetDirection(_direction(row, column, normal))
    return image


# ------------------------------------------------------------------------------------------------ dose
def dose_image(item: DicomFile):
    """An RTDOSE as a float32 SimpleITK image in Gy on its own grid."""
    import SimpleITK as sitk

    what = f"RTDOSE {item.path}"
    header = item.header
    frames = integer(header, "NumberOfFrames", what, 1)
    rows, columns = integer(header, "Rows", what), integer(header, "Columns", what)
    check_memory(float(frames) * rows * columns, 16.0, what, (columns, rows, frames))  # float64 + raw
    dataset, pixels = _read_full(item.path)
    if "DoseGridScaling" not in dataset:
        raise InputError(f"{what}: no DoseGridScaling")
    scaling = number(dataset, "DoseGridScaling", 1.0, what)
    units = str(dataset.get("DoseUnits", "GY")).upper()
    if units not in ("GY", "CGY"):
        raise InputError(f"{what}: dose units {units!r} are not absolute (GY expected)")
    if pixels.size != frames * rows * columns:
        raise InputError(f"{what}: {pixels.size} pixels, not NumberOfFrames x Rows x Columns = "
                         f"{frames * rows * columns}")
    dose = pixels.astype(np.float64) * scaling
    if units == "CGY":
        dose /= 100.0  # DoseUnits CGY: converted to Gy (noted in import.json)
    dose = dose.reshape(frames, rows, columns)
    row, column, normal = _orientation(dataset, what)
    position = numbers(dataset, "ImagePositionPatient", 3, what)
    if frames > 1:
        if "GridFrameOffsetVector" not in dataset:
            raise InputError(f"{what}: {frames} frames but no GridFrameOffsetVector")
        offsets = numbers(dataset, "GridFrameOffsetVector", None, what)
        if offsets.size != frames:
            raise InputError(f"{what}: GridFrameOffsetVector has {offsets.size} values for {frames} frames")
        if offsets[0] != 0 and abs(offsets[0] - position @ normal) < 1e-3:
            offsets = offsets - offsets[0]  # absolute positions along the normal
        order = np.argsort(offsets, kind="stable")
        offsets, dose = offsets[order], dose[order]
        step = check_slice_positions(offsets, what)
        origin = position + offsets[0] * normal
    else:
        step = number(dataset, "SliceThickness", 1.0, what) or 1.0
        origin = position
    pixel_spacing = numbers(dataset, "PixelSpacing", 2, what).tolist()
    check_geometry_values(what, (columns, rows, frames), (pixel_spacing[1], pixel_spacing[0], step), origin)
    image = sitk.GetImageFromArray(dose.astype(np.float32))
    image.SetSpacing((pixel_spacing[1], pixel_spacing[0], step))
    image.SetOrigin(tuple(origin.tolist()))
    image.SetDirection(_direction(row, column, normal))
    return image


def _same_grid(a, b) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def group_dose(doses: list[DicomFile], notes: list[str]):
    """The dose of a group: the (latest) PLAN dose, else the sum of BEAM doses on one grid."""
    import SimpleITK as sitk

    plans = [d for d in doses if str(d.header.get("DoseSummationType", "")).upper() == "PLAN"]
    if plans:
        plans.sort(key=lambda d: (str(d.header.get("InstanceCreationDate", "")),
                                  str(d.header.get("InstanceCreationTime", "")), d.path.name))
        if len(doses) > 1:
            notes.append(f"{len(doses)} RTDOSE files: used the PLAN dose {plans[-1].path.name}")
        return dose_image(plans[-1])
    images = [dose_image(d) for d in doses]
    total = images[0]
    for other, item in zip(images[1:], doses[1:]):
        if not _same_grid(total, other):
            raise InputError(f"RTDOSE {item.path}: no PLAN dose, and the per-beam doses lie on different "
                             "grids (cannot sum them)")
        total = sitk.Add(total, other)
    if len(images) > 1:
        notes.append(f"no PLAN dose: summed {len(images)} RTDOSE files")
    return total


# ------------------------------------------------------------------------------------------------ RTSTRUCT
def fill_polygons(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixels (rows, columns) whose centres lie inside an odd number of polygons (holes stay empty).

    ``polygons`` are (N, 2) vertex arrays in index space (x = column, y = row). An even-odd scanline fill:
    for every edge crossing of a row's centre line, the pixels right of it are toggled (a cumulative sum),
    which gives the same pixels as ``skimage.draw.polygon`` per polygon, XORed, in O(crossings + pixels).
    """
    rows_count, columns_count = shape
    toggles = np.zeros((rows_count, columns_count + 1), dtype=np.int32)
    for vertices in polygons:
        x0, y0 = vertices[:, 0], vertices[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        # an edge crosses the centre lines of rows j with min(y) <= j < max(y) (half-open: vertices once)
        first = np.clip(np.ceil(np.minimum(y0, y1)), 0, rows_count).astype(np.int64)
        stop = np.clip(np.ceil(np.maximum(y0, y1)), 0, rows_count).astype(np.int64)
        counts = np.maximum(stop - first, 0)
        total = int(counts.sum())
        if total == 0:
            continue
        edge = np.repeat(np.arange(len(x0)), counts)
        row = first[edge] + np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        x = x0[edge] + (row - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
        column = np.clip(np.ceil(x), 0, columns_count).astype(np.int64)
        np.add.at(toggles, (row, column), 1)
    return (np.cumsum(toggles, axis=1)[:, :columns_count] & 1).astype(bool)


def rasterise_contours(contours: list[np.ndarray], grid) -> tuple[np.ndarray, list[str]]:
    """Closed planar contours (each (N, 3) LPS mm) as a uint8 (z, y, x) mask on ``grid`` (sitk.Image)."""
    size_x, size_y, size_z = grid.GetSize()
    mask = np.zeros((size_z, size_y, size_x), dtype=np.uint8)
    notes: list[str] = []
    if not contours:
        return mask, notes
    to_physical = np.asarray(grid.GetDirection()).reshape(3, 3) @ np.diag(grid.GetSpacing())
    to_index = np.linalg.inv(to_physical)
    origin = np.asarray(grid.GetOrigin())
    planes: dict[float, list[np.ndarray]] = defaultdict(list)
    tilted = False
    for points in contours:
        index = (points - origin) @ to_index.T
        tilted |= bool(np.ptp(index[:, 2]) > 0.5)
        planes[round(float(index[:, 2].mean()), 3)].append(index[:, :2])
    if tilted:
        notes.append("some contours are not parallel to the grid's slices (filled on their mean plane)")
    plane_positions = np.asarray(sorted(planes))
    half_window = 0.5
    if plane_positions.size > 1:
        half_window = max(0.5, float(np.median(np.diff(plane_positions))) / 2)
    slices = np.arange(size_z)
    distance = np.abs(slices[:, None] - plane_positions[None, :])
    nearest = distance.argmin(axis=1)
    chosen = np.where(distance[slices, nearest] <= half_window + 1e-6, nearest, -1)
    filled: dict[int, np.ndarray] = {}
    for slice_index in np.flatnonzero(chosen >= 0):
        plane = int(chosen[slice_index])
        if plane not in filled:
            filled[plane] = fill_polygons(planes[float(plane_positions[plane])], (size_y, size_x))
        mask[slice_index] = filled[plane]
    outside = sum(1 for p in plane_positions if p < -0.5 - half_window or p > size_z - 0.5 + half_window)
    if outside:
        notes.append(f"{outside} contour plane(s) outside the grid")
    return mask, notes


def contour_points(contour) -> np.ndarray:
    """ContourData as an (N, 3) float array, parsed from the raw bytes when possible (fast)."""
    element = contour.get_item("ContourData")
    if element is None:
        raise ValueError("no ContourData")
    value = getattr(element, "value", None)
    if isinstance(value, bytes):
        numbers = value.decode("ascii", errors="replace").replace("\\", " ").split()
        return np.asarray(numbers, dtype=np.float64).reshape(-1, 3)
    return np.asarray([float(v) for v in contour.ContourData], dtype=np.float64).reshape(-1, 3)


def structure_masks(item: DicomFile, grid, writer: PatientWriter) -> None:
    """Rasterise every ROI of an RTSTRUCT onto ``grid`` and write it through ``writer``."""
    import SimpleITK as sitk

    header = read_dataset(item.path)
    try:
        names = {int(roi.ROINumber): str(roi.get("ROIName", f"ROI_{roi.ROINumber}"))
                 for roi in header.get("StructureSetROISequence", [])}
    except Exception as error:  # a missing or garbled ROINumber
        raise InputError(f"{item.path}: unreadable StructureSetROISequence ({type(error).__name__}: {error})") \
            from None
    contours_by_roi: dict[int, list[np.ndarray]] = {number: [] for number in names}
    defects: dict[int, list[str]] = defaultdict(list)
    counts: dict[int, int] = defaultdict(int)
    skipped_types: set[str] = set()
    for roi in header.get("ROIContourSequence", []):
        try:
            number = int(roi.ReferencedROINumber)
        except Exception as error:
            raise InputError(f"{item.path}: a ROIContourSequence item has no valid ReferencedROINumber "
                             f"({type(error).__name__}: {error})") from None
        for index, contour in enumerate(roi.get("ContourSequence", []), start=counts[number] + 1):
            counts[number] = index
            kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper()
            if kind != "CLOSED_PLANAR":
                skipped_types.add(kind)
                continue
            try:
                points = contour_points(contour)
            except Exception as error:  # missing, not numbers, not triplets
                raise InputError(f"{item.path}: ROI {number} has unreadable ContourData "
                                 f"({type(error).__name__}: {error})") from None
            if not np.all(np.isfinite(points)):
                raise InputError(f"{item.path}: ROI {number} has non-finite ContourData coordinates")
            defect = contour_defect(points)
            if defect:
                defects[number].append(f"contour {index} {defect}")
                continue
            contours_by_roi.setdefault(number, []).append(points)
    if skipped_types:
        writer.note(f"{item.path.name}: {', '.join(sorted(skipped_types))} contours ignored (not areas)")
    for number, contours in contours_by_roi.items():
        name = names.get(number, f"ROI_{number}")
        if defects[number]:
            kept = (f"the structure is made of its {len(contours)} other contour(s)" if contours
                    else "no valid contour is left: not written")
            writer.warn(f"structure '{name}' (ROI {number}, {item.path.name}): {', '.join(defects[number])} "
                        f"of {counts[number]}: left out ({kept})")
        if not contours:
            if not defects[number]:
                writer.note(f"structure '{name}' has no contours: not written")
            continue
        mask, notes = rasterise_contours(contours, grid)
        for text in notes:
            writer.note(f"structure '{name}': {text}")
        image = sitk.GetImageFromArray(mask)
        image.CopyInformation(grid)
        writer.write_structure(name, image, f"{item.path} ROI {number}")


#: a contour whose points lie within this distance (mm, RMS) of one line encloses no area
ZERO_WIDTH_MM = 1e-3


def contour_defect(points: np.ndarray) -> str:
    """Why a CLOSED_PLANAR contour ((N, 3) LPS mm) is no polygon ("" when it is one): fewer than 3
    points, or zero area (its points repeated or on one line, within ``ZERO_WIDTH_MM``). A self-crossing
    contour whose lobes cancel in the signed area still encloses voxels and is kept."""
    if len(points) < 3:
        return f"has {len(points)} point{'s' if len(points) != 1 else ''} (fewer than 3)"
    spread = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
    if spread[1] / np.sqrt(len(points)) < ZERO_WIDTH_MM:
        return f"has zero area (its {len(points)} points lie on one line)"
    return ""


# ------------------------------------------------------------------------------------------------ import
def import_group(patient_id: str, group: DicomGroup, options: ImportOptions) -> PatientImportStatus:
    """Import one patient/frame-of-reference group; InputError with the skip reason."""
    if group.problems:
        raise InputError(group.problems[0])
    images, structure_sets, doses = ([f for f in group.files if f.modality in IMAGE_MODALITIES],
                                     group.of_modality("RTSTRUCT"), group.of_modality("RTDOSE"))
    if not images and not doses:
        if structure_sets:
            raise InputError(f"RTSTRUCT frame of reference {group.frame_of_reference or '(none)'} matches "
                             f"no image ({structure_sets[0].path})")
        raise InputError("no CT found (nor an MR or PET series)")
    source = os.path.commonpath([str(f.path.parent) for f in group.files])
    with PatientWriter(options, patient_id, source, "dicom") as writer:
        if options.pseudonymised:  # no PatientID and no UID that leads back to the archive
            writer.record["dicom"] = {"files": len(group.files)}
        else:
            writer.record["dicom"] = {
                "PatientID": group.patient_id, "FrameOfReferenceUID": group.frame_of_reference,
                "StudyInstanceUID": sorted({str(f.header.get("StudyInstanceUID", "")) for f in group.files}),
            }
        series: dict[tuple[str, str], list[DicomFile]] = defaultdict(list)
        for item in images:
            series[(item.modality, str(item.header.get("SeriesInstanceUID", "")))].append(item)
        ct = None
        if series:  # the CT first (the planning image), then the series with most slices
            (modality, uid), slices = max(series.items(), key=lambda entry: (entry[0][0] == "CT", len(entry[1])))
            if len(series) > 1:
                kinds = sorted({kind for kind, _ in series})
                writer.note(f"{len(series)} {'/'.join(kinds)} series: used the {modality} series {uid} "
                            f"({len(slices)} slices)")
            if not options.pseudonymised:
                writer.record["dicom"]["CTSeriesInstanceUID" if modality == "CT" else "ImageSeriesInstanceUID"] = uid
            if modality == "PT":
                units = sorted({str(s.header.get("Units", "") or "unknown") for s in slices})
                writer.note(f"PET values in {', '.join(units)} as stored (rescaled; no SUV conversion)")
            if len(slices) >= 2:
                ct = ct_volume(slices, f"{modality} series {uid} of patient {group.patient_id}", modality)
                writer.write_ct(ct, f"{len(slices)} {modality} slices in "
                                f"{Path(os.path.commonpath([str(s.path) for s in slices]))}", modality)
            else:
                writer.note(f"only {len(slices)} {modality} slice: no {modality} volume; structures on the "
                            "RTDOSE grid")
        dose = None
        if doses:
            notes: list[str] = []
            dose = group_dose(doses, notes)
            for text in notes:
                writer.note(text)
            if any(str(d.header.get("DoseUnits", "") if "DoseUnits" in d.header else "").upper() == "CGY"
                   for d in doses):
                writer.note("RTDOSE in cGy (DoseUnits CGY): converted to Gy")
            if ct is not None:
                from DeepDosimetricsLib.data.geometry import Geometry

                if not Geometry.from_image(dose).overlaps(Geometry.from_image(ct)):
                    raise InputError(f"RTDOSE {', '.join(d.path.name for d in doses)}: its grid does not "
                                     "overlap the CT (ImagePositionPatient or frame offsets wrong?)")
            writer.write_dose(dose, ", ".join(str(d.path) for d in doses))
        else:
            writer.note("no dose")
        grid = ct if ct is not None else dose
        if grid is None:
            raise InputError("no CT volume (a single CT slice) and no RTDOSE to put the structures on")
        for item in structure_sets:
            structure_masks(item, grid, writer)
        writer.commit()
    return writer.status(dose is not None)


def import_dicom(source, options: ImportOptions, report: Optional[ImportReport] = None) -> ImportReport:
    """Import every patient of a DICOM tree into ``options.out``; returns the report."""
    source = Path(source)
    report = report or ImportReport("dicom")
    if not source.is_dir():
        raise InputError(f"source folder {source} does not exist or is not a folder")
    files, unreadable = scan_tree(source, options.quiet)
    for item in files:  # identifying values are learnt here, to be removed from every text written
        options.redact.add_dataset(item.header)
    options.hide_source(source)
    report.redact = options.redact
    groups, orphans = group_files(files, unreadable, options.patient_id)
    if not groups and not orphans:
        raise InputError(f"no CT, RTSTRUCT or RTDOSE DICOM file found under {source}")
    options.out.mkdir(parents=True, exist_ok=True)
    for path, reason in orphans:
        report.skipped(str(path.parent.relative_to(source)) if path.parent != source else path.name,
                       reason, source=str(path))
    tasks = [PatientTask(patient_id, _group_source(group), (patient_id, group))
             for patient_id, group in groups.items()]
    import_each(_import_task, tasks, options, report, "import dicom")
    options.finish()
    return report


def _group_source(group: DicomGroup) -> str:
    return os.path.commonpath([str(f.path.parent) for f in group.files])


def _import_task(patient_id: str, group: DicomGroup, options: ImportOptions) -> PatientImportStatus:
    """One patient/frame-of-reference group (a pool task; ``options`` are a worker's): its report row
    (a failure skips the patient: layout.import_each).

    The identifiers of the group's own headers are added to the worker's redactor first, so a worker
    never depends on the importing process to know what to remove from its patient's texts."""
    for item in group.files:
        options.redact.add_dataset(item.header)
    return import_group(patient_id, group, options)
