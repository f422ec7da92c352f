"""Latent traversal in the review station: shift features z00..z09 of a patient by -3..+3 standard deviations
and decode it again, fast enough to follow a slider.

Nothing is encoded again: the patient's tile features and positions come from ``ENC_DIR/<id>/tiles.csv`` (the
encoder's own output), the standard deviation of each feature over every tile of the cohort from
``ENC_DIR/tiles.csv``. A change decodes the body tiles with the shifted features (``deep.encode.encoder``'s
``TileModel`` and ``decode_tiles``) and blends them on the cache grid, which MRML places in physical space
itself, so there is no resampling back to the CT grid. Results are kept per shift vector (a few), so going
back to a position is immediate, and the patient's original channel (for the residual) is read once.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)
SIGMA_RANGE = (-3.0, 3.0)
#: decoded shift vectors kept per patient (each one volume of C channels on the cache grid)
KEEP = 4


@dataclass
class TraversalResult:
    volume: np.ndarray  # (z, y, x) float32 in physical units on the cache grid
    geometry: object  # DeepDosimetricsLib.data.geometry.Geometry of the cache grid
    seconds: float
    cached: bool


def find_cache(catalog, cache_dir: Optional[Union[str, Path]]):
    """The encoding's preprocessing cache (``--cache`` or the cohort's default), or InputError saying why not."""
    from DeepDosimetricsLib.deep.cache.store import (
        COHORT_MANIFEST,
        CacheConfig,
        default_cache_dir,
        open_cache,
    )

    folder = Path(cache_dir) if cache_dir else default_cache_dir(catalog.cohort_dir, CacheConfig())
    if not (folder / COHORT_MANIFEST).is_file():
        raise InputError(f"no preprocessing cache at {folder} (give --cache DIR, the one `encode` used)")
    cache = open_cache(folder)
    wanted = catalog.job.get("description", {}).get("cache_config")
    if wanted and cache.config.hash() != wanted:
        raise InputError(f"the cache {folder} has another configuration than the encoding's")
    return cache


class Traverser:
    """Decodes one patient at a time with shifted features."""

    def __init__(self, model_dir: Union[str, Path], catalog, cache_dir=None, threads: Optional[int] = None):
        import torch

        from DeepDosimetricsLib.deep.channels import parse_channels
        from DeepDosimetricsLib.deep.encode.encoder import TileModel, feature_names
        from DeepDosimetricsLib.deep.model import load_model

        if threads:
            torch.set_num_threads(int(threads))
        self.catalog = catalog
        model, config = load_model(model_dir, device="cpu", channels=catalog.channels or None)
        self.runner = TileModel(model, "cpu")
        self.specs = parse_channels(list(config.channels))
        self.labels = [s.label for s in self.specs]
        self.names = feature_names(config.features)
        self.overlap = float(catalog.job.get("description", {}).get("overlap", 0.25))
        self.cache = find_cache(catalog, cache_dir)
        tiles = catalog.encoding_dir / "tiles.csv"
        try:
            table = pd.read_csv(tiles, usecols=self.names)
        except (OSError, ValueError) as error:
            raise InputError(f"{tiles} cannot be read ({error})") from None
        self.std = table.std(ddof=0).to_dict()
        self._patient: Optional[str] = None
        self._results: OrderedDict[Tuple, np.ndarray] = OrderedDict()
        self._truth: Dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ patient
    def _load_patient(self, patient: str) -> None:
        from DeepDosimetricsLib.deep.tiling import TileGrid

        if self._patient == patient:
            return
        if patient not in self.cache:
            raise InputError(f"patient {patient} is not in the cache {self.cache.folder}")
        files = self.catalog.files(patient)
        table = pd.read_csv(files.tiles)
        self.cp = self.cache[patient]
        self.positions = [tuple(int(v) for v in row) for row in table[["z", "y", "x"]].to_numpy()]
        self.base = table[self.names].to_numpy(np.float32)
        self.grid = TileGrid.create(self.cp.shape, self.runner.config.tile, self.overlap)
        from DeepDosimetricsLib.deep.encode.reconstruction import air_values

        self.fill = air_values(self.cp, self.specs)
        self._patient = patient
        self._results.clear()
        self._truth.clear()

    @staticmethod
    def key(shifts: Dict[str, float]) -> Tuple:
        return tuple(sorted((k, round(float(v), 3)) for k, v in shifts.items() if abs(float(v)) > 1e-9))

    def decode(self, patient: str, shifts: Dict[str, float]) -> Tuple[np.ndarray, bool]:
        """(C, z, y, x) float32 in [0, 1] on the cache grid for features shifted by ``shifts`` (name -> SD)."""
        from DeepDosimetricsLib.deep.encode.encoder import decode_tiles
        from DeepDosimetricsLib.deep.tiling import ArraySink

        self._load_patient(patient)
        key = self.key(shifts)
        if key in self._results:
            self._results.move_to_end(key)
            return self._results[key], True
        features = self.base.copy()
        for name, sigma in key:
            if name not in self.names:
                raise InputError(f"unknown feature {name}")
            sigma = min(max(sigma, SIGMA_RANGE[0]), SIGMA_RANGE[1])
            features[:, self.names.index(name)] += np.float32(sigma * self.std.get(name, 0.0))
        sink = ArraySink(self.cp.shape, len(self.specs))
        decode_tiles(self.runner, self.grid, self.positions, features, sink, self.fill, batch=8)
        self._results[key] = sink.array
        while len(self._results) > KEEP:
            self._results.popitem(last=False)
        return sink.array, False

    def channel(self, patient: str, shifts: Dict[str, float], label: str, residual: bool = False) -> TraversalResult:
        """One channel of the traversed patient in physical units (minus the original with ``residual``)."""
        from DeepDosimetricsLib.deep.channels import to_units
        from DeepDosimetricsLib.deep.encode.reconstruction import read_channel

        start = time.perf_counter()
        volumes, cached = self.decode(patient, shifts)
        index = self.labels.index(label)
        spec = self.specs[index]
        values = to_units(spec, volumes[index], self.cp.prescription_gy)
        if residual:
            truth = self._truth.get(label)
            if truth is None:
                truth = self._truth[label] = to_units(spec, read_channel(self.cp, spec), self.cp.prescription_gy)
            values = values - truth
        return TraversalResult(np.ascontiguousarray(values, np.float32), self.cp.geometry,
                               time.perf_counter() - start, cached)


def traversal_node(scene, name: str, result: TraversalResult, existing=None):
    """Put a traversal result into a volume node (reused when given) on the cache grid's geometry."""
    import slicer

    from DeepDosimetricsLib.mrml import volumes

    if existing is None or existing.GetScene() is None:
        return volumes.image_to_volume(result.geometry.image_from_array(result.volume), name, scene=scene)
    slicer.util.updateVolumeFromArray(existing, result.volume)
    return existing


def sigma_names(count: int) -> Sequence[str]:
    from DeepDosimetricsLib.deep.encode.encoder import feature_names

    return feature_names(count)
