"""Inputs of the outcome analysis: the clinical table (endpoint + covariates) and the feature tables.

Feature tables come in three shapes, recognised by their columns:

- **long** (what ``radiomics``, ``dvh`` and ``encode`` write): ``patient, [structure], [image], feature,
  value[, reason]``. Rows without a value (reason rows: empty structure, no dose...) are left out and
  counted. Each (structure, image, feature) becomes one column named ``structure/image/feature``; a table
  without an ``image`` column (``encode``'s ``features.csv``) uses the set's name as the image
  (``Body/deep/z00_mean``).
- **wide by patient**: a ``patient`` column and one column per feature (names kept as given).
- **wide by feature** (``--wide`` output of ``radiomics``/``dvh``): a ``feature`` column and one column
  per ``patient/structure``.

Patients are matched by id (as text, surrounding spaces removed). Every patient left out (no outcome,
missing from a table) is counted with the reason in :class:`CohortCounts`, never dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from DeepDosimetricsLib.runtime.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

#: name of the reference set built from the clinical covariates
CLINICAL = "clinical"
#: the set with every table (and the clinical covariates) together
ALL = "all"
#: categorical covariates with more levels than this are left out (free text, ids)
MAX_LEVELS = 20
_SET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass
class Endpoint:
    """What is predicted: a binary ``outcome`` column, or ``time`` + ``event`` columns."""

    outcome: Optional[str] = None
    time: Optional[str] = None
    event: Optional[str] = None

    def __post_init__(self) -> None:
        if self.outcome and (self.time or self.event):
            raise InputError("give either an outcome column (binary) or --time and --event, not both")
        if not self.outcome and not (self.time and self.event):
            raise InputError("give an outcome column (binary endpoint) or both --time and --event")

    @property
    def kind(self) -> str:
        """``binary`` or ``survival``."""
        return "binary" if self.outcome else "survival"

    @property
    def columns(self) -> List[str]:
        """The clinical columns that make the endpoint."""
        return [self.outcome] if self.outcome else [self.time, self.event]

    @property
    def metric(self) -> str:
        """The discrimination metric: ``auc`` or ``c_index``."""
        return "auc" if self.kind == "binary" else "c_index"


@dataclass
class ClinicalData:
    """The clinical table read for an analysis."""

    path: str
    endpoint: Endpoint
    #: index: patient id; columns: the covariates (numeric, or categorical as text)
    covariates: pd.DataFrame
    #: the categorical covariates (one-hot encoded inside the folds)
    categorical: List[str]
    #: binary: 0/1 outcome; survival: columns time, event
    target: pd.DataFrame
    #: batch labels (site/scanner) when harmonising, else None
    batch: Optional[pd.Series]
    #: patients of the table left out, with why ({reason: [ids]})
    excluded: Dict[str, List[str]] = field(default_factory=dict)
    #: covariates left out, with why
    dropped_covariates: Dict[str, str] = field(default_factory=dict)
    #: site labels for an external validation (``--validate-on``), else None
    site: Optional[pd.Series] = None


@dataclass
class FeatureTable:
    """One named feature set: a patients x features matrix."""

    name: str
    path: str
    #: index: patient id; columns: ``structure/image/feature`` (long tables) or as given (wide)
    frame: pd.DataFrame
    #: rows without a value (reason rows) and non-numeric columns left out
    notes: List[str] = field(default_factory=list)


@dataclass
class CohortCounts:
    """Who is analysed and who was left out, and why (TRIPOD: state the cohort counts)."""

    clinical_patients: int
    analysed: List[str]
    n_events: int
    #: reason -> patient ids, e.g. "no outcome" or "missing from table dvh"
    excluded: Dict[str, List[str]]
    #: table name -> patients in the table that have no clinical row
    not_in_clinical: Dict[str, List[str]]

    def rows(self) -> List[dict]:
        """One row per count, for the report and predict.json."""
        rows = [
            {"what": "patients in the clinical table", "count": self.clinical_patients, "patients": ""},
            {"what": "patients analysed", "count": len(self.analysed), "patients": ""},
            {"what": "events among them", "count": self.n_events, "patients": ""},
        ]
        for reason, ids in self.excluded.items():
            rows.append({"what": f"left out: {reason}", "count": len(ids), "patients": _preview(ids)})
        for name, ids in self.not_in_clinical.items():
            rows.append(
                {"what": f"in table {name} but not in the clinical table", "count": len(ids),
                 "patients": _preview(ids)}
            )
        return rows


def _preview(ids: Sequence[str], limit: int = 8) -> str:
    ids = list(ids)
    text = ", ".join(ids[:limit])
    return text + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def _read_csv(path: str, what: str) -> pd.DataFrame:
    import pandas as pd

    if not Path(path).is_file():
        raise InputError(f"{what} {path}: no such file")
    try:
        table = pd.read_csv(path, dtype={"patient": str})
    except (ValueError, OSError, UnicodeDecodeError) as error:
        raise InputError(f"{what} {path}: cannot be read as CSV ({error})") from None
    table.columns = [str(c).strip() for c in table.columns]
    if table.empty:
        raise InputError(f"{what} {path}: the table has no rows")
    return table


def _patient_index(table: pd.DataFrame, path: str, what: str) -> pd.DataFrame:
    """The table indexed by its ``patient`` column (text ids); duplicated ids are an InputError."""
    if "patient" not in table.columns:
        raise InputError(f"{what} {path}: no 'patient' column (columns: {_preview(list(table.columns))})")
    ids = table["patient"].astype(str).str.strip()
    if ids.eq("").any() or table["patient"].isna().any():
        raise InputError(f"{what} {path}: {int(table['patient'].isna().sum() + ids.eq('').sum())} rows "
                         "without a patient id")
    duplicated = sorted(set(ids[ids.duplicated()]))
    if duplicated:
        raise InputError(f"{what} {path}: duplicated patient ids {_preview(duplicated)} (one row per patient)")
    table = table.drop(columns="patient")
    table.index = ids.values
    table.index.name = "patient"
    return table


def _binary(values: pd.Series, path: str, column: str) -> pd.Series:
    """A 0/1 column (missing values stay missing); anything else is an InputError listing the values."""
    import pandas as pd

    mapped = values.map(lambda v: {True: 1, False: 0}.get(v, v) if isinstance(v, bool) else v)
    numeric = pd.to_numeric(mapped, errors="coerce")
    bad = mapped[numeric.isna() & mapped.notna()]
    present = numeric.dropna()
    if len(bad) or not present.isin([0, 1]).all():
        found = sorted({str(v) for v in list(bad.unique()) + list(present.unique())})
        raise InputError(
            f"clinical table {path}: column '{column}' must be binary (0/1); found values {_preview(found)}"
        )
    return numeric


def read_clinical(
    path: str,
    endpoint: Endpoint,
    covariates: Optional[Sequence[str]] = None,
    batch: Optional[str] = None,
    site: Optional[str] = None,
) -> ClinicalData:
    """Read the clinical table: the endpoint, the covariates (default: every other column) and the batch.

    ``site``: the column whose values split development and external patients (``--validate-on``); it is
    not a default covariate (the external site's level is never seen in training). Patients without an
    endpoint value (or without a site, with ``site``) are left out and counted. Unknown columns, a non-binary outcome or
    event, non-positive times and duplicated ids raise InputError.
    """
    import pandas as pd

    table = _patient_index(_read_csv(path, "clinical table"), path, "clinical table")
    wanted = list(endpoint.columns) + list(covariates or []) + ([batch] if batch else []) + ([site] if site else [])
    unknown = [c for c in wanted if c not in table.columns]
    if unknown:
        raise InputError(
            f"clinical table {path}: no column named {', '.join(repr(c) for c in unknown)} "
            f"(columns: {', '.join(table.columns)})"
        )
    excluded: Dict[str, List[str]] = {}
    if endpoint.kind == "binary":
        target = pd.DataFrame({"outcome": _binary(table[endpoint.outcome], path, endpoint.outcome)})
    else:
        time = pd.to_numeric(table[endpoint.time], errors="coerce")
        if (time.isna() & table[endpoint.time].notna()).any():
            raise InputError(f"clinical table {path}: column '{endpoint.time}' must be numeric (a follow-up time)")
        if (time.dropna() <= 0).any():
            raise InputError(f"clinical table {path}: column '{endpoint.time}' has times <= 0; times must be positive")
        event = _binary(table[endpoint.event], path, endpoint.event)
        target = pd.DataFrame({"time": time, "event": event})
    missing = target.index[target.isna().any(axis=1)]
    if len(missing):
        excluded["no outcome in the clinical table"] = [str(i) for i in missing]
    target = target.dropna()
    target = target.astype(int) if endpoint.kind == "binary" else target.astype({"event": int})

    reserved = set(endpoint.columns)
    if covariates is None:
        names = [c for c in table.columns if c not in reserved and c != site]
    else:
        names = [c for c in covariates if c not in reserved]
    dropped: Dict[str, str] = {}
    kept: List[str] = []
    categorical: List[str] = []
    for name in names:
        column = table[name]
        numeric = pd.to_numeric(column, errors="coerce")
        if column.notna().sum() == 0:
            dropped[name] = "no value"
        elif (numeric.notna() | column.isna()).all() and column.dtype != bool:
            kept.append(name)
        else:
            levels = column.dropna().astype(str).nunique()
            if levels > MAX_LEVELS:
                dropped[name] = f"categorical with {levels} levels (more than {MAX_LEVELS})"
            else:
                kept.append(name)
                categorical.append(name)
    frame = pd.DataFrame(index=table.index)
    for name in kept:
        if name in categorical:
            frame[name] = table[name].map(lambda v: v if pd.isna(v) else str(v)).astype(object)
        else:
            frame[name] = pd.to_numeric(table[name], errors="coerce").astype(float)
    batch_series = None
    if batch:
        batch_series = table[batch].map(lambda v: v if pd.isna(v) else str(v))
        missing_batch = batch_series.index[batch_series.isna()]
        if len(missing_batch):
            excluded[f"no value in the harmonisation column '{batch}'"] = [str(i) for i in missing_batch]
    site_series = None
    if site:
        site_series = table[site].map(lambda v: v if pd.isna(v) else str(v).strip())
        missing_site = site_series.index[site_series.isna()]
        if len(missing_site):
            excluded[f"no value in the site column '{site}'"] = [str(i) for i in missing_site]
    return ClinicalData(
        path=str(path),
        endpoint=endpoint,
        covariates=frame,
        categorical=categorical,
        target=target,
        batch=batch_series,
        excluded=excluded,
        dropped_covariates=dropped,
        site=site_series,
    )


def parse_feature_spec(spec: str) -> tuple:
    """``NAME=TABLE.csv`` -> (name, path); the name must be a plain word (it becomes a set name)."""
    if "=" not in spec:
        raise InputError(f"--features takes NAME=TABLE.csv, got {spec!r}")
    name, path = spec.split("=", 1)
    name = name.strip()
    if not _SET_NAME.match(name) or name in (CLINICAL, ALL):
        raise InputError(
            f"feature set name {name!r}: use a word of letters, digits, '_' or '-' other than "
            f"'{CLINICAL}' and '{ALL}'"
        )
    return name, path.strip()


def read_feature_table(
    path: str,
    name: str,
    structures: Optional[Sequence[str]] = None,
    select: Optional[str] = None,
) -> FeatureTable:
    """Read a long or wide feature table into a patients x features matrix named ``name``.

    ``structures`` keeps the columns of those structures (case-insensitive, or by their canonical synonym:
    ``LeftParotid`` keeps ``Parotid_L``; long tables and wide-by-feature tables); ``select`` is a regular expression searched in the column names.
    """
    import pandas as pd

    what = f"feature table {name}"
    table = _read_csv(path, what)
    notes: List[str] = []
    columns = set(table.columns)
    if {"patient", "feature", "value"} <= columns:
        frame = _from_long(table, path, name, what, notes)
    elif "patient" in columns:
        frame = _patient_index(table, path, what)
    elif "feature" in columns:
        long = table.melt(id_vars="feature", var_name="column", value_name="value")
        parts = long["column"].astype(str).str.split("/", n=1, expand=True)
        if parts.shape[1] < 2 or parts[1].isna().any():
            raise InputError(f"{what} {path}: a wide table by feature needs columns named patient/structure")
        long["patient"], long["structure"] = parts[0], parts[1]
        frame = _from_long(long.drop(columns="column"), path, name, what, notes)
    else:
        raise InputError(
            f"{what} {path}: not a feature table: expected a long table (patient, structure, feature, value), "
            f"a wide table with a 'patient' column or a wide table with a 'feature' column; "
            f"columns: {_preview(list(table.columns))}"
        )
    non_numeric = []
    for column in list(frame.columns):
        values = pd.to_numeric(frame[column], errors="coerce")
        if (values.isna() & frame[column].notna()).any():
            non_numeric.append(column)
            frame = frame.drop(columns=column)
        else:
            frame[column] = values.astype(float)
    if non_numeric:
        notes.append(f"{len(non_numeric)} non-numeric column(s) left out: {_preview(non_numeric)}")
    if structures:
        from DeepDosimetricsLib.data.synonyms import normalize_name

        wanted = {s.strip().lower() for s in structures if s.strip()}
        # a structure matches by its name or by its canonical synonym (LeftParotid = Parotid_L: dvh tables
        # keep the patients' names, encode's the cache's canonical ones)
        canonical = {normalize_name(s.strip()).lower() for s in structures if s.strip()}
        matches = {}
        for column in frame.columns:
            structure = str(column).split("/", 1)[0]
            if structure not in matches:
                matches[structure] = structure.lower() in wanted or normalize_name(structure).lower() in canonical
        keep = [c for c in frame.columns if matches[str(c).split("/", 1)[0]]]
        if not keep:
            raise InputError(f"{what} {path}: no column of the structures {', '.join(sorted(wanted))}")
        frame = frame[keep]
    if select:
        try:
            pattern = re.compile(select)
        except re.error as error:
            raise InputError(f"--select {select!r} is not a regular expression ({error})") from None
        keep = [c for c in frame.columns if pattern.search(str(c))]
        if not keep:
            raise InputError(f"{what} {path}: no column matches --select {select!r}")
        frame = frame[keep]
    if frame.shape[1] == 0:
        raise InputError(f"{what} {path}: no feature column")
    frame.index = frame.index.astype(str)
    frame.index.name = "patient"
    return FeatureTable(name=name, path=str(path), frame=frame, notes=notes)


def _from_long(table: pd.DataFrame, path: str, name: str, what: str, notes: List[str]) -> pd.DataFrame:

    table = table.copy()
    table["patient"] = table["patient"].astype(str).str.strip()
    structure = table["structure"].fillna("").astype(str) if "structure" in table.columns else ""
    image = table["image"].fillna("").astype(str) if "image" in table.columns else name
    table["column"] = structure + "/" + image + "/" + table["feature"].fillna("").astype(str)
    has_value = table["feature"].notna() & (table["feature"].astype(str) != "") & table["value"].notna()
    if (~has_value).any():
        reasons = table.loc[~has_value]
        notes.append(
            f"{len(reasons)} row(s) without a value left out (reason rows"
            + (f", e.g. {reasons['reason'].dropna().astype(str).iloc[0]}" if "reason" in reasons
               and reasons["reason"].notna().any() else "")
            + ")"
        )
    table = table[has_value]
    if table.empty:
        raise InputError(f"{what} {path}: no row with a value")
    duplicated = table.duplicated(["patient", "column"])
    if duplicated.any():
        first = table[duplicated].iloc[0]
        raise InputError(
            f"{what} {path}: {int(duplicated.sum())} duplicated rows for the same patient and feature "
            f"(e.g. patient {first['patient']}, {first['column']}); one value per patient and feature"
        )
    order = list(dict.fromkeys(table["column"]))
    wide = table.pivot(index="patient", columns="column", values="value")
    wide = wide.reindex(columns=order)
    wide.columns.name = None
    return wide.astype(object)


def match_patients(clinical: ClinicalData, tables: Sequence[FeatureTable]) -> CohortCounts:
    """The patients analysed: those with an endpoint (and batch) that every table has.

    All sets are compared on the same patients (the comparison is paired). A table sharing no patient with
    the clinical table is an InputError naming both.
    """
    ids = list(clinical.target.index)
    excluded = {reason: list(v) for reason, v in clinical.excluded.items()}
    if clinical.batch is not None:
        ids = [i for i in ids if not _is_missing(clinical.batch.get(i))]
    if clinical.site is not None:
        ids = [i for i in ids if not _is_missing(clinical.site.get(i))]
    not_in_clinical: Dict[str, List[str]] = {}
    known = set(clinical.covariates.index)
    for table in tables:
        present = set(table.frame.index)
        common = [i for i in ids if i in present]
        if not common:
            raise InputError(
                f"feature table {table.name} {table.path}: no patient in common with the clinical table "
                f"{clinical.path} (table: {_preview(sorted(present), 4)}; clinical: {_preview(ids, 4)})"
            )
        missing = [i for i in ids if i not in present]
        if missing:
            excluded[f"missing from table {table.name}"] = missing
        ids = common
        extra = sorted(present - known)
        if extra:
            not_in_clinical[table.name] = extra
    n_events = int(clinical.target.loc[ids].iloc[:, -1].sum()) if ids else 0
    return CohortCounts(
        clinical_patients=len(clinical.covariates),
        analysed=ids,
        n_events=n_events,
        excluded=excluded,
        not_in_clinical=not_in_clinical,
    )


def _is_missing(value) -> bool:
    import pandas as pd

    return value is None or (not isinstance(value, str) and pd.isna(value))


__all__ = [
    "ALL",
    "CLINICAL",
    "ClinicalData",
    "CohortCounts",
    "Endpoint",
    "FeatureTable",
    "match_patients",
    "parse_feature_spec",
    "read_clinical",
    "read_feature_table",
]
