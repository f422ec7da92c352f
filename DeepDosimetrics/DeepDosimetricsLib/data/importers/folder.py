"""Import folder exports (one sub-folder of image files per patient) into the canonical cohort layout.

Two layouts are recognised with the default patterns:

* the prototype's exports: ``Pt001/2_pms.nrrd`` is the CT and ``Pt001/1_RTSTRUCT_ANON_<Name>.nrrd``
  are the structures (the prefix ``<n>_RTSTRUCT_`` and an ``ANON_`` after it are not part of the name),
  a dose, if any, in a file named ``*RTDOSE*`` or ``*dose*``;
* flat folders such as OpenKBP's (``ct.nrrd``, ``dose.nrrd``, ``<Name>.nrrd``; ``possible_dose_mask.nrrd``
  is kept beside the CT, not as a structure), and cohorts already in the canonical layout.

Each role (CT, dose, structures) has a list of glob patterns tried in order; the first pattern that
matches a file wins. Conforming NRRD files are linked (symlink by default, or hard link) or copied; other
files are converted. The source folder is never modified.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from DeepDosimetricsLib.data.importers.layout import (
    ImportOptions,
    PatientTask,
    PatientWriter,
    import_each,
)
from DeepDosimetricsLib.data.importers.report import SKIPPED, ImportReport, PatientImportStatus
from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_CT_PATTERNS = ["ct.nrrd", "CT.nrrd", "ct.nii.gz", "ct.mha", "*_pms.nrrd", "CT_*.nrrd", "*_CT.nrrd"]
DEFAULT_DOSE_PATTERNS = ["dose.nrrd", "dose.nii.gz", "dose.mha", "*RTDOSE*.nrrd", "*[Dd]ose*.nrrd"]
DEFAULT_STRUCTURE_PATTERNS = ["*RTSTRUCT*.nrrd", "structures/*.nrrd", "structures/*.nii.gz", "*.nrrd"]
#: files that are never a CT, dose or structure; matched names are kept beside the CT as they are
EXTRA_PATTERNS = ["possible_dose_mask.nrrd"]
#: the structure name inside a file name: the prototype's ``<n>_RTSTRUCT_[ANON_]<Name>``, else the stem
DEFAULT_NAME_PATTERN = r"^(?:\d+_)?RTSTRUCT_(?:ANON_)?(?P<name>.+)$"
#: never a CT (RTSTRUCT contains "CT") or a dose, whatever the patterns say
NOT_CT = ["*RTSTRUCT*", "*RTDOSE*", "*RTPLAN*"]
NOT_DOSE = ["*RTSTRUCT*"]
IMAGE_SUFFIXES = (".nii.gz", ".nrrd", ".nii", ".mha", ".mhd")
CLINICAL_FILE = "clinical.csv"


@dataclass
class FolderPatterns:
    """Glob patterns (relative to a patient folder) for each role, tried in order."""

    ct: list[str] = field(default_factory=lambda: list(DEFAULT_CT_PATTERNS))
    dose: list[str] = field(default_factory=lambda: list(DEFAULT_DOSE_PATTERNS))
    structures: list[str] = field(default_factory=lambda: list(DEFAULT_STRUCTURE_PATTERNS))
    extras: list[str] = field(default_factory=lambda: list(EXTRA_PATTERNS))
    name_pattern: str = DEFAULT_NAME_PATTERN

    def __post_init__(self):
        try:
            compiled = re.compile(self.name_pattern)
        except re.error as error:
            raise InputError(f"--name-pattern {self.name_pattern!r} is not a regular expression: {error}") \
                from None
        if "name" not in compiled.groupindex:
            raise InputError(f"--name-pattern {self.name_pattern!r} needs a group (?P<name>...)")


@dataclass
class PatientFiles:
    """The files found for one patient."""

    ct: Optional[Path]
    dose: Optional[Path]
    structures: dict[str, Path]  # original structure name -> file
    extras: list[Path]
    problem: str = ""  # why the patient cannot be imported


def image_stem(path: Path) -> str:
    """The file name without its image suffix."""
    for suffix in IMAGE_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _matches(folder: Path, pattern: str) -> list[Path]:
    # fnmatch on relative posix paths, so "structures/*.nrrd" and "*.nrrd" do not cross folders
    depth = pattern.count("/")
    candidates = folder.glob("/".join(["*"] * (depth + 1)))
    return sorted(p for p in candidates if p.is_file() and fnmatch.fnmatchcase(
        p.relative_to(folder).as_posix(), pattern))


def _first_matching(folder: Path, patterns: list[str], taken: set[Path],
                    excluded: tuple[str, ...] = ()) -> list[Path]:
    for pattern in patterns:
        found = [p for p in _matches(folder, pattern) if p not in taken
                 and not any(fnmatch.fnmatchcase(p.name, never) for never in excluded)]
        if found:
            return found
    return []


def find_patient_files(folder: Path, patterns: FolderPatterns) -> PatientFiles:
    """Assign a patient folder's files to CT, dose, structures and extras."""
    extras = [p for pattern in patterns.extras for p in _matches(folder, pattern)]
    taken = set(extras)
    ct_files = _first_matching(folder, patterns.ct, taken, tuple(NOT_CT))
    files = PatientFiles(ct=None, dose=None, structures={}, extras=extras)
    if len(ct_files) > 1:
        files.problem = (f"several CT candidates ({', '.join(p.name for p in ct_files)}); "
                         "choose one with --ct")
        return files
    if not ct_files:
        files.problem = f"no CT found (patterns: {', '.join(patterns.ct)})"
        return files
    files.ct = ct_files[0]
    taken.add(files.ct)
    dose_files = _first_matching(folder, patterns.dose, taken, tuple(NOT_DOSE))
    if len(dose_files) > 1:
        files.problem = (f"several dose candidates ({', '.join(p.name for p in dose_files)}); "
                         "choose one with --dose")
        return files
    files.dose = dose_files[0] if dose_files else None
    taken.update(dose_files)
    name_regex = re.compile(patterns.name_pattern)
    for path in _first_matching(folder, patterns.structures, taken):
        stem = image_stem(path)
        match = name_regex.match(stem)
        name = match.group("name") if match and match.group("name") else stem
        if name in files.structures:
            files.problem = f"two structure files named {name!r}: {files.structures[name].name}, {path.name}"
            return files
        files.structures[name] = path
    return files


def patient_folders(source: Path, unreadable: Optional[list] = None) -> list[Path]:
    """The patient folders of a source: its non-hidden sub-folders (natural order).

    Entries that cannot be read (a broken link, a symbolic-link loop, a folder without permission) are
    appended to ``unreadable`` as (path, reason), so they are reported rather than skipped in silence.
    """
    from DeepDosimetricsLib.data.cohort import entry_problem
    from DeepDosimetricsLib.data.patient import natural_key

    folders = []
    for path in source.iterdir():
        if path.name.startswith("."):
            continue
        problem = entry_problem(path)
        if problem:
            if unreadable is not None:
                unreadable.append((path, problem))
        elif path.is_dir():
            folders.append(path)
    return sorted(folders, key=lambda p: natural_key(p.name))


def import_folder(source, options: ImportOptions, patterns: Optional[FolderPatterns] = None,
                  report: Optional[ImportReport] = None) -> ImportReport:
    """Import every patient sub-folder of ``source`` into ``options.out``; returns the report.

    Every folder is named (pseudonym or safe id) before any is imported; the patients then run one per
    task on ``options.pool`` (layout.import_each) and their rows come back in folder order."""
    source = Path(source)
    patterns = patterns or FolderPatterns()
    report = report or ImportReport("folder")
    if not source.is_dir():
        raise InputError(f"source folder {source} does not exist or is not a folder")
    if source.resolve() == options.out.resolve():
        raise InputError(f"the output cohort {options.out} must differ from the source {source}")
    unreadable: list = []
    folders = patient_folders(source, unreadable)
    source_is_a_patient = not find_patient_files(source, patterns).problem
    if source_is_a_patient and all(p.name == "structures" for p in folders):
        raise InputError(f"{source} looks like one patient's folder: give the folder that contains "
                         f"the patient folders ({source.parent})")
    if not folders and not unreadable:
        raise InputError(f"source folder {source} has no patient sub-folder")
    options.out.mkdir(parents=True, exist_ok=True)
    options.hide_source(source)
    report.redact = options.redact
    items: list = [PatientImportStatus(options.patient_id(path.name, path.name), SKIPPED, problem, str(path))
                   for path, problem in unreadable]
    seen = {entry.patient for entry in report.entries} | {item.patient for item in items}
    for folder in folders:
        patient_id = options.patient_id(folder.name, folder.name)
        if patient_id in seen:
            items.append(PatientImportStatus(f"{patient_id} ({options.redact(folder.name)})", SKIPPED,
                                             f"another source folder already gives the patient id {patient_id}",
                                             str(folder)))
            continue
        seen.add(patient_id)
        items.append(PatientTask(patient_id, str(folder), (folder, patient_id, patterns)))
    import_each(_import_patient, items, options, report, "import folder")
    clinical = source / CLINICAL_FILE
    if clinical.is_file() and (options.overwrite or not (options.out / CLINICAL_FILE).exists()):
        import_clinical(clinical, options, report)
    options.finish()
    return report


def _import_patient(folder: Path, patient_id: str, patterns: FolderPatterns,
                    options: ImportOptions) -> PatientImportStatus:
    """One patient folder (a pool task; ``options`` are a worker's): its report row (an InputError skips
    the patient: layout.import_each)."""
    files = find_patient_files(folder, patterns)
    if files.problem:
        return PatientImportStatus(patient_id, SKIPPED, files.problem, str(folder))
    with PatientWriter(options, patient_id, str(folder), "folder") as writer:
        writer.place_ct(files.ct)
        if files.dose is not None:
            writer.place_dose(files.dose)
        else:
            writer.note("no dose")
        for name, path in files.structures.items():
            writer.place_structure(name, path)
        for path in files.extras:
            writer.place_extra(path, path.name)
        writer.commit()
    return writer.status(files.dose is not None)


def import_clinical(path: Path, options: ImportOptions, report: ImportReport) -> Path:
    """Write the source's clinical table into the cohort with the patient ids mapped exactly as the
    patient folders were (file-system safe ids or pseudonyms), so no row is orphaned by the import.

    With pseudonyms, columns that identify a person (name, birth date, accession number, institution...)
    are dropped. Rows naming no imported patient are kept and reported in the summary as a note.
    """
    import pandas as pd

    from DeepDosimetricsLib.data.pseudonym import IDENTIFYING_COLUMNS
    from DeepDosimetricsLib.runtime.atomic import write_csv_atomic

    try:
        table = pd.read_csv(path, dtype={"patient": str}, keep_default_na=False)
    except Exception as error:  # pandas raises many kinds
        raise InputError(f"clinical table {path}: cannot read it as CSV ({error})") from None
    if "patient" not in table.columns:
        raise InputError(f"clinical table {path} has no 'patient' column")
    table["patient"] = [options.patient_id(str(v).strip(), str(v).strip()) for v in table["patient"]]
    if options.pseudonymised:
        dropped = [c for c in table.columns
                   if str(c).lower().replace("_", "").replace(" ", "") in IDENTIFYING_COLUMNS]
        table = table.drop(columns=dropped)
        if dropped:
            log.info("clinical table: %d identifying column(s) dropped", len(dropped))
    imported = {entry.patient for entry in report.entries if entry.ok}
    orphans = sorted(set(table["patient"]) - imported - {p.name for p in options.out.iterdir() if p.is_dir()})
    if orphans:
        log.warning("clinical table %s: %d row(s) name no imported patient: %s", options.redact(str(path)),
                    len(orphans), ", ".join(orphans[:5]))
    return write_csv_atomic(table, options.out / CLINICAL_FILE)
