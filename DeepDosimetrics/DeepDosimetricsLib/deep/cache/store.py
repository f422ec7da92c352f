"""The compact preprocessing cache that training and encoding read tiles from.

Each patient is resampled to a chosen spacing (default: keep), cropped to the body's bounding box
plus a margin, and stored as memory-mapped ``.npy`` files: ``hu.npy`` (int16 HU), ``body.npy`` and
one ``mask_<name>.npy`` per structure (uint8 0/1), ``dose.npy`` (float16 Gy), with ``manifest.json``
recording both geometries and the crop so results map back to the original CT grid. The target chosen
by ``synonyms.choose_target`` is stored as ``PTV``. Channels (windows, masks, scaled dose) are computed
per tile when a tile is read, so reading a tile costs O(tile) whatever the patient's size.

Layout of a cache folder::

    cohort.json                 cohort manifest: config, source cohort, patients, failures
    <patient id>/manifest.json  per-patient manifest (written last: its presence marks a patient done)
    <patient id>/hu.npy, body.npy, mask_PTV.npy, mask_<name>.npy, dose.npy
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from DeepDosimetricsLib.data.geometry import Geometry
from DeepDosimetricsLib.deep.channels import AIR_HU, ChannelSpec, compute_channels, parse_channels
from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)

#: bumped whenever the stored layout changes; a cache of another version is rebuilt
FORMAT_VERSION = 1
COHORT_MANIFEST = "cohort.json"
PATIENT_MANIFEST = "manifest.json"
#: environment variable naming the folder under which default cache folders are created
CACHE_ENV = "DEEPDOSIMETRICS_CACHE"
TARGET_NAME = "PTV"

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class CacheConfig:
    """How a cohort is preprocessed into the cache.

    spacing: output voxel spacing (x, y, z) in mm; None keeps each patient's CT spacing.
    margin_mm: margin added around the body's bounding box before cropping.
    structures: structures to store besides the target and the body (names or synonyms); None: all.
    target: preferred target structure for the ``PTV`` mask; None: ``synonyms.choose_target``'s default.
    """

    spacing: Optional[Tuple[float, float, float]] = None
    margin_mm: float = 10.0
    structures: Optional[Tuple[str, ...]] = None
    target: Optional[str] = None

    def __post_init__(self) -> None:
        if self.spacing is not None:
            spacing = tuple(float(v) for v in self.spacing)
            if len(spacing) != 3 or not all(v > 0 for v in spacing):
                raise InputError(f"cache spacing must be three positive numbers of mm, got {self.spacing}")
            object.__setattr__(self, "spacing", spacing)
        if not self.margin_mm >= 0:
            raise InputError(f"cache margin must be >= 0 mm, got {self.margin_mm}")
        object.__setattr__(self, "margin_mm", float(self.margin_mm))
        if self.structures is not None:
            object.__setattr__(self, "structures", tuple(str(s) for s in self.structures))

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-friendly dictionary."""
        data = asdict(self)
        data["spacing"] = list(self.spacing) if self.spacing is not None else None
        data["structures"] = list(self.structures) if self.structures is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> CacheConfig:
        """Inverse of ``to_dict``."""
        return cls(
            spacing=tuple(data["spacing"]) if data.get("spacing") is not None else None,
            margin_mm=float(data.get("margin_mm", 10.0)),
            structures=tuple(data["structures"]) if data.get("structures") is not None else None,
            target=data.get("target"),
        )

    def hash(self) -> str:
        """A short hash of the configuration and the format version (what a built patient must match)."""
        text = json.dumps({"format": FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def grid_offset(source: Geometry, target: Geometry) -> Optional[np.ndarray]:
    """Integer index (x, y, z) of ``target``'s origin in ``source`` when the grids align, else None."""
    if not (np.allclose(source.spacing, target.spacing, rtol=0, atol=1e-6)
            and np.allclose(source.direction, target.direction, rtol=0, atol=1e-6)):
        return None
    index = source.physical_to_index(target.origin)
    rounded = np.round(index)
    if not np.allclose(index, rounded, rtol=0, atol=1e-3):
        return None
    return rounded.astype(int)


#: bytes of a file's pages touched per memory map while a tile is read (bounds resident file pages)
READ_WINDOW_BYTES = 2 << 20


@dataclass(frozen=True)
class NpyLayout:
    """Path, data offset, shape and dtype of a C-ordered 3D ``.npy`` file."""

    path: Path
    offset: int
    shape: Tuple[int, int, int]
    dtype: np.dtype

    @classmethod
    def read(cls, path: Path, patient_id: str = "?") -> NpyLayout:
        """Read the header of a ``.npy`` file."""
        try:
            with open(path, "rb") as stream:
                version = np.lib.format.read_magic(stream)
                reader = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                    version, np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = reader(stream)
                offset = stream.tell()
        except (OSError, ValueError) as error:
            raise InputError(f"patient {patient_id}: cache file {path} cannot be read ({error})") from None
        if fortran_order or len(shape) != 3:
            raise InputError(f"patient {patient_id}: cache file {path} is not a C-ordered 3D array")
        return cls(Path(path), offset, tuple(int(v) for v in shape), np.dtype(dtype))


def read_region(layout: NpyLayout, lo: Sequence[int], hi: Sequence[int], out: np.ndarray) -> np.ndarray:
    """Copy ``array[lo:hi]`` (z, y, x; inside the array) of a ``.npy`` file into ``out``.

    The file is mapped a few slices at a time (about ``READ_WINDOW_BYTES`` of their pages touched), each
    map closed before the next, so the pages resident at once stay small whatever the volume's size.
    """
    import mmap

    z0, y0, x0 = (int(v) for v in lo)
    z1, y1, x1 = (int(v) for v in hi)
    _, height, width = layout.shape
    item = layout.dtype.itemsize
    row, plane = width * item, height * width * item
    span = (y1 - y0) * row  # bytes from the first to past the last row of the region in one slice
    step = max(1, READ_WINDOW_BYTES // span)  # slices per map: about READ_WINDOW_BYTES of them touched
    with open(layout.path, "rb") as stream:
        for z in range(z0, z1, step):
            z_end = min(z + step, z1)
            begin = layout.offset + z * plane + y0 * row
            end = layout.offset + (z_end - 1) * plane + y0 * row + span
            aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(stream.fileno(), end - aligned, offset=aligned, access=mmap.ACCESS_READ)
            try:
                view = np.ndarray((z_end - z, y1 - y0, x1 - x0), dtype=layout.dtype, buffer=mapped,
                                  offset=begin - aligned + x0 * item, strides=(plane, row, item))
                out[z - z0:z_end - z0] = view
                del view
            finally:
                mapped.close()
    return out


def drop_mapped_pages(array: Any) -> None:
    """madvise(MADV_DONTNEED) on the memory map behind a read-only np.memmap (no-op otherwise)."""
    import mmap

    advice = getattr(mmap, "MADV_DONTNEED", None)
    handle = getattr(array, "_mmap", None)
    if advice is not None and handle is not None and hasattr(handle, "madvise"):
        try:
            handle.madvise(advice)
        except (OSError, ValueError):
            pass


class CachedPatient:
    """One patient of the cache: memory-mapped arrays on the cropped, resampled grid, read lazily."""

    def __init__(self, folder: PathLike) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / PATIENT_MANIFEST
        try:
            self.manifest: Dict[str, Any] = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"cache manifest {manifest_path} cannot be read ({error})") from None
        self.id: str = self.manifest["patient"]
        #: the cropped, resampled grid the arrays lie on
        self.geometry = Geometry.from_dict(self.manifest["cropped_geometry"])
        #: the patient's original CT grid
        self.original_geometry = Geometry.from_dict(self.manifest["original_geometry"])
        #: the resampled (uncropped) grid
        self.resampled_geometry = Geometry.from_dict(self.manifest["resampled_geometry"])
        self._arrays: Dict[str, np.ndarray] = {}
        self._layouts: Dict[str, NpyLayout] = {}

    def __repr__(self) -> str:
        return f"CachedPatient({self.id!r}, shape={self.shape}, structures={self.structure_names})"

    def __getstate__(self) -> dict:
        # sent to worker processes without its open memory maps (pickling a memmap copies the array)
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    # ------------------------------------------------------------------ arrays
    @property
    def shape(self) -> Tuple[int, int, int]:
        """(z, y, x) of the cropped, resampled volume."""
        return self.geometry.shape_zyx

    @property
    def crop_start_xyz(self) -> Tuple[int, int, int]:
        """Index (x, y, z) of the crop's first voxel in the resampled grid."""
        return tuple(self.manifest["crop"]["start"])

    def _map(self, file_name: str) -> np.ndarray:
        """A fresh read-only memory map of one cache file."""
        path = self.folder / file_name
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise InputError(f"patient {self.id}: cache file {path} cannot be read ({error})") from None

    def _layout(self, file_name: str) -> NpyLayout:
        """Where the array of one cache file lies in the file (read once from its header)."""
        layout = self._layouts.get(file_name)
        if layout is None:
            layout = self._layouts[file_name] = NpyLayout.read(self.folder / file_name, self.id)
        return layout

    def _load(self, file_name: str) -> np.ndarray:
        """The memory map of one cache file, opened once and kept."""
        array = self._arrays.get(file_name)
        if array is None:
            array = self._arrays[file_name] = self._map(file_name)
        return array

    def release(self) -> None:
        """Drop the pages the memory maps have touched from this process's resident memory.

        Pages stay in the OS page cache, so re-reading is cheap; the process's RSS stays bounded by
        what it reads at a time rather than by the patient (training and encoding call this).
        """
        for array in self._arrays.values():
            drop_mapped_pages(array)

    def _mask_file(self, name: str) -> str:
        stored = self.resolve_structure(name)
        if stored is None:
            known = ", ".join(self.structure_names) or "none"
            raise InputError(f"patient {self.id} has no structure {name} in the cache (structures: {known})")
        if stored == "BODY" and stored not in self.manifest["structures"]:
            return self.manifest["files"]["body"]
        return self.manifest["structures"][stored]["file"]

    @property
    def hu(self) -> np.ndarray:
        """CT in HU, int16 (z, y, x), memory-mapped."""
        return self._load(self.manifest["files"]["hu"])

    @property
    def body(self) -> np.ndarray:
        """Body mask, uint8 (z, y, x), memory-mapped."""
        return self._load(self.manifest["files"]["body"])

    @property
    def has_dose(self) -> bool:
        """Whether the patient has a dose."""
        return bool(self.manifest["has_dose"])

    @property
    def dose(self) -> Optional[np.ndarray]:
        """Dose in Gy, float16 (z, y, x), memory-mapped; None when the patient has no dose."""
        if not self.has_dose:
            return None
        return self._load(self.manifest["files"]["dose"])

    @property
    def prescription_gy(self) -> Optional[float]:
        """The prescription dose in Gy when known."""
        value = self.manifest.get("prescription_gy")
        return float(value) if value is not None else None

    @property
    def structure_names(self) -> List[str]:
        """Names of the stored masks (``PTV`` is the target), besides the body."""
        return list(self.manifest["structures"])

    def original_structure_name(self, name: str) -> Optional[str]:
        """The name a stored structure had in the patient's files."""
        entry = self.manifest["structures"].get(self.resolve_structure(name) or "")
        return entry["original"] if entry else None

    def resolve_structure(self, name: str) -> Optional[str]:
        """The stored name for a structure name (exact, original name, or case-insensitive); else None."""
        structures = self.manifest["structures"]
        if name in structures:
            return name
        for stored, entry in structures.items():
            if entry["original"] == name:
                return stored
        lowered = name.lower()
        for stored, entry in structures.items():
            if stored.lower() == lowered or entry["original"].lower() == lowered:
                return stored
        if lowered in ("body", "external"):
            return "BODY"
        return None

    def has_structure(self, name: str) -> bool:
        """Whether a mask (or the body) is stored under this name."""
        return self.resolve_structure(name) is not None

    def mask(self, name: str) -> np.ndarray:
        """A structure mask, uint8 (z, y, x), memory-mapped (``BODY`` gives the body)."""
        return self._load(self._mask_file(name))

    def read_mask_planes(self, name: str, z0: int, z1: int) -> np.ndarray:
        """Planes ``z0:z1`` of a structure mask (``BODY``: the body) as stored, uint8 (n, y, x), read through
        small temporary maps (no page of the file stays resident): the cheap way to scan a whole mask."""
        layout = self._layout(self._mask_file(name))
        _, height, width = self.shape
        out = np.empty((z1 - z0, height, width), layout.dtype)
        return read_region(layout, (z0, 0, 0), (z1, height, width), out)

    # ------------------------------------------------------------------ channels
    def check_channels(self, specs: Union[str, Sequence[Union[str, ChannelSpec]]]) -> List[ChannelSpec]:
        """Raise InputError naming the patient and the first channel this patient cannot provide."""
        specs = parse_channels(specs)
        for spec in specs:
            if spec.kind == "mask" and not self.has_structure(spec.name):
                known = ", ".join(self.structure_names) or "none"
                raise InputError(
                    f"patient {self.id} has no structure {spec.name}; channel {spec.label!r} needs it "
                    f"(structures: {known})"
                )
            if spec.kind == "dose":
                if not self.has_dose:
                    raise InputError(f"patient {self.id} has no dose; channel {spec.label!r} needs it")
                if spec.dose_max_gy is None and self.prescription_gy is None:
                    raise InputError(
                        f"patient {self.id} has no known prescription; channel {spec.label!r} needs it "
                        "(use dose or dose:GY for a fixed maximum)"
                    )
        return specs

    def read_tile(
        self,
        specs: Union[str, Sequence[Union[str, ChannelSpec]]],
        start_zyx: Sequence[int],
        size_zyx: Sequence[int],
        out: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """Channels of one tile, float32 (C, z, y, x) in [0, 1], computed from the memmaps.

        The tile may reach outside the volume: those voxels read as air (HU -1024, masks 0, dose 0).
        Costs O(tile): only the tile's rows of each file are touched, through small memory maps of a few
        slices at a time, closed at once, so resident memory depends on the tile, not on the volume.

        Args:
            specs: the channels, as ``ChannelSpec`` objects or their strings (``"window:soft_tissue"``,
                ``"mask:PTV"``, ``"dose"``), or one comma-separated string.
            start_zyx: the tile's first voxel (z, y, x) on the cache grid, in voxels; may be negative.
            size_zyx: the tile's size (z, y, x) in voxels, each > 0.
            out: a float32 (C, z, y, x) array to fill instead of allocating one.

        Returns:
            float32 (C, *size_zyx) in [0, 1], one channel per spec in order.

        Raises:
            InputError: a channel the cache cannot provide (e.g. a missing structure or no dose), or a
                malformed start/size.
        """
        specs = self.check_channels(specs)
        start = np.asarray(start_zyx, dtype=int)
        size = np.asarray(size_zyx, dtype=int)
        if start.shape != (3,) or size.shape != (3,) or np.any(size <= 0):
            raise InputError(f"tile start {tuple(start_zyx)} / size {tuple(size_zyx)} must be 3 ints, size > 0")
        shape = np.asarray(self.shape)
        lo = np.clip(start, 0, shape)
        hi = np.clip(start + size, 0, shape)
        target = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
        inside = bool(np.all(hi > lo))
        tile_shape = tuple(int(v) for v in size)

        def read(file_name: str, fill: Any) -> np.ndarray:
            layout = self._layout(file_name)
            if inside and np.array_equal(lo, start) and np.array_equal(hi, start + size):
                tile = np.empty(tile_shape, dtype=layout.dtype)
                read_region(layout, lo, hi, tile)
                return tile
            tile = np.full(tile_shape, fill, dtype=layout.dtype)
            if inside:
                read_region(layout, lo, hi, tile[target])
            return tile

        kinds = {spec.kind for spec in specs}
        files = self.manifest["files"]
        hu = read(files["hu"], AIR_HU) if "window" in kinds else None
        masks = {spec.name: read(self._mask_file(spec.name), 0) for spec in specs if spec.kind == "mask"}
        dose = read(files["dose"], 0) if "dose" in kinds else None
        return compute_channels(specs, hu, masks, dose, prescription_gy=self.prescription_gy, out=out)

    # ------------------------------------------------------------------ back to the original grid
    def to_original_grid(self, volume_zyx: np.ndarray, interpolation: str = "linear", fill: float = 0.0):
        """A volume on the cache grid (``shape``) as a SimpleITK image on the patient's original CT grid.

        The crop is undone (``fill`` outside it) and the resampling reverted (``linear`` or ``nearest``).
        Float input gives a float32 image; integer input keeps its type.
        """
        import SimpleITK as sitk

        volume = np.asarray(volume_zyx)
        if volume.shape != self.shape:
            raise InputError(
                f"patient {self.id}: volume of shape {volume.shape} does not match the cache grid {self.shape}"
            )
        interpolators = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
        if interpolation not in interpolators:
            raise InputError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
        if volume.dtype == np.bool_:
            volume = volume.astype(np.uint8)
        elif volume.dtype.kind == "f" and volume.dtype != np.float32:
            volume = volume.astype(np.float32)
        original = self.original_geometry
        offset = grid_offset(original, self.geometry)
        if offset is not None:  # same grid, only cropped: paste, no interpolation
            full = np.full(original.shape_zyx, fill, dtype=volume.dtype)
            start = offset[::-1]
            shape = np.asarray(full.shape)
            lo, hi = np.clip(start, 0, shape), np.clip(start + np.asarray(volume.shape), 0, shape)
            if np.all(hi > lo):
                full[tuple(slice(a, b) for a, b in zip(lo, hi))] = volume[
                    tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))]
            return original.image_from_array(full)
        image = self.geometry.image_from_array(volume)
        rounding = volume.dtype.kind in "iu" and interpolation == "linear"
        pixel = sitk.sitkFloat32 if rounding else image.GetPixelID()
        result = sitk.Resample(image, original.reference_image(pixel), sitk.Transform(),
                               interpolators[interpolation], float(fill), pixel)
        if rounding:  # integers interpolated in float32, then rounded back to their type
            result = sitk.Cast(sitk.Round(result), image.GetPixelID())
        return result


@dataclass
class CachedCohort:
    """A cache folder: the patients built for one cohort and configuration."""

    folder: Path
    config: CacheConfig = field(default_factory=CacheConfig)
    ids: List[str] = field(default_factory=list)
    #: patient id -> why it could not be cached
    failed: Dict[str, str] = field(default_factory=dict)
    source: Optional[str] = None

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[CachedPatient]:
        return (self[pid] for pid in self.ids)

    def __contains__(self, pid: object) -> bool:
        return pid in self.ids

    def __getitem__(self, pid: str) -> CachedPatient:
        if pid not in self.ids:
            raise InputError(f"patient {pid} is not in the cache {self.folder}")
        return CachedPatient(self.folder / pid)

    def check_channels(self, specs: Union[str, Sequence[Union[str, ChannelSpec]]]) -> List[ChannelSpec]:
        """Check every patient can provide the channels (InputError naming the first that cannot)."""
        specs = parse_channels(specs)
        for patient in self:
            patient.check_channels(specs)
        return specs


def patient_is_complete(folder: Path, config: CacheConfig) -> bool:
    """Whether a patient folder holds a finished build for this configuration."""
    try:
        manifest = json.loads((Path(folder) / PATIENT_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return manifest.get("format_version") == FORMAT_VERSION and manifest.get("config_hash") == config.hash()


def default_cache_dir(cohort_dir: PathLike, config: CacheConfig) -> Path:
    """``$DEEPDOSIMETRICS_CACHE/<name>-<hash>`` or ``~/.cache/deepdosimetrics/<name>-<hash>``.

    The hash covers the cohort's absolute path and the configuration, so different cohorts or
    settings never share a folder, and the cohort itself (maybe read-only) is never written.
    """
    cohort = Path(cohort_dir).resolve()
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "deepdosimetrics")
    digest = hashlib.sha256(f"{cohort}\n{config.hash()}".encode()).hexdigest()[:12]
    return Path(root).expanduser() / f"{cohort.name}-{digest}"


def open_cache(cache_dir: PathLike) -> CachedCohort:
    """Open a built cache folder (its ``cohort.json``)."""
    folder = Path(cache_dir)
    path = folder / COHORT_MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{folder} is not a DeepDosimetrics cache: {path} cannot be read ({error})") from None
    config = CacheConfig.from_dict(data["config"])
    ids = [pid for pid in data["patients"] if patient_is_complete(folder / pid, config)]
    return CachedCohort(folder, config, ids, dict(data.get("failed", {})), data.get("source"))
