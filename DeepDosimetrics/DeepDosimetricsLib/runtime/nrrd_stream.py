"""A NRRD file written plane by plane: a full-size volume reaches the disk without ever being whole in memory.

:class:`NrrdPlaneWriter` writes the header (type, sizes, space directions and origin in LPS, as ITK's NRRD
writer does, so SimpleITK and Slicer read the same image), then receives (n, y, x) blocks of planes in z order,
raw or gzip-compressed, under a temporary name renamed into place by :meth:`close` (atomic, as
``runtime.atomic.atomic_path``). Closing before every plane arrived is an error and leaves nothing behind.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

#: numpy dtype -> NRRD type name
NRRD_TYPES = {
    np.dtype(np.uint8): "uint8", np.dtype(np.int8): "int8", np.dtype(np.int16): "int16",
    np.dtype(np.uint16): "uint16", np.dtype(np.int32): "int32", np.dtype(np.uint32): "uint32",
    np.dtype(np.float32): "float", np.dtype(np.float64): "double",
}


def _vector(values: Sequence[float]) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def nrrd_header(size_xyz: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
                direction: Sequence[float], dtype: np.dtype, compress: bool) -> bytes:
    """The header of a 3D NRRD in LPS space; ``direction``: 9 values, row-major, columns the index axes (ITK)."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    axes = " ".join(_vector(matrix[:, axis] * float(spacing[axis])) for axis in range(3))
    lines = [
        "NRRD0004",
        f"type: {NRRD_TYPES[np.dtype(dtype)]}",
        "dimension: 3",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(int(v)) for v in size_xyz),
        f"space directions: {axes}",
        "kinds: domain domain domain",
        "endian: little",
        f"encoding: {'gzip' if compress else 'raw'}",
        f"space origin: {_vector(origin)}",
    ]
    return ("\n".join(lines) + "\n\n").encode("ascii")


class NrrdPlaneWriter:
    """Writes a (z, y, x) volume of ``dtype`` on ``geometry`` (a ``data.geometry.Geometry``) block by block."""

    def __init__(self, path: Union[str, Path], geometry, dtype, compress: bool = False, level: int = 1):
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shape = tuple(int(v) for v in geometry.shape_zyx)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(f".{self.path.name}.partial")
        self._file = open(self._partial, "wb")
        self._file.write(nrrd_header(geometry.size, geometry.spacing, geometry.origin, geometry.direction,
                                     np.dtype(dtype), compress))
        self._stream = gzip.GzipFile(fileobj=self._file, mode="wb", compresslevel=level, mtime=0) if compress \
            else self._file
        self.written = 0

    def write(self, planes: np.ndarray) -> None:
        """The next ``n`` planes, (n, y, x) (cast to the file's type)."""
        planes = np.asarray(planes)
        if planes.ndim != 3 or planes.shape[1:] != self.shape[1:]:
            raise ValueError(f"planes of shape {planes.shape} do not fit a volume of shape {self.shape}")
        if self.written + planes.shape[0] > self.shape[0]:
            raise ValueError(f"more than {self.shape[0]} planes written to {self.path}")
        self._stream.write(np.ascontiguousarray(planes, dtype=self.dtype).tobytes())
        self.written += planes.shape[0]

    def close(self) -> Path:
        """Finish the file and move it into place (ValueError, and no file, when planes are missing)."""
        try:
            if self._stream is not self._file:
                self._stream.close()
            self._file.close()
            if self.written != self.shape[0]:
                raise ValueError(f"{self.path}: only {self.written} of {self.shape[0]} planes were written")
            self._partial.replace(self.path)
        finally:
            self._partial.unlink(missing_ok=True)
        return self.path

    def abandon(self) -> None:
        """Close and delete the unfinished file."""
        if self._stream is not self._file:
            self._stream.close()
        self._file.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> NrrdPlaneWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abandon()


def open_writer(path: Union[str, Path], geometry, dtype, compress: bool = False,
                level: Optional[int] = None) -> NrrdPlaneWriter:
    """A :class:`NrrdPlaneWriter` (gzip level 1 by default: fast, and most of a label or air plane is constant)."""
    return NrrdPlaneWriter(path, geometry, dtype, compress, 1 if level is None else level)
