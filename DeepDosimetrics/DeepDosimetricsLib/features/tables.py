"""Per-structure result tables (radiomics, DVH): the long layout, skip reasons, the wide pivot,
atomic CSV writing, and the runner that fills a table over (patient, structure) work items.

The long table has one row per value: ``patient, structure, image, feature, value, reason``.
A structure (or a patient) that cannot be measured gives ONE row with an empty ``feature``, no
``value`` and a ``reason``:

- a *skip* (the data say so, not a failure): ``empty structure: ...``, ``structure outside the
  image: ...``, ``structure too small: ...``, ``no dose: ...``, ``no such structure: ...``;
- an *error* (``error: ...``): an unreadable file, values that fail the checks of
  ``data/checks.py`` (NaN dose, dose in cGy...) or an unexpected failure. Other items still run.

A value computed from an input the checks flag as unusual (a constant dose or CT, slightly negative
dose) keeps its value and gets ``warning: ...`` as its reason.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Sequence, Union

from DeepDosimetricsLib.data.modality import AUTO
from DeepDosimetricsLib.runtime.atomic import write_csv_atomic
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError, InputError
from DeepDosimetricsLib.runtime.pools import PoolSpec, as_pool, group_by_key, open_pool

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from DeepDosimetricsLib.data.patient import Patient

log = logging.getLogger(__name__)

LONG_COLUMNS = ["patient", "structure", "image", "feature", "value", "reason"]

#: skip categories (a row with one of these reasons is not a failure)
EMPTY_STRUCTURE = "empty structure"
OUTSIDE_IMAGE = "structure outside the image"
TOO_SMALL = "structure too small"
NO_DOSE = "no dose"
NO_SUCH_STRUCTURE = "no such structure"
#: reason prefix of a failed item (unreadable file, values that fail the checks, unexpected error)
ERROR = "error"
#: reason prefix of a value computed from an input the value checks flagged (data/checks.py)
WARNING = "warning"


class StructureSkipped(InputError):
    """A structure (or patient) that cannot be measured, for a reason the data give (see categories)."""

    def __init__(self, category: str, detail: str = "") -> None:
        self.category = category
        self.detail = detail
        super().__init__(f"{category}: {detail}" if detail else category)


def classify_input_error(error: DeepDosimetricsError) -> StructureSkipped:
    """Turn a Patient's error about one structure into a skip with its category (or an error)."""
    if isinstance(error, StructureSkipped):
        return error
    message = str(error)
    if "is empty" in message or "no voxel inside" in message:
        return StructureSkipped(EMPTY_STRUCTURE, message)
    if "does not overlap" in message:
        return StructureSkipped(OUTSIDE_IMAGE, message)
    if "has no dose" in message:
        return StructureSkipped(NO_DOSE, message)
    return StructureSkipped(ERROR, message)


def is_failure(reason: str) -> bool:
    """Whether a row's reason marks a failure (not a data skip)."""
    return isinstance(reason, str) and reason.startswith(ERROR + ":")


def value_rows(patient: str, structure: str, image: str, values: Dict[str, float]) -> List[tuple]:
    """Long rows for the values of one structure."""
    return [(patient, structure, image, name, float(value), "") for name, value in values.items()]


def reason_row(patient: str, structure: str, image: str, reason: Union[str, Exception]) -> tuple:
    """The single long row of a structure or patient that was not measured."""
    return (patient, structure, image, "", float("nan"), str(reason))


def long_table(rows: Iterable[tuple]) -> pd.DataFrame:
    """A long table from row tuples, with the standard columns and dtypes."""
    import pandas as pd

    table = pd.DataFrame(list(rows), columns=LONG_COLUMNS)
    table["value"] = table["value"].astype(float)
    return table


def count_failures(table: pd.DataFrame) -> int:
    """Number of failed rows (reason ``error: ...``)."""
    return int(table["reason"].map(is_failure).sum()) if len(table) else 0


def to_wide(table: pd.DataFrame, with_patient: bool = True) -> pd.DataFrame:
    """Features as rows, one column per ``patient/structure`` (or per structure), like Slicer's table.

    Rows without a value (skips, errors) are left out; the index column is ``feature``
    (``image:feature`` when the table mixes CT and dose).
    """
    import pandas as pd

    values = table[table["feature"].astype(str) != ""].copy()
    if values.empty:
        return pd.DataFrame(index=pd.Index([], name="feature"))
    if values["image"].nunique() > 1:
        values["feature"] = values["image"] + ":" + values["feature"]
    if with_patient:
        values["column"] = values["patient"].astype(str) + "/" + values["structure"].astype(str)
    else:
        if values.duplicated(["structure", "feature"]).any():
            raise InputError(
                "a wide table by structure needs a single patient; use patient/structure columns"
            )
        values["column"] = values["structure"].astype(str)
    feature_order = list(dict.fromkeys(values["feature"]))
    column_order = list(dict.fromkeys(values["column"]))
    wide = values.pivot(index="feature", columns="column", values="value")
    wide = wide.reindex(index=feature_order, columns=column_order)
    wide.columns.name = None
    wide.index.name = "feature"
    return wide


# ---------------------------------------------------------------------------------- the runner
@dataclass(frozen=True)
class WorkItem:
    """One unit of work: a structure of a patient (the worker loads only what it needs)."""

    patient_id: str
    folder: Optional[str]
    structure: str
    modality: str = AUTO  # the patient's modality option (a worker loads it as the caller did)


#: a worker computes the long rows of one item; ``patient`` is given in-process, else loaded from folder
Worker = Callable[..., List[tuple]]


class _PatientCache:
    """The last patient a process loaded, and images derived from it (memory stays one patient)."""

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.patient: Optional[Patient] = None
        self.derived: Dict[str, object] = {}

    def clear(self) -> None:
        """Forget the patient (free its images)."""
        self.key, self.patient, self.derived = None, None, {}

    def patient_for(self, item: WorkItem, patient: Optional[Patient] = None) -> Patient:
        from DeepDosimetricsLib.data.patient import Patient

        key = (item.patient_id, item.folder, id(patient) if patient is not None else None)
        if key != self.key:
            self.key, self.derived = key, {}
            if patient is None:
                if item.folder is None:
                    raise InputError(f"patient {item.patient_id}: no folder to load it from in a worker")
                patient = Patient.from_folder(item.folder, patient_id=item.patient_id, modality=item.modality)
            self.patient = patient
        return self.patient

    def derived_value(self, name: str, compute: Callable[[], object]) -> object:
        """A value computed once per patient (e.g. the dose image)."""
        if name not in self.derived:
            self.derived[name] = compute()
        return self.derived[name]


PATIENT_CACHE = _PatientCache()


def run_items(
    items: Sequence[WorkItem],
    worker: Worker,
    patients: Optional[Dict[str, Patient]] = None,
    jobs: Union[int, PoolSpec] = 1,
    quiet: bool = False,
    desc: str = "",
    image: str = "",
) -> List[tuple]:
    """Run ``worker`` over the items (in-process, in local processes or on a Dask cluster, see
    :mod:`DeepDosimetricsLib.runtime.pools`) and return their rows in item order. A failing item gives an
    ``error:`` row; the others go on.

    ``image`` fills the image column of reason rows. ``patients`` (id -> Patient) is used in-process;
    pool workers load patients from their folders, so a pool needs items with a folder (in-memory
    patients run in-process). ``jobs``: a number of local processes or a PoolSpec. Tasks are one
    patient each when patients outnumber the workers (no patient loaded twice), else one item each.
    """
    from DeepDosimetricsLib.runtime.progress import progress_bar

    spec = as_pool(jobs)
    results: List[Optional[List[tuple]]] = [None] * len(items)
    pooled = spec.parallel and len(items) > 1 and all(item.folder for item in items)
    if spec.parallel and not pooled and len(items) > 1:
        log.info("%s: in-memory patients run in this process (%s ignored)", desc, spec.describe())
    if not pooled:
        bar = progress_bar(items, total=len(items), desc=desc, quiet=quiet)
        for index, item in enumerate(bar):
            patient = (patients or {}).get(item.patient_id)
            results[index] = _run_one(worker, item, patient, image)
        PATIENT_CACHE.clear()
        return [row for rows in results for row in rows]

    with open_pool(spec, tasks=len(items)) as pool:
        tasks = group_by_key([item.patient_id for item in items], pool.workers)
        # the pool submits everything at once (forked workers start before the bar's thread)
        finished = pool.map(_run_task, [(worker, [items[i] for i in task], image) for task in tasks])
        bar = progress_bar(None, total=len(items), desc=desc, quiet=quiet)
        for number, task_rows in finished:
            for index, rows in zip(tasks[number], task_rows):
                results[index] = rows
            bar.update(len(tasks[number]))
        bar.close()
    PATIENT_CACHE.clear()  # tasks run here after a broken pool keep a patient
    return [row for rows in results for row in rows]


def _run_task(worker: Worker, task: List[WorkItem], image: str) -> List[List[tuple]]:
    """A pool task: the rows of each of its items."""
    return [_run_one(worker, item, None, image) for item in task]


def with_warnings(rows: List[tuple], warnings: Optional[Dict[str, List[str]]]) -> List[tuple]:
    """Value rows of an image the value checks flagged (e.g. a constant dose) get ``warning: ...`` as
    their reason: the values are computed, and the table says what was unusual about their input."""
    if not warnings or not any(warnings.values()):
        return rows
    flagged = []
    for row in rows:
        texts = warnings.get(row[2]) if len(row) == len(LONG_COLUMNS) and row[3] != "" and not row[5] else None
        flagged.append(row[:5] + (f"{WARNING}: " + "; ".join(texts),) if texts else row)
    return flagged


def _run_one(worker: Worker, item: WorkItem, patient: Optional[Patient], image: str) -> List[tuple]:
    """One item, errors turned into reason rows (skips) or ``error:`` rows (failures)."""
    try:
        loaded = PATIENT_CACHE.patient_for(item, patient)
        return with_warnings(worker(item, loaded), getattr(loaded, "warnings", None))
    except StructureSkipped as skip:
        return [reason_row(item.patient_id, item.structure, image, skip)]
    except DeepDosimetricsError as error:
        return [reason_row(item.patient_id, item.structure, image, classify_input_error(error))]
    except Exception as error:  # keep the cohort going; the row says what broke
        log.debug("patient %s, structure %s failed", item.patient_id, item.structure, exc_info=True)
        return [
            reason_row(item.patient_id, item.structure, image, f"{ERROR}: {type(error).__name__}: {error}")
        ]


# ---------------------------------------------------------------------------------- work items
def work_items(
    patients: Sequence[Patient], structures: Optional[Sequence[str]], need_dose: bool, image: str
) -> tuple[List[WorkItem], List[tuple]]:
    """(patient, structure) work items in patient order, and reason rows for patients without dose and
    requested structures a patient lacks. A requested structure no patient has is an InputError."""
    wanted = [s.strip() for s in structures if s.strip()] if structures else None
    if wanted:
        found = {name.lower() for p in patients for name in p.structure_names}
        absent = [s for s in wanted if s.lower() not in found]
        if absent:
            known = sorted({name for p in patients for name in p.structure_names}, key=str.lower)
            raise InputError(
                f"no patient has a structure named {', '.join(absent)}; structures found: {', '.join(known)}"
            )
    items: List[WorkItem] = []
    rows: List[tuple] = []
    for patient in patients:
        if need_dose and not patient.has_dose:
            rows.append(reason_row(patient.id, "", image, f"{NO_DOSE}: patient {patient.id} has no dose"))
            continue
        folder = str(patient.folder) if patient.folder is not None else None
        if wanted is None:
            names = patient.structure_names
        else:
            names = []
            by_lower = {n.lower(): n for n in patient.structure_names}
            for name in wanted:
                if name.lower() in by_lower:
                    names.append(by_lower[name.lower()])
                else:
                    rows.append(
                        reason_row(
                            patient.id,
                            name,
                            image,
                            f"{NO_SUCH_STRUCTURE}: patient {patient.id} has no {name}",
                        )
                    )
        option = getattr(patient, "modality_option", AUTO)
        items += [WorkItem(patient.id, folder, name, option) for name in names]
    return items, rows


def with_unreadable(table: pd.DataFrame, cohort, image: str) -> pd.DataFrame:
    """The table with one ``error:`` row per entry of the cohort folder that could not be read (a
    symbolic-link loop, a broken link...): reported, never skipped in silence, and the command exits 1."""
    import pandas as pd

    rows = [reason_row(name, "", image, f"{ERROR}: {why}")
            for name, why in (getattr(cohort, "unreadable", None) or {}).items()]
    if not rows:
        return table
    return pd.concat([table, long_table(rows)], ignore_index=True) if len(table) else long_table(rows)


def in_patient_order(rows: List[tuple], patient_ids: List[str]) -> List[tuple]:
    """Rows grouped by patient in cohort order (stable within a patient)."""
    order = {pid: index for index, pid in enumerate(patient_ids)}
    return sorted(rows, key=lambda row: order.get(row[0], len(order)))


# ---------------------------------------------------------------------------------- CLI output
def parse_structure_list(text: Optional[str]) -> Optional[List[str]]:
    """``"PTV70, Brainstem"`` -> ``["PTV70", "Brainstem"]``; None or empty -> None (all structures)."""
    if not text:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    return names or None


def write_result(table: pd.DataFrame, out: Union[str, Path], wide: bool = False) -> int:
    """Write the long (or wide) table atomically, print a summary with the skips, and return the exit
    code: 0 when every item ran or was skipped for a reason the data give, 1 when some failed."""
    if wide:
        write_csv_atomic(to_wide(table), out, index=True)
    else:
        write_csv_atomic(table, out)
    measured = table[table["feature"].astype(str) != ""]
    pairs = measured[["patient", "structure"]].drop_duplicates()
    print(
        f"{out}: {len(measured)} values, {pairs['patient'].nunique()} patients, "
        f"{len(pairs)} structures measured",
        file=sys.stderr,
    )
    skipped = table[table["feature"].astype(str) == ""]
    failures = count_failures(table)
    if len(skipped):
        print(f"{len(skipped) - failures} skipped, {failures} failed:", file=sys.stderr)
        for row in skipped.itertuples(index=False):
            where = f"{row.patient}/{row.structure}" if row.structure else str(row.patient)
            print(f"  {where}: {row.reason}", file=sys.stderr)
    return 1 if failures else 0
