"""Radiomics: presets and parameter checks, exact equality with bare pyradiomics on the same files
(synthetic NRRDs, the phantom, an OpenKBP patient), skip reasons, cohorts, the `radiomics` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from DeepDosimetricsLib.cli import main
from DeepDosimetricsLib.data.cohort import Cohort
from DeepDosimetricsLib.data.patient import Patient
from DeepDosimetricsLib.features.radiomics import (
    cohort_radiomics,
    patient_radiomics,
    preset_names,
    preset_path,
    resolve_parameters,
    structure_features,
)
from DeepDosimetricsLib.features.tables import (
    EMPTY_STRUCTURE,
    ERROR,
    NO_DOSE,
    OUTSIDE_IMAGE,
    TOO_SMALL,
    StructureSkipped,
    count_failures,
    to_wide,
)
from DeepDosimetricsLib.runtime.errors import InputError

FIRST_ORDER_18 = {
    "InterquartileRange",
    "Mean",
    "Uniformity",
    "Entropy",
    "Kurtosis",
    "RootMeanSquared",
    "Variance",
    "Minimum",
    "10Percentile",
    "Maximum",
    "MeanAbsoluteDeviation",
    "90Percentile",
    "TotalEnergy",
    "Skewness",
    "RobustMeanAbsoluteDeviation",
    "Median",
    "Range",
    "Energy",
}
SPACING = (1.5, 1.25, 2.5)
ORIGIN = (-20.0, 13.0, 40.0)


def bare_pyradiomics(image_file: Path, mask_file: Path, parameter_file: Path) -> dict:
    """pyradiomics run directly on files, as a user would, diagnostics dropped."""
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    result = RadiomicsFeatureExtractor(str(parameter_file)).execute(str(image_file), str(mask_file))
    return {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}


def _image(array: np.ndarray, spacing=SPACING, origin=ORIGIN) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _write_synthetic_patient(
    folder: Path, seed: int, with_dose: bool = True, bad_structures: bool = False
) -> None:
    """CT with soft tissue, a bright lesion and noise; a dose falling off from the lesion; structures."""
    rng = np.random.default_rng(seed)
    shape = (20, 28, 30)
    z, y, x = np.indices(shape)
    lesion = ((z - 10) / 5.0) ** 2 + ((y - 14) / 7.0) ** 2 + ((x - 15) / 8.0) ** 2 <= 1
    ct = np.where(lesion, 60, 20) + rng.normal(0, 30, shape)
    ct[:, :, :3] = -1000
    dose = 70.0 * np.exp(-(((z - 10) / 8.0) ** 2 + ((y - 14) / 10.0) ** 2 + ((x - 15) / 12.0) ** 2))
    structures = {
        "Lesion": lesion,
        "Ring": (((z - 10) / 7.0) ** 2 + ((y - 14) / 10.0) ** 2 + ((x - 15) / 11.0) ** 2 <= 1) & ~lesion,
    }
    folder.mkdir(parents=True)
    (folder / "structures").mkdir()
    sitk.WriteImage(_image(ct.astype(np.int16)), str(folder / "ct.nrrd"))
    if with_dose:
        sitk.WriteImage(_image(dose.astype(np.float32)), str(folder / "dose.nrrd"))
    for name, mask in structures.items():
        sitk.WriteImage(_image(mask.astype(np.uint8)), str(folder / "structures" / f"{name}.nrrd"))
    if bad_structures:
        sitk.WriteImage(_image(np.zeros(shape, np.uint8)), str(folder / "structures" / "Empty.nrrd"))
        dot = np.zeros(shape, np.uint8)
        dot[10, 14, 15] = 1
        sitk.WriteImage(_image(dot), str(folder / "structures" / "Dot.nrrd"))
        far = _image(structures["Lesion"].astype(np.uint8), origin=(900.0, 900.0, 900.0))
        sitk.WriteImage(far, str(folder / "structures" / "Outside.nrrd"))


@pytest.fixture(scope="module")
def synthetic_cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("radiomics") / "cohort"
    _write_synthetic_patient(root / "s1", seed=1, bad_structures=True)
    _write_synthetic_patient(root / "s2", seed=2)
    _write_synthetic_patient(root / "s3", seed=3, with_dose=False)
    return root


# ---------------------------------------------------------------------------------- parameters
def test_presets_ship_as_pyradiomics_files():
    assert preset_names() == ["all", "firstorder", "ibsi"]
    firstorder = resolve_parameters("firstorder")
    assert set(firstorder.config["featureClass"]) == {"firstorder"}
    assert set(firstorder.config["featureClass"]["firstorder"]) == FIRST_ORDER_18
    assert firstorder.bin_width == 25 and firstorder.path == preset_path("firstorder")
    assert resolve_parameters("firstorder", image="dose").bin_width == 0.5
    everything = resolve_parameters("all")
    assert set(everything.feature_classes) == {
        "shape",
        "firstorder",
        "glcm",
        "glrlm",
        "glszm",
        "gldm",
        "ngtdm",
    }
    ibsi = resolve_parameters("ibsi").config["setting"]
    assert ibsi["resampledPixelSpacing"] == [2, 2, 2] and ibsi["interpolator"] == "sitkLinear"
    assert ibsi["binWidth"] == 25 and "binCount" not in ibsi
    assert resolve_parameters("ibsi", image="dose").config["setting"]["binWidth"] == 0.5
    assert resolve_parameters(None).name == "firstorder"


def test_bad_parameters_are_refused_early_with_the_problem(tmp_path):
    with pytest.raises(
        InputError, match="unknown radiomics preset 'firstordr'; known presets: all, firstorder, ibsi"
    ):
        resolve_parameters("firstordr")
    with pytest.raises(InputError, match="does not exist"):
        resolve_parameters(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("setting:\n  binWidth: [1, 2\n")
    with pytest.raises(InputError, match=r"broken\.yaml is not valid YAML"):
        resolve_parameters(str(broken))
    refused = tmp_path / "refused.yaml"
    refused.write_text("setting:\n  binWidth: wide\n")
    with pytest.raises(InputError, match=r"refused\.yaml: pyradiomics refuses the settings"):
        resolve_parameters(str(refused))
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text("featureClass:\n  firstorder: [Mean, Meen]\n")
    with pytest.raises(InputError, match="(unrecognized|unknown).*Meen"):
        resolve_parameters(str(misspelt))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(InputError, match="expected a mapping"):
        resolve_parameters(str(listed))
    with pytest.raises(InputError, match="unknown image"):
        resolve_parameters("firstorder", image="mri")


def test_json_file_and_dict_equal_the_yaml_preset(tmp_path):
    import yaml

    config = yaml.safe_load(preset_path("firstorder").read_text())
    as_json = tmp_path / "params.json"
    as_json.write_text(json.dumps(config))
    ct = _image(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8) * 3)
    mask_array = np.zeros((6, 7, 8), np.uint8)
    mask_array[1:5, 2:6, 2:7] = 1
    mask = _image(mask_array)
    reference = structure_features(ct, mask, "firstorder")
    assert set(reference) == {f"original_firstorder_{name}" for name in FIRST_ORDER_18}
    assert structure_features(ct, mask, str(as_json)) == reference
    params = resolve_parameters(config)
    assert structure_features(ct, mask, params) == reference
    written = params.parameter_file(tmp_path)
    assert resolve_parameters(str(written)).config == config


# ---------------------------------------------------------------------------------- exactness
def test_structure_features_equal_bare_pyradiomics_on_the_files(synthetic_cohort, tmp_path):
    folder = synthetic_cohort / "s1"
    ct, mask = folder / "ct.nrrd", folder / "structures" / "Lesion.nrrd"
    for preset in ("firstorder", "all", "ibsi"):
        ours = structure_features(sitk.ReadImage(str(ct)), sitk.ReadImage(str(mask)), preset)
        assert ours == bare_pyradiomics(ct, mask, preset_path(preset)), preset
    assert "original_shape_VoxelVolume" in ours and not any(k.startswith("diagnostics") for k in ours)


def test_patient_radiomics_equals_bare_pyradiomics_on_ct_and_dose(synthetic_cohort):
    folder = synthetic_cohort / "s2"
    patient = Patient.from_folder(folder)
    for image, image_file in (("ct", folder / "ct.nrrd"), ("dose", folder / "dose.nrrd")):
        table = patient_radiomics(patient, image, "all")
        assert list(table.columns) == ["patient", "structure", "image", "feature", "value", "reason"]
        assert (table["reason"] == "").all() and (table["image"] == image).all()
        for structure in ("Lesion", "Ring"):
            ours = table[table.structure == structure].set_index("feature")["value"].to_dict()
            bare = bare_pyradiomics(
                image_file, folder / "structures" / f"{structure}.nrrd", preset_path("all", image)
            )
            assert ours == bare, (image, structure)


def test_phantom_patient_equals_bare_pyradiomics(tmp_path):
    phantom = pytest.importorskip(
        "DeepDosimetricsLib.data.phantoms", reason="phantoms/ is not in this checkout yet"
    )
    cohort = Cohort.open(
        phantom.synthesize_cohort(tmp_path / "phantoms", patients=1, shape=(48, 48, 32), seed=0)
    )
    patient = next(iter(cohort))
    for image in ("ct",) + (("dose",) if patient.has_dose else ()):
        volume = patient.ct_image() if image == "ct" else patient.dose_image()
        image_file = tmp_path / f"{image}.nrrd"
        sitk.WriteImage(volume, str(image_file))
        table = patient_radiomics(patient, image, "firstorder")
        for structure in patient.structure_names:
            # the structure as the patient puts it on the CT grid, written as a file for pyradiomics
            mask_file = tmp_path / f"{structure}.nrrd"
            sitk.WriteImage(patient.structure_image(structure), str(mask_file))
            ours = table[table.structure == structure].set_index("feature")["value"].to_dict()
            assert ours == bare_pyradiomics(image_file, mask_file, preset_path("firstorder", image)), (
                structure
            )


def test_openkbp_patient_equals_bare_pyradiomics(openkbp_train):
    folder = openkbp_train / "pt_1"
    patient = Patient.from_folder(folder)
    table = patient_radiomics(patient, "ct", "firstorder")
    assert set(table["structure"]) == set(patient.structure_names) and (table["reason"] == "").all()
    for structure in ("PTV70", "Brainstem", "SpinalCord"):
        ours = table[table.structure == structure].set_index("feature")["value"].to_dict()
        assert ours == bare_pyradiomics(
            folder / "ct.nrrd", folder / f"{structure}.nrrd", preset_path("firstorder")
        )
    dose = patient_radiomics(patient, "dose", "all", structures=["ptv70"])
    ours = dose.set_index("feature")["value"].to_dict()
    assert ours == bare_pyradiomics(folder / "dose.nrrd", folder / "PTV70.nrrd", preset_path("all", "dose"))


# ---------------------------------------------------------------------------------- bad input
def test_structures_that_cannot_be_measured_give_reasons(synthetic_cohort):
    patient = Patient.from_folder(synthetic_cohort / "s1")
    table = patient_radiomics(patient, "ct", "firstorder")
    reasons = table[table.feature == ""].set_index("structure")["reason"]
    assert reasons["Empty"].startswith(EMPTY_STRUCTURE)
    assert reasons["Outside"].startswith(OUTSIDE_IMAGE)
    assert reasons["Dot"].startswith(TOO_SMALL) and "single voxel" in reasons["Dot"]
    assert set(table[table.feature != ""]["structure"]) == {"Lesion", "Ring"}
    assert count_failures(table) == 0


def test_structure_features_skips_on_images():
    ct = _image(np.zeros((5, 6, 7), np.int16))
    with pytest.raises(StructureSkipped, match=EMPTY_STRUCTURE):
        structure_features(ct, _image(np.zeros((5, 6, 7), np.uint8)), "firstorder")
    outside = _image(np.ones((5, 6, 7), np.uint8), origin=(500.0, 0.0, 0.0))
    with pytest.raises(StructureSkipped, match=OUTSIDE_IMAGE):
        structure_features(ct, outside, "firstorder")
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[1:4, 1:4, 1:4] = 2
    assert structure_features(ct, _image(labels), "firstorder", label=2)["original_firstorder_Mean"] == 0.0
    with pytest.raises(StructureSkipped, match=EMPTY_STRUCTURE):
        structure_features(ct, _image(labels), "firstorder", label=1)


def test_cohort_in_parallel_equals_in_process_with_no_dose_row(synthetic_cohort):
    one = cohort_radiomics(synthetic_cohort, image="dose", params="firstorder", jobs=1, quiet=True)
    two = cohort_radiomics(str(synthetic_cohort), image="dose", params="firstorder", jobs=2, quiet=True)
    pd.testing.assert_frame_equal(one, two)
    assert list(one["patient"].unique()) == ["s1", "s2", "s3"]
    no_dose = one[one.patient == "s3"]
    assert len(no_dose) == 1 and no_dose["reason"].iloc[0].startswith(NO_DOSE)
    assert math.isnan(no_dose["value"].iloc[0])


def test_wide_table_has_features_as_rows():
    from DeepDosimetricsLib.features.tables import long_table, reason_row, value_rows

    rows = value_rows("p1", "A", "ct", {"f1": 1.0, "f2": 2.0}) + value_rows(
        "p1", "B", "ct", {"f1": 3.0, "f2": 4.0}
    )
    rows.append(reason_row("p2", "A", "ct", "empty structure: x"))
    wide = to_wide(long_table(rows))
    assert list(wide.index) == ["f1", "f2"] and list(wide.columns) == ["p1/A", "p1/B"]
    assert wide.loc["f2", "p1/B"] == 4.0
    assert list(to_wide(long_table(rows), with_patient=False).columns) == ["A", "B"]


# ---------------------------------------------------------------------------------- command line
def test_radiomics_command(synthetic_cohort, tmp_path, capsys):
    out = tmp_path / "features.csv"
    assert (
        main(
            [
                "radiomics",
                "--cohort",
                str(synthetic_cohort),
                "--structures",
                "Lesion,ring",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["patient", "structure", "image", "feature", "value", "reason"]
    assert set(table["structure"]) == {"Lesion", "Ring"} and len(table) == 3 * 2 * 18
    assert "original_firstorder_Mean" in set(table["feature"])

    wide_out = tmp_path / "wide.csv"
    assert (
        main(
            [
                "radiomics",
                "--cohort",
                str(synthetic_cohort),
                "--image",
                "dose",
                "--preset",
                "all",
                "--structures",
                "Lesion",
                "--wide",
                "--quiet",
                "--out",
                str(wide_out),
            ]
        )
        == 0
    )
    wide = pd.read_csv(wide_out, index_col="feature")
    assert list(wide.columns) == ["s1/Lesion", "s2/Lesion"]
    assert "original_shape_Sphericity" in wide.index
    assert "s3: no dose" in capsys.readouterr().err

    assert main(["radiomics", "--cohort", str(synthetic_cohort), "--preset", "nope", "--out", str(out)]) == 2
    assert "known presets" in capsys.readouterr().err


def test_unreadable_patient_fails_without_stopping_the_others(synthetic_cohort, tmp_path):
    root = tmp_path / "cohort"
    root.mkdir()
    (root / "good").symlink_to(synthetic_cohort / "s2")
    bad = root / "bad"
    bad.mkdir()
    (bad / "ct.nrrd").write_bytes(b"NRRD0004\nnot really\n")
    (bad / "structures").mkdir()
    sitk.WriteImage(_image(np.ones((3, 3, 3), np.uint8)), str(bad / "structures" / "Lesion.nrrd"))
    out = tmp_path / "out.csv"
    assert main(["radiomics", "--cohort", str(root), "--quiet", "--out", str(out)]) == 1
    table = pd.read_csv(out, keep_default_na=False)
    assert table[table.patient == "bad"]["reason"].str.startswith(ERROR).all()
    assert (table[table.patient == "good"]["reason"] == "").all()


def _worker_that_cannot_start(threads: int) -> None:
    import os

    os._exit(3)


def test_a_broken_pool_finishes_in_process(synthetic_cohort, monkeypatch):
    """Workers that die at start (e.g. no fork in a host application) do not lose the cohort."""
    import DeepDosimetricsLib.runtime.pools as pools

    expected = cohort_radiomics(
        synthetic_cohort, "ct", "firstorder", structures=["Lesion"], jobs=1, quiet=True
    )
    monkeypatch.setattr(pools, "limit_worker_threads", _worker_that_cannot_start)
    table = cohort_radiomics(synthetic_cohort, "ct", "firstorder", structures=["Lesion"], jobs=2, quiet=True)
    pd.testing.assert_frame_equal(table, expected)


def test_image_radiomics_on_images_as_given(synthetic_cohort):
    """One image (not cast), several masks, one of them a labelmap value: the layout of the Slicer table."""
    from DeepDosimetricsLib.features.radiomics import image_radiomics

    folder = synthetic_cohort / "s1"
    dose = sitk.ReadImage(str(folder / "dose.nrrd"))
    lesion = sitk.ReadImage(str(folder / "structures" / "Lesion.nrrd"))
    labelmap = sitk.Cast(lesion * 3, sitk.sitkUInt8)
    empty = sitk.ReadImage(str(folder / "structures" / "Empty.nrrd"))
    table = image_radiomics(
        dose, {"Lesion": lesion, "Label3": (labelmap, 3), "Empty": empty}, "firstorder", "dose"
    )
    wide = to_wide(table, with_patient=False)
    assert list(wide.columns) == ["Lesion", "Label3"] and len(wide) == 18
    expected = bare_pyradiomics(
        folder / "dose.nrrd", folder / "structures" / "Lesion.nrrd", preset_path("firstorder", "dose")
    )
    assert wide["Lesion"].to_dict() == expected and wide["Label3"].to_dict() == expected
    assert table[table.structure == "Empty"]["reason"].iloc[0].startswith(EMPTY_STRUCTURE)


def test_pool_tasks_keep_a_patient_in_one_worker_when_patients_suffice():
    from DeepDosimetricsLib.runtime.pools import group_by_key

    patients = [pid for pid in ("a", "b", "c", "d") for _ in ("x", "y")]
    assert group_by_key(patients, workers=2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group_by_key(patients[:4], workers=2) == [[0], [1], [2], [3]]  # 2 patients: spread the structures


# ---------------------------------------------------------------------------------- other modalities
BRAIN1 = Path(__file__).resolve().parent / "data" / "pyradiomics"  # pyradiomics' MR test case (README there)


def _brain1_cohort(root: Path, header: dict | None = None) -> Path:
    """pyradiomics' brain1 MR image as ``brain1/ct.nrrd`` (``header``: metadata added), its tumour label as
    ``brain1/structures/Tumor.nrrd``."""
    import shutil

    patient = root / "brain1"
    (patient / "structures").mkdir(parents=True)
    if header:
        image = sitk.ReadImage(str(BRAIN1 / "brain1_image.nrrd"))
        for key, value in header.items():
            image.SetMetaData(key, value)
        sitk.WriteImage(image, str(patient / "ct.nrrd"), True)
    else:
        shutil.copy(BRAIN1 / "brain1_image.nrrd", patient / "ct.nrrd")
    shutil.copy(BRAIN1 / "brain1_label.nrrd", patient / "structures" / "Tumor.nrrd")
    return root


def _measured(out: Path) -> dict:
    table = pd.read_csv(out, keep_default_na=False)
    assert (table["reason"] == "").all() and set(table["image"]) == {"ct"}
    return dict(zip(table["feature"], table["value"].astype(float)))


def test_mr_radiomics_equals_pyradiomics_on_its_brain1_case(tmp_path, capsys):
    """pyradiomics' own MR case (values 0-3057): refused as an un-rescaled CT when nothing says it is an
    MR (the CT message as before); measured when --modality or its header says MR, and then every value
    equals pyradiomics run on the files with the same parameter file."""
    image, label = BRAIN1 / "brain1_image.nrrd", BRAIN1 / "brain1_label.nrrd"
    plain = _brain1_cohort(tmp_path / "plain")
    out = tmp_path / "features.csv"
    assert main(["radiomics", "--cohort", str(plain), "--quiet", "--out", str(out)]) == 1
    reason = pd.read_csv(out, keep_default_na=False)["reason"].item()
    assert reason.startswith(f"error: patient brain1: CT ({plain / 'brain1' / 'ct.nrrd'}) looks un-rescaled: no "
                             "voxel below 0 and 1 of 1638400 voxels above 3000 (maximum 3057); CT values must be "
                             "HU (air -1000): apply RescaleSlope/RescaleIntercept when exporting; if the image is "
                             "not a CT, say which modality it is (--modality MR|PT|OT")
    for preset in ("firstorder", "all"):
        assert main(["radiomics", "--cohort", str(plain), "--modality", "MR", "--preset", preset, "--quiet",
                     "--out", str(out)]) == 0
        assert _measured(out) == bare_pyradiomics(image, label, preset_path(preset)), preset
    declared = _brain1_cohort(tmp_path / "declared", {"Modality": "MR"})  # an NRRD key Modality:=MR
    assert main(["radiomics", "--cohort", str(declared), "--quiet", "--jobs", "2", "--out", str(out)]) == 0
    assert _measured(out) == bare_pyradiomics(image, label, preset_path("firstorder"))
    capsys.readouterr()
    # the data and the option disagree; an HU preset on an MR: error rows (exit 1)
    assert main(["radiomics", "--cohort", str(declared), "--modality", "CT", "--quiet", "--out", str(out)]) == 1
    assert "ct.nrrd) is MR by its header (ct.nrrd), but the modality CT was given" in capsys.readouterr().err
    assert main(["radiomics", "--cohort", str(declared), "--preset", "ibsi", "--quiet", "--out", str(out)]) == 1
    assert "the ibsi preset re-segments to [-1000, 400] HU, a CT range, but the image is MR" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        main(["radiomics", "--cohort", str(plain), "--modality", "XR", "--out", str(out)])
    assert bad.value.code == 2
    assert "unknown modality 'XR'; choose one of: auto, CT, MR, PT, OT" in capsys.readouterr().err


def test_non_finite_values_are_refused_in_every_modality(tmp_path):
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(BRAIN1 / "brain1_image.nrrd"))).astype(np.float32)
    array[12, 100:102, 100] = [np.nan, np.inf]
    for modality in ("CT", "MR", "PT", "OT"):
        image = _image(array)
        image.SetMetaData("Modality", modality)
        patient = Patient.from_images("p", image, {"Tumor": _image((array > 500).astype(np.uint8))})
        table = patient_radiomics(patient, "ct", "firstorder")
        assert patient.modality == modality
        assert table["reason"].str.contains("2 of 1638400 voxels are not finite").all(), modality
