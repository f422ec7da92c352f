"""The import report: one row per patient (ok or skipped, with the reason), written as import_report.csv."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional, Union

from DeepDosimetricsLib.runtime.atomic import write_text_atomic

#: file name of the report in the cohort folder
REPORT_FILE = "import_report.csv"
#: fields of PatientImportStatus that are not columns of the report (they are in its reason)
NOT_COLUMNS = ("warnings",)
OK = "ok"
SKIPPED = "skipped"


@dataclass
class PatientImportStatus:
    """The outcome of importing one patient."""

    patient: str
    status: str  # OK or SKIPPED
    reason: str = ""  # why skipped, or notes for an ok patient ("already imported", "no dose")
    source: str = ""  # where it came from (folder, files)
    structures: int = 0
    has_dose: bool = False
    importer: str = ""  # folder, openkbp or dicom
    #: what the import of an ok patient worked around (also in ``reason``, as ``warning: ...``; not a
    #: column of import_report.csv), printed by the summary
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass
class ImportReport:
    """Every patient's outcome of one import run."""

    importer: str
    entries: list[PatientImportStatus] = field(default_factory=list)
    #: applied to every text of an entry (identifying values removed; see data/pseudonym.py)
    redact: Optional[Callable[[str], str]] = field(default=None, repr=False, compare=False)

    def add(self, entry: PatientImportStatus) -> PatientImportStatus:
        entry.importer = entry.importer or self.importer
        if self.redact is not None:
            entry.patient, entry.reason, entry.source = (self.redact(entry.patient), self.redact(entry.reason),
                                                         self.redact(entry.source))
            entry.warnings = [self.redact(text) for text in entry.warnings]
        self.entries.append(entry)
        return entry

    def ok(self, patient: str, reason: str = "", **details) -> PatientImportStatus:
        return self.add(PatientImportStatus(patient, OK, reason, **details))

    def skipped(self, patient: str, reason: str, **details) -> PatientImportStatus:
        return self.add(PatientImportStatus(patient, SKIPPED, reason, **details))

    @property
    def failed(self) -> list[PatientImportStatus]:
        return [entry for entry in self.entries if not entry.ok]

    @property
    def exit_code(self) -> int:
        """0 when every patient was imported, 1 when some were skipped (or none was found)."""
        return 1 if self.failed or not self.entries else 0

    def to_csv_text(self, earlier_rows: Optional[list[dict]] = None) -> str:
        """The report as CSV; ``earlier_rows`` of other patients (from a previous run) come first."""
        buffer = io.StringIO()
        names = [f.name for f in fields(PatientImportStatus) if f.name not in NOT_COLUMNS]
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        mine = {entry.patient for entry in self.entries}
        for row in earlier_rows or []:
            if row.get("patient") not in mine:
                writer.writerow({name: row.get(name, "") for name in names})
        for entry in self.entries:
            writer.writerow(asdict(entry))
        return buffer.getvalue()

    def write(self, cohort_dir: Union[str, os.PathLike]) -> Path:
        """Write ``import_report.csv`` into the cohort folder atomically; returns its path.

        Rows of patients this run did not see (imported earlier, e.g. by another importer) are kept.
        """
        path = Path(cohort_dir) / REPORT_FILE
        earlier_rows = read_report(path) if path.is_file() else []
        return write_text_atomic(path, self.to_csv_text(earlier_rows))

    def summary(self) -> str:
        """A short human summary: counts, one line per skipped patient, then one per warning."""
        ok = len(self.entries) - len(self.failed)
        warned = [entry for entry in self.entries if entry.ok and entry.warnings]
        lines = [f"{self.importer} import: {ok} patient(s) ok, {len(self.failed)} skipped"
                 + (f", {len(warned)} imported with warnings" if warned else "")]
        if not self.entries:
            lines.append("  no patient found")
        lines += [f"  skipped {entry.patient}: {entry.reason}" for entry in self.failed]
        lines += [f"  warning {entry.patient}: {text}" for entry in warned for text in entry.warnings]
        return "\n".join(lines)


def read_report(path: Union[str, os.PathLike]) -> list[dict]:
    """The rows of an import_report.csv (empty when unreadable)."""
    try:
        with open(path, encoding="utf-8", newline="") as stream:
            return list(csv.DictReader(stream))
    except (OSError, csv.Error):
        return []
