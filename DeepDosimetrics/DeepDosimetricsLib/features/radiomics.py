"""Radiomics per structure, on the CT or on the dose ("dosiomics"), through pyradiomics.

Settings are a pyradiomics parameter file (YAML or JSON) or a preset shipped as such a file under
``Resources/radiomics/``: ``firstorder`` (the 18 first-order features; the default), ``all`` (every 3D
feature class, shape included) and ``ibsi`` (IBSI-style: 2 mm isotropic resampling, trilinear
interpolation, fixed bin width). Each preset has a dose variant (``<name>.dose.yaml``, bin width
0.5 Gy instead of 25 HU), chosen when the image is the dose.

The CT presets suit other modalities as pyradiomics' defaults do (its own MR test case, ``brain1``, uses
``binWidth`` 25), except where they hold HU values: the ``ibsi`` preset's re-segmentation range
[-1000, 400] HU is refused on an MR or PET image (an ``error:`` row asking for a parameter file).

Features are computed by ``radiomics.featureextractor.RadiomicsFeatureExtractor.execute`` on the
SimpleITK image and mask themselves, so they equal bare pyradiomics run on the same files exactly.
The mask must lie on the image's grid (a Patient resamples structures and dose onto the CT grid);
a mask on another grid is resampled onto the image by nearest neighbour first.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from DeepDosimetricsLib.features.tables import (
    EMPTY_STRUCTURE,
    OUTSIDE_IMAGE,
    TOO_SMALL,
    StructureSkipped,
    WorkItem,
    in_patient_order,
    long_table,
    reason_row,
    run_items,
    value_rows,
    with_unreadable,
    work_items,
)
from DeepDosimetricsLib.runtime.errors import InputError
from DeepDosimetricsLib.runtime.resources import resource_path

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from DeepDosimetricsLib.data.cohort import Cohort
    from DeepDosimetricsLib.data.patient import Patient

log = logging.getLogger(__name__)

PRESET_FOLDER = resource_path("radiomics")
DEFAULT_PRESET = "firstorder"
IMAGE_KINDS = ("ct", "dose")
DEFAULT_IMAGE = "ct"
PARAMETER_SUFFIXES = (".yaml", ".yml", ".json")
#: a dose bin width above this many Gy leaves a structure with only a few grey levels
DOSE_BIN_WIDTH_WARNING_GY = 5.0


@dataclass(eq=False)
class RadiomicsParameters:
    """pyradiomics settings, checked: a preset or a parameter file, parsed into ``config``.

    ``path`` is the parameter file itself (for SlicerRadiomics' ``runCLIWithParameterFile`` or the
    ``pyradiomics`` command); ``None`` for settings given as a dict (see ``parameter_file``).
    """

    name: str
    config: Dict[str, Any]
    path: Optional[Path] = None
    image: str = "ct"
    _key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        self._key = json.dumps(self.config, sort_keys=True, default=str)

    @property
    def feature_classes(self) -> List[str]:
        """Enabled feature classes, as pyradiomics reads the settings (all of them when none is named)."""
        return list(self.extractor().enabledFeatures)

    @property
    def bin_width(self) -> Optional[float]:
        """The fixed bin width, or None when binCount is used instead."""
        setting = self.config.get("setting") or {}
        if setting.get("binCount") is not None:
            return None
        return float(setting.get("binWidth", 25))

    def extractor(self):
        """The pyradiomics extractor for these settings (built once per process)."""
        return _extractor(self._key)

    def parameter_file(self, folder: Union[str, Path, None] = None) -> Path:
        """A pyradiomics parameter file with these settings: ``path``, or a YAML written to ``folder``."""
        if self.path is not None:
            return self.path
        import tempfile

        import yaml

        folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="deepdosimetrics-"))
        target = folder / "radiomics-parameters.yaml"
        target.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return target


def preset_names() -> List[str]:
    """The presets shipped under Resources/radiomics (without their dose variants)."""
    return sorted(p.stem for p in PRESET_FOLDER.glob("*.yaml") if not p.stem.endswith(".dose"))


def preset_path(name: str, image: str = "ct") -> Path:
    """The parameter file of a preset for an image kind (the dose variant when there is one)."""
    _check_image_kind(image)
    if name not in preset_names():
        raise InputError(
            f"unknown radiomics preset {name!r}; known presets: {', '.join(preset_names())} "
            "(or give a pyradiomics parameter file, .yaml or .json)"
        )
    dose_variant = PRESET_FOLDER / f"{name}.dose.yaml"
    if image == "dose" and dose_variant.is_file():
        return dose_variant
    return PRESET_FOLDER / f"{name}.yaml"


def resolve_parameters(
    spec: Union[str, Path, Dict[str, Any], RadiomicsParameters, None] = None, image: str = "ct"
) -> RadiomicsParameters:
    """Checked pyradiomics settings from a preset name, a parameter file (YAML/JSON) or a dict.

    Raises InputError before any work: unknown preset (naming the known ones), missing or broken
    file (naming it and the problem), settings pyradiomics refuses, unknown feature names.
    ``image`` ("ct" or "dose") picks a preset's variant; files and dicts are used as they are.
    """
    _check_image_kind(image)
    if isinstance(spec, RadiomicsParameters):
        return spec
    if spec is None:
        spec = DEFAULT_PRESET
    if isinstance(spec, dict):
        params = RadiomicsParameters(
            name="settings", config=_validated(spec, "radiomics settings"), image=image
        )
    else:
        text = str(spec)
        path = Path(text).expanduser()
        if text in preset_names():
            path = preset_path(text, image)
            name = text
        elif path.is_file():
            name = str(path)
        elif path.suffix.lower() in PARAMETER_SUFFIXES or "/" in text or "\\" in text:
            raise InputError(f"radiomics parameter file {path} does not exist")
        else:
            preset_path(text, image)  # raises: unknown preset, listing the known ones
            raise AssertionError("unreachable")
        config = _validated(_read_parameter_file(path), f"radiomics parameter file {path}")
        params = RadiomicsParameters(name=name, config=config, path=path.resolve(), image=image)
    if image == "dose" and params.bin_width is not None and params.bin_width > DOSE_BIN_WIDTH_WARNING_GY:
        log.warning(
            "%s: binWidth %g applied to a dose in Gy gives only a few grey levels per structure "
            "(the presets use 0.5 Gy for the dose)",
            params.name,
            params.bin_width,
        )
    return params


def structure_features(
    image: sitk.Image,
    mask: sitk.Image,
    params: Union[str, Path, Dict[str, Any], RadiomicsParameters, None] = None,
    label: int = 1,
) -> Dict[str, float]:
    """pyradiomics features of the voxels of ``mask == label`` in ``image``, by pyradiomics name
    (e.g. ``original_firstorder_Mean``), diagnostics excluded. For many structures, resolve the
    parameters once (``resolve_parameters``) and pass the result.

    When the settings make it exact (original image only, no resampling, no normalisation), image and
    mask are first cropped to the region's bounding box plus a margin: pyradiomics crops there anyway,
    but its checks on the whole grid cost more than the features themselves.

    Raises StructureSkipped (an InputError) for an empty mask, a mask outside the image, or a
    region pyradiomics refuses (a single voxel, too few dimensions, nothing left after
    re-segmentation).
    """
    params = resolve_parameters(params)
    mask = _mask_on_image_grid(image, mask, label)
    extractor = params.extractor()
    if _crop_is_exact(extractor):
        image, mask = _crop_to_region(image, mask, label)
    try:
        result = extractor.execute(image, mask, label=int(label))
    except ValueError as error:  # pyradiomics' checkMask and resegmentation refusals
        raise StructureSkipped(TOO_SMALL, f"pyradiomics refuses the region: {error}") from None
    return {name: float(value) for name, value in result.items() if not name.startswith("diagnostics_")}


def image_radiomics(
    image: sitk.Image,
    masks: Mapping[str, Union[sitk.Image, Tuple[sitk.Image, int]]],
    params: Union[str, Path, Dict[str, Any], RadiomicsParameters, None] = None,
    image_kind: str = "ct",
    patient_id: str = "",
) -> pd.DataFrame:
    """Long table of the features of several masks over ONE image, used as it is (no cast, no
    resampling of the image), e.g. MRML nodes converted to SimpleITK. ``masks`` maps a structure name
    to a mask on the image grid, or to ``(labelmap, label)``. A mask that cannot be measured gives a
    reason row. ``image_kind`` ("ct" or "dose") picks a preset's variant and fills the image column.
    ``to_wide(table, with_patient=False)`` gives one column per structure."""
    params = resolve_parameters(params, image_kind)
    rows: List[tuple] = []
    for name, source in masks.items():
        mask, label = source if isinstance(source, tuple) else (source, 1)
        try:
            values = structure_features(image, mask, params, label=label)
        except StructureSkipped as skip:
            rows.append(reason_row(patient_id, name, image_kind, skip))
            continue
        rows += value_rows(patient_id, name, image_kind, values)
    return long_table(rows)


def patient_radiomics(
    patient: Patient,
    image: str = "ct",
    params: Union[str, Path, Dict[str, Any], RadiomicsParameters, None] = None,
    structures: Optional[Sequence[str]] = None,
) -> pd.DataFrame:
    """Long table (patient, structure, image, feature, value, reason) for one patient's structures.

    Args:
        patient: the patient (structures are taken on its CT grid).
        image: the image the features describe: ``ct`` (HU) or ``dose`` (Gy).
        params: a preset name (``available_presets()``, default ``DEFAULT_PRESET``), a pyradiomics
            parameter file, a parameter dict or ``RadiomicsParameters``.
        structures: structure names (case-insensitive); default every structure.

    Returns:
        One row per (structure, feature); a structure that cannot be computed (empty, missing) has one
        row with ``reason`` set and no value.
    """
    return _radiomics_of([patient], image, resolve_parameters(params, image), structures, jobs=1, quiet=True)


def cohort_radiomics(
    cohort: Union[Cohort, str, Path],
    image: str = "ct",
    params: Union[str, Path, Dict[str, Any], RadiomicsParameters, None] = None,
    structures: Optional[Sequence[str]] = None,
    jobs: int = 1,
    quiet: bool = False,
) -> pd.DataFrame:
    """Long table for every patient of a cohort, in parallel over (patient, structure) with ``jobs``
    processes; a progress bar counts the items unless ``quiet``.

    Args:
        cohort: a ``Cohort`` or its folder.
        image: ``ct`` (HU) or ``dose`` (Gy).
        params: a preset name, a pyradiomics parameter file, a dict or ``RadiomicsParameters`` (default
            ``DEFAULT_PRESET``).
        structures: structure names (case-insensitive); default each patient's every structure.
        jobs: worker processes (1: in this process).
        quiet: no progress bar.

    Returns:
        The long table (patient, structure, image, feature, value, reason); see ``patient_radiomics``.

    Raises:
        InputError: an unreadable cohort, an unknown preset or a bad parameter file.
    """
    from DeepDosimetricsLib.data.cohort import Cohort

    params = resolve_parameters(params, image)
    if not isinstance(cohort, Cohort):
        cohort = Cohort.open(cohort)
    table = _radiomics_of(list(cohort), image, params, structures, jobs=jobs, quiet=quiet)
    return with_unreadable(table, cohort, image)


def _radiomics_of(
    patients: List[Patient],
    image: str,
    params: RadiomicsParameters,
    structures: Optional[Sequence[str]],
    jobs: int,
    quiet: bool,
) -> pd.DataFrame:
    """The long table of some patients' structures (the work of patient_ and cohort_radiomics)."""
    items, rows = work_items(patients, structures, need_dose=image == "dose", image=image)
    rows += run_items(
        items,
        functools.partial(_features_item, image=image, params=params),
        patients={p.id: p for p in patients},
        jobs=jobs,
        quiet=quiet,
        desc=f"radiomics ({image})",
        image=image,
    )
    return long_table(in_patient_order(rows, [p.id for p in patients]))


# ---------------------------------------------------------------------------------- internals
def _check_image_kind(image: str) -> None:
    if image not in IMAGE_KINDS:
        raise InputError(f"unknown image {image!r}; choose one of: {', '.join(IMAGE_KINDS)}")


def _read_parameter_file(path: Path) -> Dict[str, Any]:
    """Parse a YAML/JSON parameter file into a dict, naming the file and the problem on failure."""
    import yaml

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"radiomics parameter file {path}: cannot read it ({error})") from None
    try:
        config = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise InputError(f"radiomics parameter file {path} is not valid YAML/JSON: {error}") from None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise InputError(
            f"radiomics parameter file {path}: expected a mapping with imageType, featureClass and setting, "
            f"found a {type(config).__name__}"
        )
    return config


def _validated(config: Dict[str, Any], what: str) -> Dict[str, Any]:
    """Check settings with pyradiomics' own schema and check every named feature exists."""
    from radiomics import getFeatureClasses

    _quiet_pyradiomics()
    try:
        _extractor_from(config)
    except Exception as error:  # pykwalify SchemaError, IOError, ...
        message = str(error).strip().replace("\n", " ")
        raise InputError(f"{what}: pyradiomics refuses the settings: {message}") from None
    classes = getFeatureClasses()
    for class_name, features in (config.get("featureClass") or {}).items():
        known = classes[class_name].getFeatureNames()
        unknown = [f for f in (features or []) if f not in known]
        if unknown:
            raise InputError(
                f"{what}: unknown {class_name} feature(s) {', '.join(map(str, unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
    if not (config.get("featureClass") or {}) and not config.get("imageType"):
        log.debug("%s: no featureClass given, pyradiomics enables every class", what)
    return config


def _quiet_pyradiomics() -> None:
    """pyradiomics logs every extraction at INFO and some settings at WARNING: keep errors only."""
    import radiomics

    radiomics.setVerbosity(logging.ERROR)
    # its logger (and pykwalify's) would still pass INFO records on to the root logger's handlers
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    logging.getLogger("pykwalify").setLevel(logging.CRITICAL)  # its findings reach the user in our InputError


def _extractor_from(config: Dict[str, Any]):
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    return RadiomicsFeatureExtractor(json.loads(json.dumps(config, default=str)))


@functools.lru_cache(maxsize=8)
def _extractor(key: str):
    _quiet_pyradiomics()
    return _extractor_from(json.loads(key))


def _mask_on_image_grid(image: sitk.Image, mask: sitk.Image, label: int) -> sitk.Image:
    """The mask on the image grid (nearest neighbour when it is not), checked to hold the label."""
    from DeepDosimetricsLib.data.geometry import Geometry

    same_grid = (
        mask.GetSize() == image.GetSize()
        and np.allclose(mask.GetSpacing(), image.GetSpacing(), rtol=0, atol=1e-6)
        and np.allclose(mask.GetOrigin(), image.GetOrigin(), rtol=0, atol=1e-4)
        and np.allclose(mask.GetDirection(), image.GetDirection(), rtol=0, atol=1e-6)
    )
    if not same_grid:
        if not np.any(sitk.GetArrayViewFromImage(mask) == label):
            raise StructureSkipped(EMPTY_STRUCTURE, f"no voxel with label {label} in the mask")
        if not Geometry.from_image(mask).overlaps(Geometry.from_image(image)):
            raise StructureSkipped(OUTSIDE_IMAGE, "the mask's extent lies outside the image")
        mask = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())
        if not np.any(sitk.GetArrayViewFromImage(mask) == label):
            raise StructureSkipped(OUTSIDE_IMAGE, "no voxel of the mask remains on the image grid")
    elif not np.any(sitk.GetArrayViewFromImage(mask) == label):
        raise StructureSkipped(EMPTY_STRUCTURE, f"no voxel with label {label} in the mask")
    return mask


#: voxels kept around the region's bounding box when cropping (pyradiomics crops with no margin)
CROP_MARGIN_VOXELS = 2


def _crop_is_exact(extractor) -> bool:
    """Whether cropping to the region changes no feature: every enabled image is the original image
    (filters would see the surroundings), no resampling (its grid depends on the image extent), no
    normalisation (it uses statistics of the whole image)."""
    settings = extractor.settings
    return (
        set(extractor.enabledImagetypes) == {"Original"}
        and not extractor.enabledImagetypes["Original"]
        and settings.get("resampledPixelSpacing") is None
        and not settings.get("normalize", False)
        and not settings.get("voxelBased", False)
    )


def _crop_to_region(image: sitk.Image, mask: sitk.Image, label: int) -> tuple[sitk.Image, sitk.Image]:
    """Image and mask cropped to the bounding box of ``mask == label`` plus a margin (same grid)."""
    inside = sitk.GetArrayViewFromImage(mask) == label
    start_zyx, stop_zyx = [], []
    for axis in range(inside.ndim):
        others = tuple(a for a in range(inside.ndim) if a != axis)
        hits = np.flatnonzero(inside.any(axis=others))
        start_zyx.append(max(int(hits[0]) - CROP_MARGIN_VOXELS, 0))
        stop_zyx.append(min(int(hits[-1]) + 1 + CROP_MARGIN_VOXELS, inside.shape[axis]))
    index = [int(v) for v in reversed(start_zyx)]
    size = [int(stop - start) for start, stop in zip(reversed(start_zyx), reversed(stop_zyx))]
    return sitk.RegionOfInterest(image, size, index), sitk.RegionOfInterest(mask, size, index)


def check_settings_fit(params: RadiomicsParameters, modality: str) -> None:
    """InputError when a preset's settings hold HU values (a re-segmentation range) and the image is
    not a CT; a parameter file of the user's is used as given."""
    from DeepDosimetricsLib.data.modality import CT

    reseg = (params.config.get("setting") or {}).get("resegmentRange")
    preset = params.path is not None and params.path.parent == PRESET_FOLDER.resolve()
    if modality != CT and reseg is not None and preset:
        raise InputError(
            f"the {params.name} preset re-segments to {reseg} HU, a CT range, but the image is {modality}: "
            "give settings for it as a parameter file (--params)"
        )


def _features_item(item: WorkItem, patient: Patient, image: str, params: RadiomicsParameters) -> List[tuple]:
    """Worker: features of one structure of one patient (loads that image and that mask only)."""
    from DeepDosimetricsLib.features.tables import PATIENT_CACHE

    if image == "dose":
        volume = PATIENT_CACHE.derived_value("dose_image", patient.dose_image)
    else:
        volume = patient.ct_image()
        check_settings_fit(params, patient.modality)
    mask = patient.structure_image(item.structure)
    values = structure_features(volume, mask, params, label=1)
    return value_rows(patient.id, item.structure, image, values)
