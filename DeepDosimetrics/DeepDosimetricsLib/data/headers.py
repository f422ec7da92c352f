"""Image headers checked before any voxel is read, and compressed payloads checked before they are trusted.

* ``check_image_file(path, what)``: reads only the header (``sitk.ImageFileReader.ReadImageInformation``)
  and refuses a file whose declared size needs more memory than allowed (:func:`max_image_bytes`), or
  whose size, spacing, origin or direction is inconsistent (zero, negative, non-finite, non-orthogonal).
  Then, for a compressed payload ITK does not fully verify, the whole compressed stream is decoded once
  (streamed, without keeping it) so that a damaged stream is an error instead of garbage voxels:
  ``.nii.gz``/``.gz`` (gzip CRC-32 and length), NRRD ``encoding: gzip`` (attached or detached data; ITK
  reads only the bytes it needs and so does not always reach the CRC: a damaged stream decoded to garbage
  without an error, found by the fuzz tests) and MetaImage with ``CompressedData = True`` (zlib Adler-32
  and the decoded length).
  The verification costs about one more decompression per file and process (5 s for a 512x512x350 int16
  NRRD of noise, as much as ITK's own read; real CTs decompress faster); ``$DEEPDOSIMETRICS_VERIFY_PAYLOADS=0``
  turns it off for archives already verified.
* ``max_image_bytes()``: ``$DEEPDOSIMETRICS_MAX_IMAGE_MEMORY`` (bytes, or with a suffix K/M/G/T, or a
  fraction of the RAM such as ``0.25``), else half of the machine's RAM (psutil).
* ``check_geometry_values(...)``: the same geometry rules for headers read otherwise (DICOM).
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import re
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)

MEMORY_ENV = "DEEPDOSIMETRICS_MAX_IMAGE_MEMORY"
VERIFY_ENV = "DEEPDOSIMETRICS_VERIFY_PAYLOADS"
#: default limit: this fraction of the machine's RAM for one image
DEFAULT_MEMORY_FRACTION = 0.5
#: largest deviation of the direction cosines from an orthonormal matrix
ORTHOGONALITY_TOLERANCE = 1e-3
_CHUNK = 1 << 20
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory(text: str) -> int:
    """``"8G"`` -> bytes; ``"0.25"`` -> a quarter of the RAM; ``"123456"`` -> bytes."""
    value = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([KMGT]?)", value)
    if not match:
        raise InputError(f"${MEMORY_ENV}={text!r}: expected bytes (e.g. 8G, 500M) or a fraction of the RAM (0.25)")
    number, unit = float(match.group(1)), match.group(2)
    if not unit and number < 1.0:
        return int(number * total_memory())
    return int(number * _UNITS[unit])


def total_memory() -> int:
    """The machine's RAM in bytes."""
    import psutil

    return int(psutil.virtual_memory().total)


def max_image_bytes() -> int:
    """The most memory one image may need (see the module doc)."""
    configured = os.environ.get(MEMORY_ENV, "").strip()
    if configured:
        return parse_memory(configured)
    return int(DEFAULT_MEMORY_FRACTION * total_memory())


def format_bytes(count: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(count) < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024.0
    return f"{count:.1f} PiB"  # pragma: no cover


def check_memory(voxels: float, bytes_per_voxel: float, what: str, size: Sequence = ()) -> None:
    """InputError when an image of ``voxels`` x ``bytes_per_voxel`` exceeds :func:`max_image_bytes`."""
    needed = float(voxels) * float(bytes_per_voxel)
    limit = max_image_bytes()
    if needed > limit:
        shown = f" of size {tuple(int(v) for v in size)}" if len(size) else ""
        raise InputError(
            f"{what}: its header declares an image{shown} needing {format_bytes(needed)}, more than the "
            f"{format_bytes(limit)} allowed (set ${MEMORY_ENV}, e.g. 16G, to allow more); not read"
        )


def check_geometry_values(
    what: str,
    size: Sequence[float],
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Optional[Sequence[float]] = None,
) -> None:
    """InputError for a zero/negative size, a zero/negative/non-finite spacing, a non-finite origin or a
    direction matrix that is not orthonormal."""
    size = [int(v) for v in size]
    if any(v <= 0 for v in size):
        raise InputError(f"{what}: its header declares an empty image (size {tuple(size)})")
    spacing = np.asarray(spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{what}: inconsistent voxel spacing {tuple(spacing.tolist())} (must be finite and > 0)")
    if not np.all(np.isfinite(np.asarray(origin, dtype=float))):
        raise InputError(f"{what}: non-finite origin {tuple(origin)}")
    if direction is None:
        return
    matrix = np.asarray(direction, dtype=float)
    dimension = int(round(np.sqrt(matrix.size)))
    if dimension * dimension != matrix.size or not np.all(np.isfinite(matrix)):
        raise InputError(f"{what}: invalid direction cosines {tuple(matrix.tolist())}")
    matrix = matrix.reshape(dimension, dimension)
    deviation = float(np.abs(matrix.T @ matrix - np.eye(dimension)).max())
    if deviation > ORTHOGONALITY_TOLERANCE:
        raise InputError(
            f"{what}: the direction cosines are not orthonormal (axes skewed or scaled by up to {deviation:.3g}); "
            "the voxel grid is inconsistent"
        )


@functools.cache
def _component_bytes(pixel_id: int) -> int:
    import SimpleITK as sitk

    return int(sitk.GetArrayViewFromImage(sitk.Image([1, 1], pixel_id)).itemsize)




def check_image_file(path, what: str) -> None:
    """Check one image file's header (and compressed payload) before its voxels are read.

    Raises InputError naming ``what`` (which should name the file) and the problem.
    """
    import SimpleITK as sitk

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what}: {path} is a folder, not an image file")
    try:
        path.stat()
    except OSError as error:
        raise InputError(f"{what}: {path} cannot be read ({error.strerror or error})") from None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        if _looks_gzip(path):
            verify_payload(path, what)  # a damaged gzip stream: say so rather than "no ImageIO"
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise InputError(f"{what}: cannot read the header of {path} ({reason})") from None
    size = tuple(int(v) for v in reader.GetSize())
    check_geometry_values(what, size, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    components = max(1, int(reader.GetNumberOfComponents()))
    try:
        itemsize = _component_bytes(reader.GetPixelID())
    except RuntimeError:  # an unusual pixel type: count 8 bytes
        itemsize = 8
    check_memory(float(np.prod(size, dtype=float)), components * itemsize, what, size)
    verify_payload(path, what, expected_bytes=int(np.prod(size, dtype=np.int64)) * components * itemsize)


# ------------------------------------------------------------------------------ compressed payloads
_verified: dict = {}


def _looks_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            return stream.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def verify_payload(path, what: str, expected_bytes: Optional[int] = None) -> None:
    """Decode a compressed payload once (streamed) and refuse it when damaged; a no-op for other files.

    Results are remembered per (path, size, modification time), so a file read again is not decoded again.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise InputError(f"{what}: {path} cannot be read ({error.strerror or error})") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _verified or os.environ.get(VERIFY_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        _verify_nrrd(path, what, expected_bytes)
    elif _looks_gzip(path):
        _verify_gzip(path, what, expected_bytes if name.endswith((".nii.gz", ".nii")) else None)
    elif name.endswith((".mha", ".mhd")):
        _verify_metaimage(path, what, expected_bytes)
    _verified[key] = True


def _verify_nrrd(path: Path, what: str, expected_bytes: Optional[int]) -> None:
    """A gzip-encoded NRRD payload (attached after the header, or in its ``data file``) must decode fully."""
    fields, offset = {}, 0
    with open(path, "rb") as stream:
        for raw in stream:
            offset += len(raw)
            line = raw.decode("latin-1").rstrip("\r\n")
            if not line:
                break
            if ":" in line and not line.startswith("#"):
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.lstrip("=").strip()
            if offset > 1 << 20:
                return  # not a header we understand: ITK decides
    if fields.get("encoding", "").lower() not in ("gzip", "gz"):
        return
    data_file = fields.get("data file", fields.get("datafile", ""))
    if data_file:
        if data_file.upper().startswith("LIST") or "%" in data_file or " " in data_file:
            return  # several data files: ITK decides
        _verify_gzip(path.parent / data_file, what, expected_bytes)
    else:
        _verify_gzip(path, what, expected_bytes, offset)


def _verify_gzip(path: Path, what: str, expected_image_bytes: Optional[int], offset: int = 0) -> None:
    decoded = 0
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
            while True:
                chunk = stream.read(_CHUNK)
                if not chunk:
                    break
                decoded += len(chunk)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(
            f"{what}: the compressed data of {path} are damaged (gzip: {error}); the file is truncated or "
            "corrupt, re-export or copy it again"
        ) from None
    if expected_image_bytes is not None and decoded < expected_image_bytes:
        raise InputError(
            f"{what}: {path} decodes to {decoded} bytes, fewer than the {expected_image_bytes} its header "
            "declares; the file is truncated"
        )


def _verify_metaimage(path: Path, what: str, expected_bytes: Optional[int]) -> None:
    """A MetaImage with ``CompressedData = True`` and local data: the zlib stream must decode completely."""
    header = {}
    with open(path, "rb") as stream:
        offset = 0
        for raw in stream:
            offset += len(raw)
            line = raw.decode("latin-1").strip()
            if "=" in line:
                key, value = (part.strip() for part in line.split("=", 1))
                header[key.lower()] = value
                if key.lower() == "elementdatafile":
                    break
            if offset > 65536:
                return  # not a MetaImage header we understand: ITK decides
    if header.get("compresseddata", "").lower() != "true":
        return
    data_file = header.get("elementdatafile", "")
    if data_file.upper() == "LOCAL":
        source, start = path, offset
    elif data_file and data_file.upper() != "LIST" and "%" not in data_file:
        source, start = path.parent / data_file, 0
    else:
        return
    decoder = zlib.decompressobj()
    decoded = 0
    try:
        with open(source, "rb") as stream:
            stream.seek(start)
            while not decoder.eof:
                chunk = stream.read(_CHUNK)
                if not chunk:
                    break
                decoded += len(decoder.decompress(chunk))
            decoded += len(decoder.flush())
    except OSError as error:
        raise InputError(f"{what}: cannot read the data of {path} ({error.strerror or error})") from None
    except zlib.error as error:
        raise InputError(
            f"{what}: the compressed data of {path} are damaged (zlib: {error}); re-export or copy it again"
        ) from None
    if not decoder.eof:
        raise InputError(f"{what}: the compressed data of {path} end early (the file is truncated)")
    if expected_bytes is not None and decoded != expected_bytes:
        raise InputError(
            f"{what}: {path} decodes to {decoded} bytes, not the {expected_bytes} its header declares"
        )
