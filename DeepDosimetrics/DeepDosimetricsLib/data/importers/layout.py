"""Writing one patient into the canonical cohort layout, atomically.

``COHORT/<patient>/ct.nrrd`` (int16 HU; an MR, PET or other image in its place keeps its own values, its
modality recorded as ``ct.modality`` in ``import.json``), optional ``dose.nrrd`` (float32 Gy),
``structures/<Name>.nrrd`` (uint8 0/1, names normalised through the synonym map) and ``import.json``
(source, original structure names, notes, warnings). A patient is written into a hidden staging folder and moved
into place at the end, so an interrupted import never leaves a half patient under its final name; a
patient folder holding ``import.json`` counts as imported and is kept unless ``overwrite`` is set.

Parallel imports (``ImportOptions.pool``: ``--jobs N`` or ``--scheduler``, runtime/pools.py) keep the
state of an import in the importing process: it names every patient first (pseudonyms computed with the
key, which never leaves it; identifiers to redact collected from the DICOM headers it scanned), saves the
key file, then :func:`import_patients` sends one patient per task. A worker gets a copy of the options
without the pseudonym key (:meth:`ImportOptions.for_worker`), writes only its patient's folder, and
returns a :class:`PatientResult`: the report row and the identifiers it learnt. The importing process
merges those in patient order and alone writes the key file and ``import_report.csv``, so the outputs
are those of ``--jobs 1`` byte for byte (the in-process path runs the same tasks).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np

from DeepDosimetricsLib.data.checks import check_image
from DeepDosimetricsLib.data.headers import check_image_file
from DeepDosimetricsLib.data.ids import safe_patient_id
from DeepDosimetricsLib.data.modality import AUTO, CT, image_modality, parse_modality_option, resolve_modality
from DeepDosimetricsLib.data.pseudonym import Pseudonymizer, Redactor, identifying_keys
from DeepDosimetricsLib.data.synonyms import SynonymMap, load_synonyms, safe_name
from DeepDosimetricsLib.runtime.atomic import replace_folder
from DeepDosimetricsLib.runtime.errors import InputError
from DeepDosimetricsLib.runtime.pools import PoolSpec, open_pool

log = logging.getLogger(__name__)

CT_FILE = "ct.nrrd"
DOSE_FILE = "dose.nrrd"
STRUCTURES_DIR = "structures"
RECORD_FILE = "import.json"
#: how source files reach the cohort in the folder importer
LINK_MODES = ("symlink", "hardlink", "copy")


@dataclass
class ImportOptions:
    """Options shared by every importer."""

    out: Path
    overwrite: bool = False  # re-import patients already in the cohort
    link: str = "symlink"  # folder importer: symlink | hardlink | copy conforming NRRD files
    synonyms: Optional[SynonymMap] = None  # None: packaged map (+ $DEEPDOSIMETRICS_SYNONYMS)
    quiet: bool = False
    #: key file of the pseudonyms (created when absent); None keeps the (file-system safe) patient ids
    pseudonymize: Optional[Union[str, os.PathLike]] = None
    #: identifying strings met while importing, removed from every text written (see data/pseudonym.py)
    redact: Redactor = field(default_factory=Redactor)
    #: how patients are spread (``--jobs``/``--scheduler``); None: in this process
    pool: Optional[PoolSpec] = None
    #: folder importer: the images' modality where their headers do not say it (``auto``: CT)
    modality: str = AUTO

    def __post_init__(self):
        self.out = Path(self.out)
        self.modality = parse_modality_option(self.modality)
        if self.link not in LINK_MODES:
            raise InputError(f"unknown link mode '{self.link}'; use one of {', '.join(LINK_MODES)}")
        if self.synonyms is None:
            self.synonyms = load_synonyms()
        self.pseudonymizer = Pseudonymizer(self.pseudonymize) if self.pseudonymize else None
        self._pseudonyms = self.pseudonymizer is not None
        if self.pseudonymizer is not None:
            key = Path(self.pseudonymize).resolve()
            if key.is_relative_to(self.out.resolve()):
                raise InputError(f"the pseudonym key file {self.pseudonymize} must not lie inside the cohort "
                                 f"{self.out} (it re-identifies the patients)")

    @property
    def pseudonymised(self) -> bool:
        return self._pseudonyms

    def for_worker(self) -> ImportOptions:
        """The options a patient task gets: no pseudonym key (ids are named before the tasks start), no
        pool, and its own copy of the redactor (what it learns comes back in its PatientResult)."""
        worker = copy.copy(self)
        worker.pseudonymizer, worker.pool, worker.quiet = None, None, True
        worker.redact = self.redact.copy()
        return worker

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["pseudonymizer"] = None  # the secret key never travels to a worker
        return state

    def patient_id(self, original: object, source_name: Optional[str] = None) -> str:
        """The cohort's id of a patient: its pseudonym, or the file-system safe form of its id.

        With pseudonyms, the original id (and ``source_name``, e.g. its folder name) is redacted from
        every text the import writes.
        """
        if not self.pseudonymised:
            return safe_patient_id(original)
        if self.pseudonymizer is None:
            raise InputError("pseudonyms are named by the importing process, not by a worker")
        pseudonym = self.pseudonymizer.pseudonym(original)
        for text in (original, safe_patient_id(original), source_name):
            if text:
                self.redact.add(text, pseudonym)
        return pseudonym

    def hide_source(self, source: Union[str, os.PathLike]) -> None:
        """With pseudonyms, the source folder's path is written as ``SRC``."""
        if self.pseudonymised:
            self.redact.add(str(Path(source).resolve()), "SRC")
            self.redact.add(str(source), "SRC")

    def finish(self) -> None:
        """Save the pseudonym mapping into the key file (after an import)."""
        if self.pseudonymizer is not None:
            self.pseudonymizer.save()


@dataclass
class PatientResult:
    """What a patient task returns to the importing process: its report row (texts not yet redacted)
    and the (value, replacement) pairs it added to its redactor."""

    entry: Any  # PatientImportStatus
    redact: list = field(default_factory=list)


@dataclass
class PatientTask:
    """One patient to import: ``function(*arguments, worker_options)`` gives its report row; ``source``
    names where it comes from (in the report, and in the row of a patient already in the cohort)."""

    patient_id: str
    source: str
    arguments: tuple


def import_each(function: Callable, items: Sequence[Any], options: ImportOptions, report: Any,
                desc: str) -> Any:
    """The per-patient loop every importer shares; returns ``report`` with one row per item, in order.

    ``items`` are :class:`PatientTask` or report rows the importer decided itself (a patient skipped
    before its import, e.g. an unreadable folder). A patient already in the cohort keeps its folder and
    gets the row of :func:`existing_patient` (unless ``options.overwrite``); the others run on the pool of
    ``options.pool`` (:func:`import_patients`). Every patient is named (pseudonym or safe id) before any
    is imported, by the importer that built ``items``.
    """
    rows: list = []  # per item: a report row now, or the index of its import task
    tasks: List[PatientTask] = []
    for item in items:
        if not isinstance(item, PatientTask):
            rows.append(item)
            continue
        existing = existing_patient(options, item.patient_id, item.source)
        if existing is not None:
            rows.append(existing)
        else:
            rows.append(len(tasks))
            tasks.append(item)
    imported = import_patients(function, tasks, options, desc)
    for row in rows:
        report.add(imported[row] if isinstance(row, int) else row)
    return report


def _patient_task(function: Callable, task: PatientTask, options: ImportOptions) -> PatientResult:
    """A pool task: ``function(*task.arguments, options)`` on a fresh copy of the worker options (so a
    task run in this process learns exactly what it would learn in a worker). An InputError skips the
    patient with its message; any other failure (a damaged file a reader could not handle) too, naming
    its type, so one patient never stops an import."""
    from DeepDosimetricsLib.data.importers.report import SKIPPED, PatientImportStatus

    options = options.for_worker()
    known = len(options.redact.added)
    try:
        entry = function(*task.arguments, options)
    except InputError as error:
        entry = PatientImportStatus(task.patient_id, SKIPPED, str(error), task.source)
    except Exception as error:  # reported in the patient's row, with its type
        import traceback

        log.debug("patient %s failed: %s", task.patient_id, options.redact(traceback.format_exc()))
        entry = PatientImportStatus(task.patient_id, SKIPPED, f"error: unexpected {type(error).__name__} "
                                    f"while reading {task.source}: {error}", task.source)
    return PatientResult(entry, options.redact.added[known:])


def import_patients(function: Callable, tasks: Sequence[PatientTask], options: ImportOptions,
                    desc: str) -> List[Any]:
    """Run ``function(*task.arguments, worker_options) -> PatientImportStatus`` for every task on the
    pool of ``options.pool`` (one patient per task); returns the rows in task order, after adding what
    the tasks learnt to ``options.redact``. The pseudonym key file is saved first, so no patient folder
    is ever in place without its pseudonym in the key file."""
    from DeepDosimetricsLib.runtime.progress import progress_bar

    options.finish()
    results: List[Optional[PatientResult]] = [None] * len(tasks)
    if tasks:
        worker = options.for_worker()
        with open_pool(options.pool, tasks=len(tasks)) as pool:
            finished = pool.map(_patient_task, [(function, task, worker) for task in tasks])
            bar = progress_bar(None, total=len(tasks), desc=desc, quiet=options.quiet)
            for index, result in finished:  # submitted before the bar's thread starts (forked workers)
                results[index] = result
                bar.update(1)
            bar.close()
    for result in results:
        options.redact.extend(result.redact)
    return [result.entry for result in results]


def patient_state(cohort_dir: Path, patient_id: str) -> str:
    """'absent', 'imported' (has import.json) or 'foreign' (a folder not made by an importer)."""
    folder = cohort_dir / patient_id
    if not folder.exists():
        return "absent"
    return "imported" if (folder / RECORD_FILE).is_file() else "foreign"


def existing_patient(options: ImportOptions, patient_id: str, source: str):
    """The report entry of a patient already in the cohort (kept unless overwrite), else None."""
    from DeepDosimetricsLib.data.importers.report import OK, SKIPPED, PatientImportStatus

    state = patient_state(options.out, patient_id)
    if state == "absent" or options.overwrite:
        return None
    if state == "foreign":
        return PatientImportStatus(patient_id, SKIPPED, f"{options.out / patient_id} exists and was not "
                                   "made by an import; --overwrite replaces it", source)
    try:
        record = read_record(options.out / patient_id)
    except (OSError, ValueError):
        record = {}
    return PatientImportStatus(patient_id, OK, "already imported (kept; --overwrite to import again)",
                               source, len(record.get("structures") or {}), bool(record.get("dose")))


def read_record(patient_dir: Union[str, os.PathLike]) -> dict:
    """The ``import.json`` of an imported patient."""
    with open(Path(patient_dir) / RECORD_FILE, encoding="utf-8") as stream:
        return json.load(stream)


def as_ct(image):
    """The image as int16 HU (rounded and clipped to the int16 range when needed)."""
    import SimpleITK as sitk

    if image.GetPixelID() == sitk.sitkInt16:
        return image
    array = np.rint(sitk.GetArrayViewFromImage(image).astype(np.float64))
    converted = sitk.GetImageFromArray(np.clip(array, -32768, 32767).astype(np.int16))
    converted.CopyInformation(image)
    return converted


def as_mask(image):
    """The image as a uint8 0/1 mask (any non-zero voxel is inside)."""
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image)
    if image.GetPixelID() == sitk.sitkUInt8 and array.max(initial=0) <= 1:
        return image
    converted = sitk.GetImageFromArray((array != 0).astype(np.uint8))
    converted.CopyInformation(image)
    return converted


class PatientWriter:
    """Stages one patient's files and moves them into ``COHORT/<patient>`` on ``commit``.

    Use as a context manager: leaving it with an exception removes the staging folder.
    """

    def __init__(self, options: ImportOptions, patient_id: str, source: str, importer: str):
        self.options = options
        self.patient_id = patient_id
        self.final_dir = options.out / patient_id
        options.out.mkdir(parents=True, exist_ok=True)
        self.staging_dir = Path(tempfile.mkdtemp(prefix=f".{patient_id}.", suffix=".importing",
                                                 dir=options.out))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.staging_dir, 0o777 & ~umask)  # mkdtemp makes it private
        self.record: dict[str, Any] = {
            "patient": patient_id, "importer": importer, "source": source,
            "ct": None, "dose": None, "structures": {}, "notes": [],
        }
        self.structure_count = 0

    def __enter__(self) -> PatientWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.staging_dir.exists():
            shutil.rmtree(self.staging_dir, ignore_errors=True)

    def note(self, text: str) -> None:
        """A remark kept in import.json and shown in the report (e.g. 'no dose')."""
        self.record["notes"].append(text)

    def warn(self, text: str) -> None:
        """Something wrong in the source that the import worked around (a defective contour left out, an
        unusual value): a note ``warning: ...``, listed under ``warnings`` in import.json and printed by
        the import's summary; the patient is imported (exit code 0)."""
        self.record.setdefault("warnings", []).append(text)
        self.note(f"warning: {text}")

    def status(self, has_dose: bool):
        """The report row of this patient, imported (after ``commit``)."""
        from DeepDosimetricsLib.data.importers.report import OK, PatientImportStatus

        return PatientImportStatus(self.patient_id, OK, "; ".join(self.record["notes"]), self.record["source"],
                                   self.structure_count, has_dose, warnings=list(self.record.get("warnings", [])))

    # --- images written from memory -------------------------------------------------------------
    def check(self, image, kind: str, what: str) -> None:
        """The value checks of data/checks.py (InputError skips the patient; warnings are warned)."""
        for text in check_image(image, what, kind):
            self.warn(text)

    def write_ct(self, image, source: str = "", modality: str = CT) -> None:
        """Write the image: a CT as int16 HU; another modality (MR, PT...) with its own values."""
        name = "CT" if modality == CT else f"image ({modality})"
        self.check(image, modality, f"{name} ({source})" if source else name)
        self._write(as_ct(image) if modality == CT else image, CT_FILE)
        self.record["ct"] = {"file": CT_FILE, "source": source, "modality": modality}

    def write_dose(self, image, source: str = "") -> None:
        import SimpleITK as sitk

        self.check(image, "dose", f"dose ({source})" if source else "dose")
        self._write(sitk.Cast(image, sitk.sitkFloat32), DOSE_FILE)
        self.record["dose"] = {"file": DOSE_FILE, "source": source}

    def write_structure(self, original_name: str, image, source: str = "") -> Optional[str]:
        """Write a mask under its canonical name; returns that name (None when the mask is empty)."""
        import SimpleITK as sitk

        mask = as_mask(image)
        if not sitk.GetArrayViewFromImage(mask).any():
            self.note(f"structure '{original_name}' is empty: not written")
            return None
        name = self._structure_name(original_name)
        self._write(mask, self._structure_file(name))
        self._record_structure(name, original_name, source)
        return name

    # --- files placed by link or copy -----------------------------------------------------------
    def place_ct(self, path: Path) -> None:
        """Link/copy a conforming CT NRRD, or convert it to int16 HU; an image of another modality (its
        header's, else ``options.modality``) is linked or copied with its own values."""
        import SimpleITK as sitk

        modality, _ = resolve_modality(image_modality(_read_information(path)), f"header ({path.name})",
                                       self.options.modality, f"image {path}")
        if modality == CT:
            self._place(path, CT_FILE, sitk.sitkInt16, as_ct, CT)
        else:
            self._place(path, CT_FILE, None, lambda image: image, modality)
        self.record["ct"] = {"file": CT_FILE, "source": str(path), "modality": modality}

    def place_dose(self, path: Path) -> None:
        """Link/copy a conforming float32 dose NRRD, or convert it."""
        import SimpleITK as sitk

        self._place(path, DOSE_FILE, sitk.sitkFloat32, lambda image: sitk.Cast(image, sitk.sitkFloat32), "dose")
        self.record["dose"] = {"file": DOSE_FILE, "source": str(path)}

    def place_structure(self, original_name: str, path: Path) -> Optional[str]:
        """Link/copy a uint8 0/1 mask NRRD (converted otherwise); None when empty."""
        import SimpleITK as sitk

        image = _read(path)
        mask = as_mask(image)
        if not sitk.GetArrayViewFromImage(mask).any():
            self.note(f"structure '{original_name}' ({path.name}) is empty: not written")
            return None
        name = self._structure_name(original_name)
        relative = self._structure_file(name)
        if mask is image and _linkable(path) and not self._private_keys(image):
            self._link(path, relative)
        else:
            self._write(mask, relative)
        self._record_structure(name, original_name, str(path))
        return name

    def write_extra(self, image, relative: str, source: str = "") -> None:
        """Write another image as it is (e.g. OpenKBP's possible_dose_mask)."""
        self._write(image, relative)
        self.record.setdefault("extras", {})[relative] = source

    def place_extra(self, path: Path, relative: str) -> None:
        """Link/copy another file as it is (e.g. OpenKBP's possible_dose_mask.nrrd)."""
        if self._private_keys(_read_information(path)):
            self._write(_read(path), relative)
        else:
            self._link(path, relative)
        self.record.setdefault("extras", {})[relative] = str(path)

    # --- commit ---------------------------------------------------------------------------------
    def commit(self) -> Path:
        """Write import.json and move the staged patient to its final folder (replacing an old one)."""
        if self.record["ct"] is None and self.record["dose"] is None:
            raise InputError(f"patient {self.patient_id}: nothing to write (no CT and no dose)")
        if self.options.pseudonymised:
            self.record["pseudonymised"] = True
        with open(self.staging_dir / RECORD_FILE, "w", encoding="utf-8") as stream:
            json.dump(self.options.redact.record(self.record), stream, indent=1)
        if self.options.pseudonymizer is not None:  # (a worker's options have none: saved before it ran)
            self.options.finish()  # the pseudonym's mapping is in the key file before its folder is in place
        replace_folder(self.staging_dir, self.final_dir)
        return self.final_dir

    # --- helpers --------------------------------------------------------------------------------
    def _structure_name(self, original_name: str) -> str:
        base = safe_name(self.options.synonyms.normalize(original_name))
        name, index = base, 2
        while name in self.record["structures"]:
            name, index = f"{base}_{index}", index + 1
        if name != base:
            self.note(f"structure '{original_name}' stored as {name}: {base} already taken")
        return name

    @staticmethod
    def _structure_file(name: str) -> str:
        return f"{STRUCTURES_DIR}/{name}.nrrd"

    def _record_structure(self, name: str, original_name: str, source: str) -> None:
        self.record["structures"][name] = {"original": original_name, "file": self._structure_file(name),
                                           "source": source}
        self.structure_count += 1

    def _write(self, image, relative: str) -> None:
        import SimpleITK as sitk

        private = self._private_keys(image)
        if private:
            image = sitk.Image(image)  # a copy: the caller's image keeps its header
            for key in private:
                image.EraseMetaData(key)
            self.note(f"{relative}: {len(private)} identifying header entries removed")
        target = self.staging_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(target), True)

    def _place(self, path: Path, relative: str, pixel_id: Optional[int], convert, kind: str) -> None:
        reader = _read_information(path)
        if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
            raise InputError(f"{path} is not a 3D scalar image")
        image = _read(path)  # the values are checked before the file is linked
        name = "dose" if kind == "dose" else "CT" if kind == CT else f"image ({kind})"
        self.check(image, kind, f"{name} ({path})")
        conforming = pixel_id is None or reader.GetPixelID() == pixel_id  # None: any pixel type
        if conforming and _linkable(path) and not self._private_keys(reader):
            self._link(path, relative)
        else:
            self._write(convert(image), relative)

    def _private_keys(self, image_or_reader) -> list:
        """Header keys that identify a person (any mode) or the patient (pseudonymised): such a file is
        rewritten without them instead of linked."""
        return identifying_keys(image_or_reader.GetMetaDataKeys(), self.options.pseudonymised)

    def _link(self, path: Path, relative: str) -> None:
        target = self.staging_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        source = path.resolve()
        mode = self.options.link
        try:
            if mode == "symlink":
                os.symlink(source, target)
                return
            if mode == "hardlink":
                os.link(source, target)
                return
        except OSError as error:
            self.note(f"{mode} of {path.name} failed ({error.strerror or error}): copied")
        shutil.copy2(source, target)


def _read_information(path: Path):
    """The header of an image file (checked: size against the memory limit, geometry)."""
    import SimpleITK as sitk

    check_image_file(path, f"image {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"unreadable file {path}: {_first_line(error)}") from None
    return reader


def _read(path: Path):
    import SimpleITK as sitk

    check_image_file(path, f"image {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"unreadable file {path}: {_first_line(error)}") from error


def _linkable(path: Path) -> bool:
    """A self-contained .nrrd file (no detached data file) can be linked as it is."""
    if path.suffix.lower() != ".nrrd":
        return False
    with open(path, "rb") as stream:
        header = stream.read(4096).split(b"\n\n", 1)[0].lower()
    return b"data file:" not in header and b"datafile:" not in header


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
