"""Helpers shared by the benchmark scripts (run them as `python bench/<script>.py`)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Union


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_script(script: Union[str, Path], *arguments: str) -> dict:
    """Run a benchmark script in a fresh Python process; its last stdout line is JSON."""
    command = [sys.executable, str(Path(script).resolve()), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"child failed: {' '.join(arguments)}")
    return json.loads(result.stdout.strip().splitlines()[-1])
