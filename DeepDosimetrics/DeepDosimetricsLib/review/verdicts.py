"""Verdicts of the review: ``ENC_DIR/review.csv`` (``patient,verdict,comment,reviewer,time``).

The only file the review station writes. Each verdict rewrites the whole table atomically (a crash never
leaves half a file); the table is read back at start, so verdicts survive restarts. The latest verdict of a
patient by a reviewer replaces the earlier one. Comments are plain text: control characters are dropped,
the length is bounded, and a cell that a spreadsheet would run as a formula is quoted.
"""

from __future__ import annotations

import csv
import io
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Union

from DeepDosimetricsLib.runtime.atomic import write_text_atomic
from DeepDosimetricsLib.runtime.errors import InputError

FILE_NAME = "review.csv"
COLUMNS = ("patient", "verdict", "comment", "reviewer", "time")
VERDICTS = ("acceptable", "not acceptable")
MAX_COMMENT = 2000
MAX_REVIEWER = 80


def clean_text(text: object, limit: int) -> str:
    """One line of printable text, at most ``limit`` characters; a leading ``= + - @`` is quoted with ``'``
    (so a spreadsheet opening review.csv shows it instead of evaluating it)."""
    value = "" if text is None else str(text)
    value = "".join(ch if ch.isprintable() else " " for ch in value).strip()[:limit]
    if value[:1] in ("=", "+", "-", "@"):
        value = "'" + value
    return value


class VerdictStore:
    """Reads and writes ``review.csv`` in an encoding folder; thread-safe within one server."""

    def __init__(self, encoding_dir: Union[str, Path], check_id: Callable[[object], str]):
        self.path = Path(encoding_dir) / FILE_NAME
        self._check_id = check_id
        self._lock = threading.Lock()
        self._rows: List[Dict[str, str]] = self._read()

    def _read(self) -> List[Dict[str, str]]:
        if not self.path.is_file():
            return []
        try:
            with open(self.path, newline="", encoding="utf-8") as stream:
                reader = csv.DictReader(stream)
                if reader.fieldnames is None or not set(COLUMNS) <= set(reader.fieldnames):
                    raise InputError(f"{self.path} is not a review table (columns {', '.join(COLUMNS)} expected)")
                return [{c: row.get(c) or "" for c in COLUMNS} for row in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise InputError(f"{self.path} cannot be read ({error})") from None

    @property
    def rows(self) -> List[Dict[str, str]]:
        with self._lock:
            return [dict(r) for r in self._rows]

    def latest(self) -> Dict[str, Dict[str, str]]:
        """patient -> its latest verdict row."""
        latest: Dict[str, Dict[str, str]] = {}
        for row in self.rows:
            latest[row["patient"]] = row
        return latest

    def record(self, patient: object, verdict: str, comment: object = "", reviewer: object = "") -> Dict[str, str]:
        """Add (or replace this reviewer's) verdict on a catalog patient and rewrite review.csv atomically."""
        pid = self._check_id(patient)
        if verdict not in VERDICTS:
            raise InputError(f"verdict must be one of {', '.join(VERDICTS)}")
        row = {
            "patient": pid,
            "verdict": verdict,
            "comment": clean_text(comment, MAX_COMMENT),
            "reviewer": clean_text(reviewer, MAX_REVIEWER),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        with self._lock:
            rows = [r for r in self._rows if not (r["patient"] == pid and r["reviewer"] == row["reviewer"])]
            rows.append(row)
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            write_text_atomic(self.path, buffer.getvalue())
            self._rows = rows
        return dict(row)
