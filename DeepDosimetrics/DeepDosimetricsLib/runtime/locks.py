"""Advisory file locks, so that two jobs writing the same folder do not corrupt each other.

A lock is ``fcntl.flock`` on a small lock file; the holder writes its pid, host, command and start time
into it, so a refused job can say who holds the folder. The kernel releases the lock when the holder
exits, however it exits (SIGKILL included): there are no stale locks to clean up. Lock files are never
deleted (deleting one while another process waits on it would let two holders in).

Two policies, by what the folder holds:

- **refuse** (:func:`job_lock`, ``timeout=0``): an output folder (``encode --out``, ``train --out``)
  belongs to one job; a second job stops at once with :class:`FolderLocked`, an InputError naming the
  folder and the holder (the CLI prints it and exits 2);
- **wait** (:func:`patient_lock`): cache entries are shared by design (``train`` and several ``encode``
  runs use one cache). A job that finds a patient being built waits for it and then reuses it, so two
  builds of one cache finish with one correct copy of each patient and no duplicated work.

On a network file system, ``flock`` works across machines on NFSv4 (Linux emulates it with POSIX byte-range
locks); on file systems without locking (some FUSE mounts) the lock is only per machine. Where ``fcntl``
does not exist (Windows) locks are no-ops, logged once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Union

from DeepDosimetricsLib.runtime.atomic import ensure_folder
from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: the lock file of a folder held by one job
JOB_LOCK = ".deepdosimetrics.lock"
#: the folder (inside a cache) holding one lock file per patient
LOCK_FOLDER = ".locks"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class FolderLocked(InputError):
    """Another job holds the lock of a folder."""

    def __init__(self, folder: Path, holder: dict, what: str) -> None:
        self.folder = folder
        self.holder = holder
        super().__init__(f"{folder} is in use by another job ({describe_holder(holder)}); {what}")


def describe_holder(holder: dict) -> str:
    """``"encode, pid 123 on host gpu01 since 2026-11-30 15:20:01"`` (what a lock file says)."""
    if not holder:
        return "holder unknown"
    parts = [str(holder["job"])] if holder.get("job") else []
    if holder.get("pid"):
        parts.append(f"pid {holder['pid']} on host {holder.get('host', '?')}")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    if holder.get("rank") is not None:
        parts.append(f"rank {holder['rank']}")
    return ", ".join(parts) or "holder unknown"


def read_holder(lock_file: PathLike) -> dict:
    """What the holder wrote into a lock file ({} when empty or unreadable)."""
    try:
        return json.loads(Path(lock_file).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _holder_record(job: str) -> dict:
    record = {"job": job, "pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv[:3])}
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        record["rank"] = int(os.environ.get("RANK", "0") or 0)
    return record


_WARNED = False


@contextlib.contextmanager
def file_lock(lock_file: PathLike, job: str = "", timeout: Optional[float] = None,
              what: str = "wait for it or choose another folder",
              on_wait: Optional[callable] = None) -> Iterator[Path]:
    """Hold an exclusive lock on ``lock_file`` (created) for the block.

    Args:
        lock_file: the lock file (its folder must exist).
        job: a name written for whoever is refused (``encode``, ``cache``...).
        timeout: seconds to wait; 0 refuses at once, None waits as long as it takes.
        what: the end of the refusal message (what the user can do).
        on_wait: called once with the holder's record when the lock is busy and we wait.

    Raises:
        FolderLocked: the lock stayed busy for ``timeout`` seconds.
    """
    global _WARNED
    path = Path(lock_file)
    if fcntl is None:  # pragma: no cover - Windows
        if not _WARNED:
            log.warning("file locks are not available on this platform; concurrent jobs are not detected")
            _WARNED = True
        yield path
        return
    try:
        handle = open(path, "a+")
    except OSError as error:  # a read-only folder: this job cannot write there either, nothing to protect
        log.debug("no lock on %s (%s)", path, error.strerror or error)
        yield path
        return
    try:
        if not _try_lock(handle):
            holder = read_holder(path)
            if timeout is not None and timeout <= 0:
                raise FolderLocked(path.parent, holder, what)
            if on_wait is not None:
                on_wait(holder)
            deadline = None if timeout is None else time.monotonic() + timeout
            delay = 0.05
            while not _try_lock(handle):
                if deadline is not None and time.monotonic() >= deadline:
                    raise FolderLocked(path.parent, read_holder(path), what)
                time.sleep(delay)
                delay = min(1.0, delay * 1.5)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_holder_record(job)))
        handle.flush()
        try:
            yield path
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


def _try_lock(handle) -> bool:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as error:  # a file system without locks: proceed, as without fcntl
        log.warning("cannot lock %s (%s); concurrent jobs are not detected", handle.name, error)
        return True


@contextlib.contextmanager
def job_lock(folder: PathLike, job: str, timeout: float = 0.0,
             what: str = "wait for it to finish or choose another folder") -> Iterator[Path]:
    """The lock of a folder one job owns (``<folder>/.deepdosimetrics.lock``; the folder is created).
    By default a second job is refused at once with :class:`FolderLocked`.

    Once the lock is held, the temporary files that atomic writes of a killed earlier job left in the
    folder (``.<name>.<random>.tmp``, see runtime/atomic.py) are removed: no other job can be writing them.
    """
    folder = ensure_folder(folder, "folder")
    with file_lock(folder / JOB_LOCK, job, timeout=timeout, what=what) as path:
        remove_stale_temporaries(folder)
        yield path


#: the name of an atomic write's temporary file (tempfile.mkstemp in runtime/atomic.atomic_path)
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp[^/]*$")


def remove_stale_temporaries(folder: PathLike) -> int:
    """Remove the atomic-write temporaries directly in ``folder`` (call it only while holding the folder's
    job lock); returns how many were removed."""
    removed = 0
    for path in Path(folder).glob(".*.tmp*"):
        if _TEMPORARY.match(path.name) and path.is_file() and not path.is_symlink():
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
    if removed:
        log.info("removed %d temporary file(s) an interrupted job left in %s", removed, folder)
    return removed


def patient_lock(folder: PathLike, patient_id: str, job: str = "cache",
                 timeout: Optional[float] = None) -> contextlib.AbstractContextManager:
    """The lock of one patient's entry in a shared folder (``<folder>/.locks/<patient>.lock``); by default
    a job waits for another one building the same patient (then finds it complete)."""
    locks = Path(folder) / LOCK_FOLDER
    locks.mkdir(parents=True, exist_ok=True)

    def waiting(holder: dict) -> None:
        log.info("patient %s in %s is being written by another job (%s); waiting", patient_id, folder,
                 describe_holder(holder))

    return file_lock(locks / f"{patient_id}.lock", job, timeout=timeout, on_wait=waiting,
                     what=f"patient {patient_id} is still being written")
