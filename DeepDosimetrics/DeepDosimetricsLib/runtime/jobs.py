"""The process runner: a ``deepdosimetrics`` command in a background process, its output read by a thread.

Used by the Slicer module (polled from a ``QTimer``, with Cancel) and from the Python console (blocking),
but it needs neither Slicer nor Qt. Lines ``@progress {json}`` (:mod:`runtime.progress`) update
:attr:`CliJob.progress`; every other line goes to :attr:`CliJob.log_lines`. :meth:`CliJob.cancel` ends the
process and every process it started, as deep-learning extensions must (killing the launcher alone leaves
the workers running).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

log = logging.getLogger(__name__)

#: the folder that holds ``DeepDosimetricsLib`` (put on the job's PYTHONPATH)
LIBRARY_PARENT = Path(__file__).resolve().parents[2]
#: the exit code of a command that did its work but left some patients or structures out, named in its last
#: lines (the README's exit-code table; 2 is bad input, anything else a failure)
PARTIAL_EXIT = 1

_URL = re.compile(r"https?://\S+")


def python_for_jobs() -> str:
    """The Python that runs library jobs: Slicer's ``PythonSlicer`` inside the application, else this one."""
    slicer = sys.modules.get("slicer")
    if getattr(slicer, "app", None) is not None:
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def first_url(lines: Iterable[str], prefix: str = "review station:") -> Optional[str]:
    """The URL a server printed: from a line starting with ``prefix`` first, else from any line with one."""
    lines = list(lines)
    for line in lines:
        if line.strip().startswith(prefix):
            match = _URL.search(line)
            if match:
                return match.group(0).rstrip(".,;")
    for line in lines:
        match = _URL.search(line)
        if match:
            return match.group(0).rstrip(".,;")
    return None


def cli_arguments(command: str, **options) -> List[str]:
    """The arguments of ``deepdosimetrics <command>`` from keyword options, in the order given.

    ``name=value`` becomes ``--name value`` (underscores as dashes); ``True`` a bare ``--name``; ``None`` and
    ``False`` leave the option out; a list or tuple gives one option with several values (``nargs="+"``),
    left out when empty. Example: ``cli_arguments("train", cohort="C", steps=10)`` ->
    ``["train", "--cohort", "C", "--steps", "10"]``.
    """
    arguments = [command]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            arguments.append(flag)
        elif isinstance(value, (list, tuple)):
            arguments += [flag, *map(str, value)] if value else []
        elif value is not None and value is not False:
            arguments += [flag, str(value)]
    return arguments


class CliJob:
    """A ``deepdosimetrics`` command in a background process.

    Args:
        arguments: the command line after ``deepdosimetrics`` (e.g. ``["encode", "--model", ...]``).
        on_line: called with each log line (from :meth:`poll`, i.e. on the caller's thread).
        on_progress: called with each ``@progress`` record.
        python: the interpreter (default :func:`python_for_jobs`).
        env: the environment (default this process's); the library folder is put on PYTHONPATH.
        command: run this command instead of ``python -m DeepDosimetricsLib.cli arguments`` (tests).
    """

    def __init__(
        self,
        arguments: Sequence[str],
        on_line: Optional[Callable[[str], None]] = None,
        on_progress: Optional[Callable[[dict], None]] = None,
        python: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        command: Optional[Sequence[str]] = None,
    ):
        self.arguments = [str(a) for a in arguments]
        if command is None:  # `deepdosimetrics <arguments>` in a separate Python
            command = [python or python_for_jobs(), "-u", "-m", "DeepDosimetricsLib.cli", *self.arguments]
        self.command = [str(c) for c in command]
        self.on_line = on_line
        self.on_progress = on_progress
        self.progress: Optional[dict] = None
        self.log_lines: List[str] = []
        self.returncode: Optional[int] = None
        self.cancelled = False
        self.patientId: Optional[str] = None  # set by the module's encodeNodes: the patient encoded
        self.workFolder: Optional[Path] = None  # set by the module's encodeNodes: its temporary folder
        self._env = env
        self._lines: queue.Queue = queue.Queue()
        self._process: Optional[subprocess.Popen] = None
        self._reader: Optional[threading.Thread] = None

    @property
    def pid(self) -> Optional[int]:
        """The process id once started."""
        return None if self._process is None else self._process.pid

    def start(self) -> CliJob:
        """Start the process (the library found beside this package) and the reader thread."""
        env = dict(os.environ if self._env is None else self._env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(LIBRARY_PARENT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        log.info("running: %s", " ".join(self.command))
        self._process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=(os.name == "posix"),
        )
        self._reader = threading.Thread(target=self._read, name="DeepDosimetricsJobReader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        # newline="": a lone carriage return (a tqdm redraw) ends a piece without becoming a newline
        stream = io.TextIOWrapper(self._process.stdout, encoding="utf-8", errors="replace", newline="")
        for piece in stream:
            if piece.endswith("\r"):
                continue  # an intermediate progress-bar state, redrawn by the next piece
            line = piece.rstrip("\r\n").rstrip()
            if line:
                self._lines.put(line)
        stream.close()

    @property
    def running(self) -> bool:
        """True until the process has ended and every line has been handled."""
        if self._process is None:
            return False
        return self._process.poll() is None or (self._reader is not None and self._reader.is_alive()) or (
            not self._lines.empty()
        )

    def poll(self) -> List[str]:
        """Handle the lines read so far; returns them. Sets :attr:`returncode` once the job has ended."""
        from DeepDosimetricsLib.runtime.progress import parse_progress

        handled = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            handled.append(line)
            record = parse_progress(line)
            if record is not None:
                self.progress = record
                if self.on_progress:
                    self.on_progress(record)
            else:
                self.log_lines.append(line)
                if self.on_line:
                    self.on_line(line)
        if self._process is not None and not self.running and self.returncode is None:
            self.returncode = self._process.wait()
        return handled

    def wait(self, timeout: Optional[float] = None, interval: float = 0.1) -> int:
        """Block until the job ends (handling its lines); returns the exit code (-1 if it never started)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                break
            time.sleep(interval)
        self.poll()
        return self.returncode if self.returncode is not None else -1

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float = 60.0,
                      interval: float = 0.05) -> Optional[str]:
        """Poll until a log line satisfies ``predicate`` (returned), the job ends or ``timeout`` (None)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            self.poll()
            for line in self.log_lines[seen:]:
                if predicate(line):
                    return line
            seen = len(self.log_lines)
            if not self.running:
                return None
            time.sleep(interval)
        return None

    def cancel(self, grace_seconds: float = 3.0) -> None:
        """End the process and every process it started (terminate, then kill what remains)."""
        if self._process is None or self._process.poll() is not None:
            return  # nothing to end: needs no psutil
        import psutil

        self.cancelled = True
        try:
            descendants = psutil.Process(self._process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        for process in descendants:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        self._process.terminate()
        try:  # the direct child is reaped by Popen, so that its exit status is kept
            self._process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        _, alive = psutil.wait_procs(descendants, timeout=grace_seconds)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=grace_seconds)
        log.info("job cancelled: %s", " ".join(self.arguments))

    @property
    def finished(self) -> bool:
        """The job ended and did its work: exit code 0, or PARTIAL_EXIT (some patients left out, named)."""
        return not self.cancelled and self.returncode in (0, PARTIAL_EXIT)

    def left_out_message(self, lines: int = 8) -> str:
        """What a job that ended with PARTIAL_EXIT left out: its last lines from the last ``left out ...``
        line (train, encode, cache), else its last line; at most ``lines`` lines."""
        start = max((i for i, line in enumerate(self.log_lines) if line.startswith("left out ")),
                    default=len(self.log_lines) - 1)
        kept = self.log_lines[max(start, 0):]
        return "\n".join(kept[:lines] + ([f"... ({len(kept) - lines} more)"] if len(kept) > lines else []))

    def error_message(self) -> str:
        """The job's ``error: ...`` line (or its last line) for a failed job."""
        for line in reversed(self.log_lines):
            if line.startswith("error:"):
                return line[len("error:"):].strip()
        return self.log_lines[-1] if self.log_lines else f"exit code {self.returncode}"


def start_server(arguments: Sequence[str], timeout: float = 120.0,
                 on_line: Optional[Callable[[str], None]] = None) -> tuple[CliJob, str]:
    """Start a ``deepdosimetrics`` server command (e.g. ``review``) and wait for the URL it prints.

    Returns (the running job, the URL): the server runs until ``job.cancel()``. Raises
    DeepDosimetricsError with the job's last error when it ends or prints no address within ``timeout``.
    """
    from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError

    job = CliJob(arguments, on_line=on_line).start()
    line = job.wait_for_line(lambda text: first_url([text]) is not None, timeout=timeout)
    if line is None:
        message = job.error_message() if not job.running else f"no address printed within {timeout:g} s"
        job.cancel()
        raise DeepDosimetricsError(f"deepdosimetrics {arguments[0]} did not start: {message}")
    return job, first_url([line])
