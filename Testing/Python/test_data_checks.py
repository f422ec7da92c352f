"""Value checks where CT and dose are read, and header checks before any voxel is read (issue 12, items 1-2)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from DeepDosimetricsLib.cli import main
from DeepDosimetricsLib.data.checks import check_array, check_ct_array, check_dose_array
from DeepDosimetricsLib.data.headers import MEMORY_ENV, check_image_file, parse_memory
from DeepDosimetricsLib.data.patient import Patient
from DeepDosimetricsLib.runtime.errors import InputError


def _write(array: np.ndarray, path: Path, compress: bool = True, spacing=(2.0, 2.0, 3.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), compress)
    return path


# ------------------------------------------------------------------------------ value checks
def test_ct_checks():
    ct = np.full((4, 5, 6), -1000.0)
    ct[1:3, 1:4, 1:5] = 40
    assert check_ct_array(ct, "ct") == []
    nan = ct.copy()
    nan[0, 0, :3] = np.nan
    with pytest.raises(InputError, match=r"ct: 3 of 120 voxels are not finite"):
        check_ct_array(nan, "ct")
    raw = ct + 1024  # stored values without the rescale
    raw[2, 2, 2] = 3500
    with pytest.raises(InputError, match=r"looks un-rescaled: no voxel below 0 and 1 of 120 voxels above 3000"):
        check_ct_array(raw, "ct")
    assert "constant" in check_ct_array(np.zeros((2, 2, 2)), "ct")[0]
    with pytest.raises(InputError, match="empty"):
        check_ct_array(np.zeros((0, 2, 2)), "ct")


def test_value_checks_follow_the_modality():
    """The HU checks judge a CT only; an MR or other image has no range check, a PET's negative voxels are a
    warning; NaN and infinities are refused whatever the image."""
    bright = np.arange(4 * 5 * 6, dtype=np.float64).reshape(4, 5, 6) * 26.0  # 0..3094, an MR's range
    with pytest.raises(InputError, match=r"image looks un-rescaled: no voxel below 0 and 4 of 120 voxels above 3000"):
        check_array(bright, "image", "ct")
    for modality in ("MR", "mr", "OT", "PT", "US"):
        assert check_array(bright, "image", modality) == [], modality
    pet = bright / 100 - 0.2
    assert check_array(pet, "pet", "PT") == [
        "pet: 1 of 120 voxels are negative (down to -0.2); PET activity cannot be negative (reconstruction noise?)"]
    assert check_array(pet, "mr", "MR") == []
    assert check_array(np.full((2, 2, 2), 7.0), "mr", "MR") == ["mr is constant (7 in all 8 voxels)"]
    for kind in ("CT", "MR", "PT", "OT", "dose"):
        broken = bright.copy()
        broken[0, 0, :2] = [np.nan, -np.inf]
        with pytest.raises(InputError, match="2 of 120 voxels are not finite"):
            check_array(broken, "image", kind)
        with pytest.raises(InputError, match="is empty"):
            check_array(np.zeros((0, 3, 3)), "image", kind)
    with pytest.raises(ValueError, match="unknown image kind"):
        check_array(bright, "image", "")


def test_the_modality_comes_from_the_data_or_the_option(tmp_path: Path):
    """import.json, an NRRD or MetaImage header key, a NIfTI descrip, else --modality, else CT; the data
    and the option disagreeing is an error naming both."""
    values = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5) * 60  # 0..3540: an un-rescaled CT?

    def patient(name: str, suffix: str = ".nrrd", header: dict | None = None, option: str = "auto") -> Patient:
        folder = tmp_path / name
        image = sitk.GetImageFromArray(values)
        for key, value in (header or {}).items():
            image.SetMetaData(key, value)
        folder.mkdir()
        sitk.WriteImage(image, str(folder / f"ct{suffix}"))
        return Patient.from_folder(folder, modality=option)

    assert patient("nrrd", header={"Modality": "MR"}).modality == "MR"
    assert patient("dicom-tag", header={"0008|0060": "PT"}).modality == "PT"
    described = patient("nifti", ".nii")  # SimpleITK writes no descrip: set it in the NIfTI-1 header
    header = bytearray((tmp_path / "nifti" / "ct.nii").read_bytes())
    header[148:228] = b"Modality=MR".ljust(80, b"\0")
    (tmp_path / "nifti" / "ct.nii").write_bytes(bytes(header))
    assert Patient.from_folder(tmp_path / "nifti").modality == "MR" and described.id == "nifti"
    patient("metaimage", ".mha")  # ITK writes no Modality line either: add MetaImage's own field
    text = (tmp_path / "metaimage" / "ct.mha").read_bytes().replace(b"ElementType", b"Modality = MET_MOD_MR\nElementType")
    (tmp_path / "metaimage" / "ct.mha").write_bytes(text)
    assert Patient.from_folder(tmp_path / "metaimage").modality == "MR"
    recorded = patient("recorded", header={"Modality": "MR"})  # the import record comes first
    (tmp_path / "recorded" / "import.json").write_text('{"ct": {"file": "ct.nrrd", "modality": "PT"}}')
    assert Patient.from_folder(tmp_path / "recorded").modality == "PT" and recorded.modality == "PT"
    plain = patient("plain")
    assert plain.modality == "CT"
    with pytest.raises(InputError, match=r"plain/ct.nrrd\) looks un-rescaled: .*say which modality it is"):
        plain.ct_image()
    for option, expected in (("MR", "MR"), ("pet", "PT"), ("OTHER", "OT")):
        image = Patient.from_folder(tmp_path / "plain", modality=option).ct_image()
        assert image.GetPixelID() == sitk.sitkInt16 and sitk.GetArrayViewFromImage(image).max() == 3540
        assert Patient.from_folder(tmp_path / "plain", modality=option).modality == expected
    with pytest.raises(InputError, match=r"nrrd/ct.nrrd\) is MR by its header \(ct.nrrd\), but the modality CT was"):
        Patient.from_folder(tmp_path / "nrrd", modality="CT").ct_image()
    assert Patient.from_folder(tmp_path / "nrrd", modality="MR").modality == "MR"
    with pytest.raises(InputError, match="unknown modality 'XR'"):
        Patient.from_folder(tmp_path / "plain", modality="XR")


def test_dose_checks(monkeypatch):
    dose = np.linspace(0, 70, 120).reshape(4, 5, 6).astype(np.float32)
    assert check_dose_array(dose, "dose") == []
    bad = dose.copy()
    bad[0, 0, :4] = np.nan
    bad[1, 0, :2] = -3.0
    with pytest.raises(InputError) as error:
        check_dose_array(bad, "dose (x.nrrd)")
    assert "4 of 120 voxels are not finite" in str(error.value) and "2 voxels are negative" in str(error.value)
    with pytest.raises(InputError, match=r"1 of 120 voxels above 200 Gy .*looks like cGy"):
        check_dose_array(np.where(dose >= 70, 7000.0, dose), "dose")
    monkeypatch.setenv("DEEPDOSIMETRICS_MAX_DOSE_GY", "8000")
    assert check_dose_array(np.where(dose >= 70, 7000.0, dose), "dose") == []
    noise = dose.copy()
    noise[0, 0, 0] = -0.001
    assert "slightly negative" in check_dose_array(noise, "dose")[0]
    assert "constant" in check_dose_array(np.zeros((3, 3, 3), np.float32), "dose")[0]


@pytest.fixture()
def nan_cohort(phantom_cohort: Path, tmp_path: Path) -> Path:
    """Two phantom patients; pt_2's dose has NaN and negative voxels (as in the issue)."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    ids = sorted(p.name for p in phantom_cohort.iterdir() if p.is_dir())[:2]
    for pid in ids:
        shutil.copytree(phantom_cohort / pid, cohort / pid)
    bad = cohort / ids[1] / "dose.nrrd"
    image = sitk.ReadImage(str(bad))
    array = sitk.GetArrayFromImage(image)
    array[10:12, 20:24, 20:24] = np.nan
    array[0, 0, :5] = -2.0
    damaged = sitk.GetImageFromArray(array)
    damaged.CopyInformation(image)
    sitk.WriteImage(damaged, str(bad), True)
    return cohort


def test_nan_dose_gives_reason_rows_and_exit_1(nan_cohort: Path, tmp_path: Path, capsys):
    good, bad = sorted(p.name for p in nan_cohort.iterdir())
    out = tmp_path / "dvh.csv"
    assert main(["dvh", "--cohort", str(nan_cohort), "--quiet", "--out", str(out)]) == 1
    table = pd.read_csv(out, keep_default_na=False)
    rows = table[table["patient"] == bad]
    assert len(rows) > 0 and (rows["feature"] == "").all() and (rows["value"] == "").all()
    assert rows["reason"].str.startswith("error:").all()
    assert rows["reason"].str.contains("dose.nrrd").all() and rows["reason"].str.contains("32 of").all()
    assert rows["reason"].str.contains("5 voxels are negative").all()
    assert (table[table["patient"] == good]["reason"] == "").all()  # the good patient is measured
    assert "not finite" in capsys.readouterr().err
    out = tmp_path / "dosiomics.csv"
    assert main(["radiomics", "--cohort", str(nan_cohort), "--image", "dose", "--quiet", "--out", str(out)]) == 1
    table = pd.read_csv(out, keep_default_na=False)
    assert (table[table["patient"] == bad]["feature"] == "").all()
    out = tmp_path / "ct.csv"  # the CT of that patient is fine
    assert main(["radiomics", "--cohort", str(nan_cohort), "--quiet", "--out", str(out)]) == 0


def test_nan_dose_patient_is_refused_by_the_cache(nan_cohort: Path, tmp_path: Path):
    from DeepDosimetricsLib.deep.cache.build import ensure_cache

    good, bad = sorted(p.name for p in nan_cohort.iterdir())
    cache = ensure_cache(nan_cohort, cache_dir=tmp_path / "cache")
    assert cache.ids == [good]
    assert str(nan_cohort / bad / "dose.nrrd") in cache.failed[bad] and "not finite" in cache.failed[bad]


def test_constant_dose_is_a_warning_on_the_value_rows(tmp_path: Path):
    ct = np.full((6, 8, 8), -1000, np.int16)
    ct[1:5, 2:6, 2:6] = 30
    mask = np.zeros(ct.shape, np.uint8)
    mask[2:4, 3:5, 3:5] = 1
    folder = tmp_path / "cohort" / "p1"
    _write(ct, folder / "ct.nrrd")
    _write(np.full(ct.shape, 2.0, np.float32), folder / "dose.nrrd")
    _write(mask, folder / "structures" / "Box.nrrd")
    out = tmp_path / "dvh.csv"
    assert main(["dvh", "--cohort", str(tmp_path / "cohort"), "--quiet", "--out", str(out)]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert (table["value"] != "").all()
    assert table["reason"].str.startswith("warning: ").all() and table["reason"].str.contains("constant").all()


# ------------------------------------------------------------------------------ header checks
def _nrrd_with_header(path: Path, array: np.ndarray, replace: dict) -> Path:
    """A raw NRRD whose header lines are edited (``key: value`` replaced)."""
    _write(array, path, compress=False)
    data = path.read_bytes()
    header, payload = data.split(b"\n\n", 1)
    lines = []
    for line in header.decode().splitlines():
        key = line.split(":", 1)[0]
        lines.append(f"{key}: {replace[key]}" if key in replace else line)
    path.write_bytes("\n".join(lines).encode() + b"\n\n" + payload)
    return path


@pytest.mark.parametrize(
    "replace, message",
    [
        ({"sizes": "40000 40000 40000"}, "needing 232.8 TiB, more than"),
        ({"space directions": "(2,0,0) (0,0,0) (0,0,3)"}, "spacing|direction|cannot read"),
        ({"space directions": "(2,0,0) (1,2,0) (0,0,3)"}, "not orthonormal"),
    ],
)
def test_bad_headers_are_refused_before_reading(tmp_path: Path, replace: dict, message: str):
    path = _nrrd_with_header(tmp_path / "ct.nrrd", np.zeros((3, 4, 5), np.float32), replace)
    with pytest.raises(InputError, match=message):
        check_image_file(path, f"CT ({path})")
    with pytest.raises(InputError, match=message):
        Patient.from_folder(tmp_path).ct_image()


def test_memory_limit_is_configurable(tmp_path: Path, monkeypatch):
    path = _write(np.zeros((10, 10, 10), np.float32), tmp_path / "dose.nrrd")
    check_image_file(path, "dose")
    monkeypatch.setenv(MEMORY_ENV, "1K")
    with pytest.raises(InputError, match=rf"3.9 KiB, more than the 1.0 KiB allowed \(set \${MEMORY_ENV}"):
        check_image_file(path, "dose")
    assert parse_memory("2G") == 2 << 30 and 0 < parse_memory("0.1") < parse_memory("0.2")
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(InputError, match="expected bytes"):
        check_image_file(path, "dose")


def test_truncated_nifti_gz_is_an_error_not_garbage(tmp_path: Path):
    array = (np.arange(20 * 30 * 40).reshape(20, 30, 40) % 97).astype(np.float32)
    path = _write(array, tmp_path / "dose.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # ITK reads this without an error, half of it zeros
    with pytest.raises(InputError, match="compressed data .* are damaged"):
        check_image_file(path, "dose")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(InputError, match="damaged"):
        check_image_file(path, "dose")
    with gzip.open(path.with_name("ok.nii.gz"), "wb") as stream:  # a good stream passes
        stream.write(gzip.decompress(data))
    check_image_file(path.with_name("ok.nii.gz"), "dose")


def test_corrupt_compressed_metaimage_is_an_error(tmp_path: Path):
    array = (np.arange(20 * 30 * 40).reshape(20, 30, 40) % 97).astype(np.float32)
    path = _write(array, tmp_path / "dose.mha")
    check_image_file(path, "dose")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # ITK prints "Uncompress failed" and returns garbage voxels
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged|truncated|decodes to"):
        check_image_file(path, "dose")


def test_unreadable_entries_of_a_patient_folder_are_reported(tmp_path: Path):
    folder = tmp_path / "p1"
    ct = np.full((4, 5, 6), -1000, np.int16)
    ct[1:3, 1:4, 1:5] = 0
    _write(ct, folder / "ct.nrrd")
    (folder / "structures" / "Heart.nrrd").mkdir(parents=True)  # a folder where a file is expected
    (folder / "structures" / "Lung.nrrd").symlink_to(folder / "structures" / "Lung.nrrd")  # a loop
    patient = Patient.from_folder(folder)
    assert set(patient.structure_names) == {"Heart", "Lung"}
    with pytest.raises(InputError, match="is a folder, not an image file"):
        patient.structure("Heart")
    with pytest.raises(InputError, match="Lung.nrrd"):
        patient.structure("Lung")


# ------------------------------------------------------------------------------ the exit-code contract
def test_exit_code_contract(phantom_cohort: Path, tmp_path: Path):
    """0: measured or skipped for a reason the data give; 1: something could not be read or failed the
    checks (also an unreadable entry of the cohort folder, a patient the cache or an import refused);
    2: bad input that stops the command."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    pid = sorted(p.name for p in phantom_cohort.iterdir() if p.is_dir())[0]
    shutil.copytree(phantom_cohort / pid, cohort / pid)
    ct = sitk.ReadImage(str(cohort / pid / "ct.nrrd"))
    empty = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(ct)
    sitk.WriteImage(empty, str(cohort / pid / "structures" / "Empty.nrrd"))
    out = tmp_path / "dvh.csv"
    assert main(["dvh", "--cohort", str(cohort), "--quiet", "--out", str(out)]) == 0  # a data skip
    table = pd.read_csv(out, keep_default_na=False)
    assert table[table["structure"] == "Empty"]["reason"].str.startswith("empty structure").all()

    (cohort / "pt_loop").symlink_to(cohort / "pt_loop")  # an entry that cannot be read
    assert main(["dvh", "--cohort", str(cohort), "--quiet", "--out", str(out)]) == 1
    table = pd.read_csv(out, keep_default_na=False)
    row = table[table["patient"] == "pt_loop"]
    assert len(row) == 1 and "symbolic-link loop" in row["reason"].iloc[0] and row["value"].iloc[0] == ""
    assert main(["cache", "--cohort", str(cohort), "--cache", str(tmp_path / "cache"), "--quiet"]) == 1
    assert main(["dvh", "--cohort", str(tmp_path / "nowhere"), "--out", str(out)]) == 2


def test_unreadable_cohort_entries_are_listed(tmp_path: Path):
    from DeepDosimetricsLib.data.cohort import Cohort

    ct = np.full((4, 5, 6), -1000, np.int16)
    ct[1:3, 1:4, 1:5] = 0
    _write(ct, tmp_path / "p1" / "ct.nrrd")
    (tmp_path / "clinical.csv").mkdir()  # a folder where the clinical table is expected
    (tmp_path / "p2").symlink_to(tmp_path / "gone")  # a broken link
    (tmp_path / "p3").mkdir()
    (tmp_path / "p3" / "ct.nrrd").mkdir()  # a folder where the CT is expected: a patient that fails
    cohort = Cohort.open(tmp_path)
    assert cohort.ids == ["p1", "p3"]
    assert set(cohort.unreadable) == {"clinical.csv", "p2"} and "broken symbolic link" in cohort.unreadable["p2"]
    with pytest.raises(InputError, match="is a folder, not an image file"):
        cohort["p3"].ct_image()
