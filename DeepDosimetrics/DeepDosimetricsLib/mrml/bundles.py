"""Slicer data bundles (``.mrb``): the scene and its data written atomically, and opened again."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

from DeepDosimetricsLib.mrml.headless import application_logic, current_scene
from DeepDosimetricsLib.runtime.errors import InputError


def save_scene_bundle(path: Union[str, os.PathLike], scene: Any = None) -> Path:
    """Write the scene and its data as a Slicer data bundle (``.mrb``), atomically."""
    path = Path(path).absolute()  # MRML refuses relative bundle folders
    if path.suffix.lower() != ".mrb":
        raise InputError(f"scene bundle {path} must end in .mrb")
    scene = current_scene(scene)
    path.parent.mkdir(parents=True, exist_ok=True)
    app_logic = application_logic(scene)
    with tempfile.TemporaryDirectory(prefix="deepdosimetrics-mrb-", dir=path.parent) as work:
        bundle_dir = Path(work) / path.stem
        bundle_dir.mkdir()
        if not app_logic.SaveSceneToSlicerDataBundleDirectory(str(bundle_dir), None):
            raise InputError(f"could not write the scene bundle {path}")
        partial = Path(work) / (path.name + ".part")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(bundle_dir.rglob("*")):
                if file.is_file():
                    # volumes and segmentations are gzip-compressed by their writers already
                    stored = file.name.endswith((".nrrd", ".nii.gz", ".mha"))
                    archive.write(
                        file, str(Path(path.stem) / file.relative_to(bundle_dir)),
                        compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED,
                    )
        os.replace(partial, path)
    return path


def open_scene_bundle(path: Union[str, os.PathLike], scene: Any = None, unpack_dir: Optional[str] = None) -> Any:
    """Load a ``.mrb`` into the scene (unpacked to ``unpack_dir``, default a new temporary folder)."""
    path = Path(path).absolute()
    if not path.is_file():
        raise InputError(f"scene bundle {path} does not exist")
    scene = current_scene(scene)
    unpack = Path(unpack_dir).absolute() if unpack_dir else Path(tempfile.mkdtemp(prefix="deepdosimetrics-open-"))
    unpack.mkdir(parents=True, exist_ok=True)
    if not application_logic(scene).OpenSlicerDataBundle(str(path), str(unpack)):
        raise InputError(f"could not open the scene bundle {path}")
    return scene
