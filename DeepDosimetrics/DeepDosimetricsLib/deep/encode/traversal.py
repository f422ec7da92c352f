"""Latent traversal: decode a patient with one feature shifted by a number of standard deviations.

The standard deviation of each feature is taken over every encoded tile of the cohort. Every tile of
the patient gets the same shift of that feature, the tiles are decoded and blended as in a normal
reconstruction, and the volumes are written (physical units, original CT grid) to
``<patient>/traverse/<feature>_<+N>sd/``, so that a clinician can page through what a feature encodes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from DeepDosimetricsLib.deep.channels import ChannelSpec
from DeepDosimetricsLib.deep.encode.encoder import TileModel, decode_tiles, feature_names
from DeepDosimetricsLib.deep.encode.outputs import DONE_FILE
from DeepDosimetricsLib.deep.encode.reconstruction import (
    ReconstructionOptions,
    air_values,
    write_reconstruction,
)
from DeepDosimetricsLib.deep.tiling import NpyChannelSink, TileGrid
from DeepDosimetricsLib.runtime.atomic import replace_folder, write_json_atomic


def shift_name(feature: str, sigma: float) -> str:
    """Folder name of one traversal step, e.g. ``z03_+2sd``."""
    return f"{feature}_{sigma:+g}sd"


def cohort_feature_std(tile_tables: Sequence[pd.DataFrame], names: Sequence[str]) -> pd.Series:
    """Standard deviation of each feature over all tiles of the cohort."""
    values = pd.concat([table[list(names)] for table in tile_tables], ignore_index=True)
    return values.std(ddof=0)


def traverse_patient(
    runner: TileModel,
    cached_patient,
    specs: Sequence[ChannelSpec],
    tiles: pd.DataFrame,
    feature: str,
    sigmas: Sequence[float],
    std: float,
    out_dir,
    overlap: float,
    batch: int = 8,
) -> list[Path]:
    """Write one folder of volumes per shift of ``feature`` by ``sigma * std``; returns the folders."""
    cp = cached_patient
    names = feature_names(runner.config.features)
    positions = [tuple(int(v) for v in row) for row in tiles[["z", "y", "x"]].to_numpy()]
    base = tiles[names].to_numpy(np.float32)
    column = names.index(feature)
    grid = TileGrid.create(cp.shape, runner.config.tile, overlap)
    fill = air_values(cp, specs)
    written = []
    for sigma in sigmas:
        shifted = base.copy()
        shifted[:, column] += np.float32(sigma * std)
        folder = Path(out_dir) / shift_name(feature, sigma)
        scratch = folder.with_name(f".{folder.name}.stitch")
        sink = NpyChannelSink([scratch / f"channel{c}.npy" for c in range(len(specs))], cp.shape)
        decode_tiles(runner, grid, positions, shifted, sink, fill, batch)
        sink.close()
        write_reconstruction(cp, specs, sink.read, folder, ReconstructionOptions(metrics=False), original=False)
        shutil.rmtree(scratch, ignore_errors=True)
        written.append(folder)
    return written


def traverse_cohort(runner: TileModel, cache, specs: Sequence[ChannelSpec], out, patients: Sequence[str],
                    settings) -> Path:
    """Traverse ``settings.traverse`` features by ``settings.sigmas`` for each finished patient.

    Writes ``traverse_std.csv`` (feature, std) at the top; a patient whose traversal is done with the
    same features, shifts and standard deviations is not redone.
    """
    from DeepDosimetricsLib.runtime.atomic import write_csv_atomic
    from DeepDosimetricsLib.runtime.progress import progress_bar

    out = Path(out)
    names = feature_names(runner.config.features)
    tables = {pid: pd.read_csv(out / pid / "tiles.csv") for pid in patients}
    std = cohort_feature_std(list(tables.values()), names)
    path = write_csv_atomic(pd.DataFrame({"feature": std.index, "std": std.to_numpy()}), out / "traverse_std.csv")
    key = {"features": list(settings.traverse), "sigmas": [float(s) for s in settings.sigmas],
           "std": {f: round(float(std[f]), 6) for f in settings.traverse}}
    for pid in progress_bar(patients, total=len(patients), desc="traverse", quiet=settings.quiet):
        final = out / pid / "traverse"
        try:
            if json.loads((final / DONE_FILE).read_text()).get("key") == key:
                continue
        except (OSError, ValueError):
            pass
        partial = out / pid / ".traverse.partial"
        shutil.rmtree(partial, ignore_errors=True)
        for feature in settings.traverse:
            traverse_patient(runner, cache[pid], specs, tables[pid], feature, settings.sigmas,
                             float(std[feature]), partial, settings.overlap, settings.batch)
        write_json_atomic(partial / DONE_FILE, {"key": key})
        replace_folder(partial, final)
    return path
