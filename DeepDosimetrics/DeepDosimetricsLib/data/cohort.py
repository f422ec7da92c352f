"""A cohort: a folder with one sub-folder per patient, and an optional ``clinical.csv``.

Layout::

    COHORT/
      clinical.csv                 optional; a `patient` column naming the patient folders
      <patient>/ct.nrrd            int16 HU (or ct.nii.gz, ct.nii, ct.mha)
      <patient>/dose.nrrd          optional, float Gy, any grid
      <patient>/structures/<Name>.nrrd   binary labelmaps, any grid
      <patient>/structures.seg.nrrd      or a Slicer segmentation
      <patient>/<Name>.nrrd        or structures beside the CT (flat layout, e.g. OpenKBP)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Union

from DeepDosimetricsLib.data.ids import safe_patient_id
from DeepDosimetricsLib.data.modality import AUTO
from DeepDosimetricsLib.data.patient import (
    CT_STEMS,
    DOSE_STEMS,
    Patient,
    image_stem,
    is_image_name,
    natural_key,
)
from DeepDosimetricsLib.runtime.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["CLINICAL_FILE", "Cohort", "entry_problem", "is_patient_folder", "read_clinical"]

CLINICAL_FILE = "clinical.csv"


def entry_problem(path: Path) -> Optional[str]:
    """Why a folder entry cannot be read (a broken link, a symbolic-link loop, no permission), or None."""
    try:
        os.stat(path)  # follows links: ELOOP for a loop, ENOENT for a broken link
    except OSError as error:
        if path.is_symlink():
            kind = "a symbolic-link loop" if error.errno == 40 else "a broken symbolic link"
            return f"{path} cannot be read: {kind} ({error.strerror})"
        return f"{path} cannot be read ({error.strerror or error})"
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        return f"{path} cannot be read (permission denied)"
    return None


def is_patient_folder(folder: Path) -> bool:
    """Whether a folder holds a CT (or, for a dose-only case, a dose) image; hidden folders never do.

    An entry named like the CT or dose counts even when it cannot be read (a folder named ``ct.nrrd``,
    a broken link): the patient is then reported when its CT is read, not ignored in silence.
    """
    if folder.name.startswith(".") or not folder.is_dir():
        return False
    return any(is_image_name(p) and image_stem(p).lower() in CT_STEMS + DOSE_STEMS for p in folder.iterdir())


class Cohort:
    """The patients of a cohort folder, in natural order of their folder names.

    Open one with ``Cohort.open(folder)``; iterate it for :class:`Patient` objects, index it by patient id.

    Args:
        folder: the cohort folder.
        patients: its patients, in order.
        clinical: the clinical table (pandas DataFrame with a str ``patient`` column), or None.
    """

    def __init__(self, folder: Path, patients: List[Patient], clinical: Optional[pd.DataFrame] = None,
                 unreadable: Optional[Dict[str, str]] = None) -> None:
        self.folder = folder
        self.patients = patients
        self.clinical = clinical
        #: entries of the cohort folder that cannot be read (name -> reason); cohort commands report them
        self.unreadable: Dict[str, str] = dict(unreadable or {})
        self._by_id = {p.id: p for p in patients}

    @classmethod
    def open(cls, folder: Union[str, Path], patient_ids: Optional[List[str]] = None,
             modality: str = AUTO) -> Cohort:
        """Open a cohort folder: one ``Patient`` per patient sub-folder, and ``clinical.csv`` if present.

        Args:
            folder: the cohort folder (hidden sub-folders and folders without a CT or dose are ignored).
            patient_ids: keep only these patients, in the cohort's order; default all.
            modality: the patients' image modality where their data do not say it (``auto``: CT); see
                ``Patient.modality``.

        Raises:
            InputError: the folder is missing, holds no patient folder (or is itself a patient folder), a
                requested patient is missing, or ``clinical.csv`` is unreadable or names none of the patients.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"cohort folder {folder} does not exist or is not a folder")
        folders, unreadable = [], {}
        for entry in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
            if entry.name.startswith("."):
                continue
            problem = entry_problem(entry)
            if problem is None and entry.name == CLINICAL_FILE and not entry.is_file():
                problem = f"{entry} is not a file (the clinical table is not read)"
            elif problem is None and entry.is_dir():
                try:
                    if is_patient_folder(entry):
                        folders.append(entry)
                    else:
                        log.info("cohort %s: %s holds no CT or dose image (not a patient)", folder, entry.name)
                except OSError as error:
                    problem = f"{entry} cannot be read ({error.strerror or error})"
            if problem:
                unreadable[entry.name] = problem
                log.warning("cohort %s: %s", folder, problem)
        if not folders:
            if is_patient_folder(folder):
                raise InputError(
                    f"{folder} is a patient folder, not a cohort: give the folder that contains it "
                    f"({folder.parent})"
                )
            raise InputError(
                f"cohort folder {folder} holds no patient folder (a sub-folder with ct.nrrd or ct.nii.gz)"
                + (f"; unreadable: {'; '.join(unreadable.values())}" if unreadable else "")
            )
        patients = [Patient.from_folder(p, modality=modality) for p in folders]
        clinical = read_clinical(folder / CLINICAL_FILE, [p.id for p in patients])
        if patient_ids is not None:
            wanted = [str(i) for i in patient_ids]
            missing = [i for i in wanted if i not in {p.id for p in patients}]
            if missing:
                why = "; ".join(unreadable[i] for i in missing if i in unreadable)
                raise InputError(f"cohort {folder}: no patient folder for {', '.join(missing)}"
                                 + (f" ({why})" if why else ""))
            patients = [p for p in patients if p.id in wanted]
            unreadable = {name: why for name, why in unreadable.items() if name in wanted or name == CLINICAL_FILE}
        return cls(folder, patients, clinical, unreadable)

    @property
    def ids(self) -> List[str]:
        """Patient ids in order."""
        return [p.id for p in self.patients]

    def __len__(self) -> int:
        return len(self.patients)

    def __iter__(self) -> Iterator[Patient]:
        return iter(self.patients)

    def __getitem__(self, patient_id: str) -> Patient:
        try:
            return self._by_id[str(patient_id)]
        except KeyError:
            raise InputError(f"cohort {self.folder}: no patient {patient_id!r}") from None

    def __contains__(self, patient_id: object) -> bool:
        return str(patient_id) in self._by_id

    def __repr__(self) -> str:
        return f"Cohort({str(self.folder)!r}, {len(self)} patients)"


def read_clinical(path: Path, patient_ids: List[str]) -> Optional[pd.DataFrame]:
    """The clinical table (pandas DataFrame indexed by nothing, `patient` as str), or None.

    Args:
        path: the ``clinical.csv`` file; None is returned when it does not exist.
        patient_ids: the cohort's patient ids; rows naming none of them are reported (a warning).
    """
    if not path.is_file():
        return None
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype={"patient": str})
    except Exception as error:  # pandas raises many kinds
        raise InputError(f"clinical table {path}: cannot read it as CSV ({error})") from None
    if "patient" not in table.columns:
        raise InputError(
            f"clinical table {path} has no 'patient' column (columns: {', '.join(map(str, table.columns))})"
        )
    table["patient"] = table["patient"].astype(str).str.strip()
    known = set(patient_ids)
    # ids written as in the source (spaces, accents...) name the folders the importers made of them
    table["patient"] = [pid if pid in known or safe_patient_id(pid) not in known else safe_patient_id(pid)
                        for pid in table["patient"]]
    matched = table["patient"].isin(known)
    if len(table) and not matched.any():
        raise InputError(
            f"clinical table {path}: its patient ids ({', '.join(table['patient'].head(3))}...) match none "
            f"of the patient folders ({', '.join(patient_ids[:3])}...)"
        )
    if (~matched).any():
        log.warning(
            "clinical table %s: %d row(s) name no patient folder: %s",
            path, int((~matched).sum()), ", ".join(table.loc[~matched, "patient"].head(5)),
        )
    return table
