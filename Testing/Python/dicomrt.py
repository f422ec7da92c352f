"""A small DICOM-RT patient (CT series, RTSTRUCT, RTDOSE) written with pydicom, for the privacy and fuzz tests.

Every file carries known identifiers (PatientName, PatientBirthDate, AccessionNumber, InstitutionName) so
tests can search the outputs for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NAME = "Rossi^Mariagrazia"
BIRTH_DATE = "19581123"
ACCESSION = "ACC7734521"
INSTITUTION = "Ospedale Careggi Firenze"
PATIENT_ID = "MRN-0042"
ROWS = COLUMNS = 16
SPACING = 2.0


def write_dicom(path: Path, modality: str, sop_class: str, **attributes) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = modality
    dataset.PatientName = NAME
    dataset.PatientBirthDate = BIRTH_DATE
    dataset.AccessionNumber = ACCESSION
    dataset.InstitutionName = INSTITUTION
    dataset.PatientID = PATIENT_ID
    dataset.StudyInstanceUID = "1.2.3.4"
    for key, value in attributes.items():
        setattr(dataset, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(str(path), enforce_file_format=True)


def square(lo: int, hi: int, z: float) -> list:
    corners = [(lo - 0.5, lo - 0.5), (hi + 0.5, lo - 0.5), (hi + 0.5, hi + 0.5), (lo - 0.5, hi + 0.5)]
    return [v for i, j in corners for v in (i * SPACING, j * SPACING, z)]


def write_patient(root: Path, frame: str = "1.9.1") -> Path:
    """CT (4 slices), RTSTRUCT (Body, PTV) and RTDOSE of one patient, in a folder named after the patient."""
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage, RTDoseStorage, RTStructureSetStorage, generate_uid

    folder = root / "Rossi_Mariagrazia" / "CT 2024"
    series = generate_uid()
    hu = np.full((ROWS, COLUMNS), -1000, np.int16)
    hu[3:13, 3:13] = 40
    for k in range(4):
        write_dicom(folder / f"ct{k}.dcm", "CT", CTImageStorage, SeriesInstanceUID=series, FrameOfReferenceUID=frame,
                     ImagePositionPatient=[0.0, 0.0, 3.0 * k], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                     PixelSpacing=[SPACING, SPACING], Rows=ROWS, Columns=COLUMNS, SamplesPerPixel=1,
                     PhotometricInterpretation="MONOCHROME2", BitsAllocated=16, BitsStored=16, HighBit=15,
                     PixelRepresentation=0, RescaleSlope=1, RescaleIntercept=-1024,
                     PixelData=(hu + 1024).astype(np.uint16).tobytes())
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = frame
    rois, contours = [], []
    for number, (name, (lo, hi)) in enumerate({"Body": (3, 12), "PTV": (6, 9)}.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, frame
        rois.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ContourSequence = []
        for k in range(4):
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.ContourData = square(lo, hi, 3.0 * k)
            contour.NumberOfContourPoints = 4
            item.ContourSequence.append(contour)
        contours.append(item)
    write_dicom(folder / "rs.dcm", "RTSTRUCT", RTStructureSetStorage, ReferencedFrameOfReferenceSequence=[frame_item],
                 StructureSetROISequence=rois, ROIContourSequence=contours)
    gy = np.zeros((4, ROWS, COLUMNS))
    gy[:, 5:11, 5:11] = 60.0
    gy[:, 3:13, 3:13] += 5.0
    write_dicom(folder / "rd.dcm", "RTDOSE", RTDoseStorage, FrameOfReferenceUID=frame,
                 ImagePositionPatient=[0.0, 0.0, 0.0], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                 PixelSpacing=[SPACING, SPACING], Rows=ROWS, Columns=COLUMNS, NumberOfFrames=4,
                 GridFrameOffsetVector=[3.0 * k for k in range(4)], DoseGridScaling=1e-3, DoseUnits="GY",
                 DoseSummationType="PLAN", SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2",
                 BitsAllocated=32, BitsStored=32, HighBit=31, PixelRepresentation=0,
                 PixelData=np.rint(gy / 1e-3).astype(np.uint32).tobytes())
    return root
