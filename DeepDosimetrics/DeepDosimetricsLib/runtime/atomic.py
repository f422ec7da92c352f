"""Atomic file writes: write beside the target under a temporary name, then rename over it.

An interrupted job or a full disk never leaves a half-written file under the final name, and the old file
survives a failed write. One implementation for every output of the library (tables, JSON, models, images).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional, Union

PathLike = Union[str, Path]


def ensure_folder(folder: PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` (and its parents) if needed; InputError naming it (as ``what``) when that fails."""
    from DeepDosimetricsLib.runtime.errors import InputError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the {what} {folder}: {error.strerror or error}") from None
    return folder


def _folder_of(path: Path) -> Path:
    return ensure_folder(path.parent if str(path.parent) else Path("."))


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask (read once: reading it means setting it, which is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "", mode: Optional[int] = None) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (by any library); renamed over ``path`` on success.

    Args:
        path: the final file.
        suffix: an extension some writers need on the temporary name (e.g. ``.nrrd`` for SimpleITK).
        mode: the file's permission bits (e.g. ``0o600`` for a secret); default what the umask gives.
    """
    path = Path(path)
    folder = _folder_of(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(handle)
    os.chmod(temporary, mode if mode is not None else 0o666 & ~_umask())  # mkstemp makes it 0600
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_bytes_atomic(path: PathLike, write: Callable[[BinaryIO], Any], sync: bool = True,
                       mode: Optional[int] = None) -> Path:
    """Call ``write(handle)`` on a temporary binary file, fsync it, then rename it over ``path``."""
    path = Path(path)
    with atomic_path(path, mode=mode) as temporary:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
    return path


def write_text_atomic(path: PathLike, text: str, sync: bool = False, mode: Optional[int] = None) -> Path:
    """Write UTF-8 text atomically (``sync``: fsync before the rename; ``mode``: see :func:`atomic_path`)."""
    return write_bytes_atomic(path, lambda handle: handle.write(text.encode("utf-8")), sync=sync, mode=mode)


def json_default(value: Any) -> Any:
    """JSON for numpy scalars and arrays, and paths."""
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path: PathLike, data: Any) -> Path:
    """Write JSON (indented, numpy-aware) atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=json_default))


def write_csv_atomic(table, path: PathLike, index: bool = False) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    path = Path(path)
    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as stream:
            table.to_csv(stream, index=index)
    return path


def torch_save_atomic(obj: Any, path: PathLike) -> Path:
    """``torch.save`` atomically (a full disk never damages an existing file)."""
    import torch

    return write_bytes_atomic(path, lambda handle: torch.save(obj, handle))


def replace_folder(staging: PathLike, final: PathLike) -> None:
    """Move a completely written ``staging`` folder to ``final``, replacing an older one (kept until then)."""
    staging, final = Path(staging), Path(final)
    old = None
    if final.exists() or final.is_symlink():  # a (dangling) link is replaced too
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
