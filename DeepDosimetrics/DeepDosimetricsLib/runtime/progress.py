"""Progress reporting: a tqdm bar for people, JSON lines for the Slicer module and scripts.

A machine-readable progress line is ``@progress {"task": ..., "done": n, "total": m, ...}`` on stdout.
The Slicer module parses these lines from the background process.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Optional

PROGRESS_PREFIX = "@progress "


def emit_progress(task: str, done: int, total: Optional[int] = None, **fields: Any) -> None:
    """Print one machine-readable progress line (flushed at once)."""
    record = {"task": task, "done": done, "total": total, **fields}
    sys.stdout.write(PROGRESS_PREFIX + json.dumps(record, default=float) + "\n")
    sys.stdout.flush()


def parse_progress(line: str) -> Optional[dict]:
    """The record of a progress line, or None for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        return json.loads(line[len(PROGRESS_PREFIX):])
    except json.JSONDecodeError:
        return None


def progress_bar(iterable: Iterable, total: Optional[int] = None, desc: str = "", quiet: bool = False):
    """A tqdm progress bar on stderr (plain iteration when quiet)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=quiet, file=sys.stderr, dynamic_ncols=True)
