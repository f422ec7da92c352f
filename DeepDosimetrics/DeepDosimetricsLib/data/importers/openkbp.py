"""Import the OpenKBP challenge's native sparse CSV format into the canonical cohort layout.

One folder per patient (``pt_N``) holding ``ct.csv``, ``dose.csv``, one CSV per structure,
``possible_dose_mask.csv`` and ``voxel_dimensions.csv`` (dx, dy, dz in mm, one per line). Each CSV has
an unnamed first column, the flat C-order index into the 128^3 grid, and a ``data`` column (the value for
CT and dose, empty for structures: the listed voxels are inside). Stored axes are
[y posterior, x patient-left, z INFERIOR]; CT values are HU + 1024 with 0 as background.

The arrays are transposed to (z, y, x) with z flipped so the slice index increases superiorly; the
challenge gives no origin, so it is (0, 0, 0) with identity direction (LPS). CT is clipped to
[-1024, 3071] HU as the challenge's values allow.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from DeepDosimetricsLib.data.importers.layout import (
    ImportOptions,
    PatientTask,
    PatientWriter,
    import_each,
)
from DeepDosimetricsLib.data.importers.report import ImportReport
from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)

GRID_SHAPE = (128, 128, 128)  # as stored: (y, x, z inferior)
CT_OFFSET = 1024
HU_RANGE = (-1024, 3071)
NOT_STRUCTURES = {"ct", "dose", "possible_dose_mask", "voxel_dimensions"}
EXTRA_MASKS = {"possible_dose_mask": "possible_dose_mask.nrrd"}


def read_sparse_csv(path: Path, dtype=np.float32, shape=GRID_SHAPE) -> np.ndarray:
    """A dense array in the stored axis order from one sparse CSV (value 1 where ``data`` is empty)."""
    import pandas as pd

    try:
        table = pd.read_csv(path, index_col=0)
    except Exception as error:  # pandas raises many kinds for a bad file
        raise InputError(f"unreadable file {path}: {error}") from None
    size = int(np.prod(shape))
    index = table.index.to_numpy()
    if not np.issubdtype(index.dtype, np.integer) or (index.size and (index.min() < 0 or index.max() >= size)):
        raise InputError(f"{path}: the first column must hold flat indices into a {shape} grid")
    dense = np.zeros(size, dtype=dtype)
    if "data" in table.columns and table["data"].notna().any():
        try:
            dense[index] = table["data"].to_numpy(dtype=np.float64).astype(dtype)
        except (ValueError, TypeError) as error:
            raise InputError(f"{path}: the data column holds values that are not numbers ({error})") from None
    else:
        dense[index] = 1
    return dense.reshape(shape)


def to_zyx(stored: np.ndarray) -> np.ndarray:
    """Stored [y, x, z-inferior] -> (z superior, y, x)."""
    return np.ascontiguousarray(np.transpose(stored, (2, 0, 1))[::-1])


def read_voxel_dimensions(path: Path) -> tuple[float, float, float]:
    """(dx, dy, dz) in mm."""
    try:
        values = [float(line) for line in path.read_text().split() if line.strip()]
    except (OSError, ValueError) as error:
        raise InputError(f"unreadable file {path}: {error}") from None
    if len(values) != 3 or min(values) <= 0:
        raise InputError(f"{path}: expected three positive voxel dimensions (dx, dy, dz), got {values}")
    return values[0], values[1], values[2]


def _image(array: np.ndarray, spacing):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((0.0, 0.0, 0.0))
    return image


def openkbp_patient_folders(source: Path) -> list[Path]:
    """Patient folders: sub-folders (natural order) holding CSV files."""
    from DeepDosimetricsLib.data.patient import natural_key

    return sorted((p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and any(p.glob("*.csv"))), key=lambda p: natural_key(p.name))


def import_openkbp(source, options: ImportOptions, report: Optional[ImportReport] = None) -> ImportReport:
    """Import every OpenKBP patient folder of ``source`` into ``options.out``; returns the report."""
    source = Path(source)
    report = report or ImportReport("openkbp")
    if not source.is_dir():
        raise InputError(f"source folder {source} does not exist or is not a folder")
    folders = openkbp_patient_folders(source)
    if not folders:
        raise InputError(f"source folder {source} has no OpenKBP patient folder (pt_N/ with CSV files)")
    options.out.mkdir(parents=True, exist_ok=True)
    options.hide_source(source)
    report.redact = options.redact
    tasks = []
    for folder in folders:  # every patient is named before any is imported (see layout.import_each)
        patient_id = options.patient_id(folder.name, folder.name)
        tasks.append(PatientTask(patient_id, str(folder), (folder, patient_id)))
    import_each(_import_patient, tasks, options, report, "import openkbp")
    options.finish()
    return report


def _import_patient(folder: Path, patient_id: str, options: ImportOptions):
    """One patient folder (a pool task; ``options`` are a worker's): its report row (an InputError skips
    the patient: layout.import_each)."""
    if not (folder / "ct.csv").is_file():
        raise InputError(f"no CT found ({folder / 'ct.csv'} is missing)")
    if not (folder / "voxel_dimensions.csv").is_file():
        raise InputError(f"{folder / 'voxel_dimensions.csv'} is missing (voxel spacing unknown)")
    spacing = read_voxel_dimensions(folder / "voxel_dimensions.csv")
    with PatientWriter(options, patient_id, str(folder), "openkbp") as writer:
        stored = read_sparse_csv(folder / "ct.csv", np.float32)
        hu = np.clip(np.rint(stored) - CT_OFFSET, *HU_RANGE).astype(np.int16)
        writer.write_ct(_image(to_zyx(hu), spacing), str(folder / "ct.csv"))
        del stored, hu
        has_dose = (folder / "dose.csv").is_file()
        if has_dose:
            dose = to_zyx(read_sparse_csv(folder / "dose.csv", np.float32))
            writer.write_dose(_image(dose, spacing), str(folder / "dose.csv"))
        else:
            writer.note("no dose")
        for path in sorted(folder.glob("*.csv")):
            stem = path.stem
            if stem in NOT_STRUCTURES:
                continue
            mask = to_zyx(read_sparse_csv(path, np.uint8))
            writer.write_structure(stem, _image(mask, spacing), str(path))
        for stem, file_name in EXTRA_MASKS.items():
            path = folder / f"{stem}.csv"
            if path.is_file():
                writer.write_extra(_image(to_zyx(read_sparse_csv(path, np.uint8)), spacing), file_name,
                                   str(path))
        writer.commit()
    return writer.status(has_dose)
