"""Synthetic DICOM(-RT) files written with pydicom, shared by the importer, privacy and fuzz tests.

- ``write_dataset``: one file (optionally bare: no preamble, no file meta, implicit VR, as old exports);
- ``write_ct_series``: a CT series whose voxel values say where they came from (importer tests);
- ``write_rtstruct`` / ``square``: an RTSTRUCT from named lists of contours; ``write_rtdose``: an RTDOSE;
- ``write_patient``: a small DICOM-RT patient (CT series, RTSTRUCT, RTDOSE) whose every file carries known
  identifiers (PatientName, PatientBirthDate, AccessionNumber, InstitutionName), so the privacy tests can
  search the outputs for them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import numpy as np

NAME = "Rossi^Mariagrazia"
BIRTH_DATE = "19581123"
ACCESSION = "ACC7734521"
INSTITUTION = "Ospedale Careggi Firenze"
PATIENT_ID = "MRN-0042"
#: the identifiers every file of ``write_patient`` carries
IDENTIFIERS = {"PatientName": NAME, "PatientBirthDate": BIRTH_DATE, "AccessionNumber": ACCESSION,
               "InstitutionName": INSTITUTION, "PatientID": PATIENT_ID}
STUDY = "1.2.3.4"

#: the grid of ``write_ct_series`` (PixelSpacing = (between rows, between columns))
ROWS, COLUMNS = 20, 24
ROW_SPACING, COLUMN_SPACING = 0.8, 0.7
ORIGIN_X, ORIGIN_Y = -10.0, -20.0


def write_dataset(path: Path, modality: str, sop_class: str, bare: bool = False, **attributes) -> None:
    """Write one DICOM file with a new SOPInstanceUID (unless ``attributes`` give one); ``bare``: no
    preamble nor file meta, implicit VR little endian."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = attributes.pop("SOPInstanceUID", None) or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = modality
    dataset.StudyInstanceUID = STUDY
    for key, value in attributes.items():
        setattr(dataset, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    if bare:
        del dataset.file_meta
        dataset.save_as(str(path), implicit_vr=True, little_endian=True)
    else:
        dataset.save_as(str(path), enforce_file_format=True)


def write_image_slice(path: Path, patient: str, series: str, frame: str, position: Sequence[float],
                      values: np.ndarray, pixel_spacing: Sequence[float], slope: float = 1.0,
                      intercept: float = -1024.0, modality: str = "CT", bare: bool = False, **attributes) -> None:
    """One axial image slice holding ``values`` (stored as uint16 (values - intercept) / slope)."""
    from pydicom.uid import CTImageStorage, MRImageStorage, PositronEmissionTomographyImageStorage

    raw = np.rint((np.asarray(values, dtype=np.float64) - intercept) / slope).astype(np.uint16)
    sop_class = {"MR": MRImageStorage, "PT": PositronEmissionTomographyImageStorage}.get(modality, CTImageStorage)
    write_dataset(path, modality, sop_class, bare=bare, **{"PatientID": patient, **attributes}, SeriesInstanceUID=series,
                  FrameOfReferenceUID=frame, ImagePositionPatient=[float(v) for v in position],
                  ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=list(pixel_spacing),
                  Rows=raw.shape[0], Columns=raw.shape[1], SamplesPerPixel=1,
                  PhotometricInterpretation="MONOCHROME2", BitsAllocated=16, BitsStored=16, HighBit=15,
                  PixelRepresentation=0, RescaleSlope=slope, RescaleIntercept=intercept, PixelData=raw.tobytes())


def write_ct_series(folder: Path, patient: str, frame: str, z_positions, shift_y_per_slice: float = 0.0,
                    shuffle_seed: int = 0, study: str = STUDY, bare: bool = False, modality: str = "CT",
                    **attributes) -> str:
    """CT slices with HU = 10*slice + column - 24 (raw 1000 + 10*slice + column), slice 2 with slope 0.5;
    file names do not follow the positions. Returns the SeriesInstanceUID."""
    from pydicom.uid import generate_uid

    series = generate_uid()
    order = list(range(len(z_positions)))
    random.Random(shuffle_seed).shuffle(order)
    for file_index, slice_index in enumerate(order):
        hu = (1000 + 10 * slice_index + np.arange(COLUMNS))[None, :].repeat(ROWS, 0) - 1024
        name = f"IM{file_index:03d}" if bare else f"img{file_index:03d}.dcm"
        write_image_slice(folder / name, patient, series, frame,
                          [ORIGIN_X, ORIGIN_Y + shift_y_per_slice * slice_index, float(z_positions[slice_index])],
                          hu, [ROW_SPACING, COLUMN_SPACING], slope=0.5 if slice_index == 2 else 1.0,
                          modality=modality, bare=bare, StudyInstanceUID=study, **attributes)
    return series


def square(i0, i1, j0, j1, z, origin=(ORIGIN_X, ORIGIN_Y), spacing=(COLUMN_SPACING, ROW_SPACING)) -> list:
    """A closed contour (flat LPS mm ContourData) around the voxel centres i0..i1 (columns), j0..j1 (rows)
    of a grid with ``origin`` (x, y) and ``spacing`` (between columns, between rows)."""
    corners = [(i0 - 0.5, j0 - 0.5), (i1 + 0.5, j0 - 0.5), (i1 + 0.5, j1 + 0.5), (i0 - 0.5, j1 + 0.5)]
    return [value for i, j in corners
            for value in (origin[0] + i * spacing[0], origin[1] + j * spacing[1], z)]


def write_rtstruct(path: Path, patient: str, frame: str, rois: dict, **attributes) -> None:
    """An RTSTRUCT; ``rois``: name -> list of flat ContourData lists (CLOSED_PLANAR)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import RTStructureSetStorage

    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = frame
    roi_items, contour_items = [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, frame
        roi_items.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ContourSequence = []
        for data in contours:
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(data) // 3
            contour.ContourData = data
            item.ContourSequence.append(contour)
        contour_items.append(item)
    write_dataset(path, "RTSTRUCT", RTStructureSetStorage, **{"PatientID": patient, **attributes},
                  ReferencedFrameOfReferenceSequence=[frame_item], StructureSetROISequence=roi_items,
                  ROIContourSequence=contour_items)


def write_rtdose(path: Path, patient: str, frame: str, gy: np.ndarray, scaling: float, z0: float,
                 origin=(ORIGIN_X, ORIGIN_Y), pixel_spacing=(2.0, 2.0), frame_step: float = 5.0,
                 **attributes) -> None:
    """A PLAN RTDOSE of ``gy`` (frames, rows, columns) in Gy, stored as uint32 x ``scaling``."""
    from pydicom.uid import RTDoseStorage

    raw = np.rint(gy / scaling).astype(np.uint32)
    write_dataset(path, "RTDOSE", RTDoseStorage, **{"PatientID": patient, **attributes},
                  FrameOfReferenceUID=frame, ImagePositionPatient=[origin[0], origin[1], z0],
                  ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=list(pixel_spacing),
                  Rows=gy.shape[1], Columns=gy.shape[2], NumberOfFrames=gy.shape[0],
                  GridFrameOffsetVector=[frame_step * k for k in range(gy.shape[0])], DoseGridScaling=scaling,
                  DoseUnits="GY", DoseSummationType="PLAN", SamplesPerPixel=1,
                  PhotometricInterpretation="MONOCHROME2", BitsAllocated=32, BitsStored=32, HighBit=31,
                  PixelRepresentation=0, PixelData=raw.tobytes())


def write_patient(root: Path, frame: str = "1.9.1") -> Path:
    """CT (4 slices of 16x16, 2 mm), RTSTRUCT (Body, PTV) and RTDOSE of one patient with identifiers, in
    ``root/Rossi_Mariagrazia/CT 2024``; returns ``root``."""
    from pydicom.uid import generate_uid

    folder = root / "Rossi_Mariagrazia" / "CT 2024"
    size, spacing = 16, 2.0
    series = generate_uid()
    hu = np.full((size, size), -1000, np.int16)
    hu[3:13, 3:13] = 40
    for k in range(4):
        write_image_slice(folder / f"ct{k}.dcm", PATIENT_ID, series, frame, [0.0, 0.0, 3.0 * k], hu,
                          [spacing, spacing], **IDENTIFIERS)
    grid = {"origin": (0.0, 0.0), "spacing": (spacing, spacing)}
    write_rtstruct(folder / "rs.dcm", PATIENT_ID, frame,
                   {name: [square(lo, hi, lo, hi, 3.0 * k, **grid) for k in range(4)]
                    for name, (lo, hi) in {"Body": (3, 12), "PTV": (6, 9)}.items()}, **IDENTIFIERS)
    gy = np.zeros((4, size, size))
    gy[:, 5:11, 5:11] = 60.0
    gy[:, 3:13, 3:13] += 5.0
    write_rtdose(folder / "rd.dcm", PATIENT_ID, frame, gy, 1e-3, 0.0, origin=(0.0, 0.0),
                 pixel_spacing=(spacing, spacing), frame_step=3.0, **IDENTIFIERS)
    return root
