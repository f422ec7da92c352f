"""Property-based tests of the readers (issue 12, item 3), with Hypothesis.

1. Damaged inputs: mutated NRRD headers, truncated or corrupted gzip payloads (NRRD, NIfTI), DICOM files
   with missing or garbled tags. Each gives a DeepDosimetricsError (or, for an import, a skipped patient
   with a reason), within the per-example deadline, never another exception and never a hang; what is read
   without an error equals what was written (a damaged stream never becomes numbers).
2. Random geometries: a ball mask and a Gaussian dose on a grid of random spacing, origin and direction,
   put on the CT grid: the mask's physical volume and the dose integral are preserved within tolerance.

Example counts come from the Hypothesis profile (conftest.py): "ci" by default (25 examples; the file runs in about
20 s on 2 shared cores), `--hypothesis-profile nightly` for many more.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

hypothesis = pytest.importorskip("hypothesis")
from DeepDosimetricsLib.data.patient import Patient  # noqa: E402
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError  # noqa: E402
from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# a hang fails the test instead of stalling the suite: 120 s for the "ci" profile, more for more examples
pytestmark = pytest.mark.timeout(60 + 5 * hypothesis.settings.default.max_examples)

SHAPE = (6, 7, 8)  # z, y, x
ORIGINAL = ((np.arange(np.prod(SHAPE)).reshape(SHAPE) % 23) * 3.0 - 1000.0).astype(np.float32)


def _read_patient(folder: Path) -> None:
    """Read everything of a patient folder; DeepDosimetricsError is the only allowed failure."""
    patient = Patient.from_folder(folder)
    patient.ct_image()
    if patient.has_dose:
        patient.dose()
    for name in patient.structure_names:
        patient.structure(name)


def _image_bytes(suffix: str, compress: bool) -> bytes:
    image = sitk.GetImageFromArray(ORIGINAL)
    image.SetSpacing((1.5, 1.5, 3.0))
    image.SetOrigin((-5.0, 3.0, 10.0))
    path = Path(f"/tmp/.dd-fuzz-{id(image)}{suffix}")
    try:
        sitk.WriteImage(image, str(path), compress)
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


NRRD_RAW = _image_bytes(".nrrd", False)
NRRD_GZIP = _image_bytes(".nrrd", True)
NIFTI_GZ = _image_bytes(".nii.gz", True)

# ------------------------------------------------------------------------------ NRRD headers
HEADER_KEYS = ["type", "dimension", "sizes", "space directions", "space origin", "encoding", "endian", "kinds",
               "space"]
junk_values = st.one_of(
    st.sampled_from(["0 0 0", "-1 7 8", "8 7", "1e12 1e12 1e12", "nan nan nan", "(0,0,0) (0,1,0) (0,0,1)",
                     "(1,0,0) (1,0,0) (0,0,1)", "(1,0,0) (0,1,0)", "(nan,0,0) (0,1,0) (0,0,1)", "(inf,1,2)",
                     "none none none", "float", "double", "uchar", "gzip", "bzip2", "hex", "ascii", "big",
                     "4", "2", "0", "-3", "99999999999999999999", "", "\t", "(1,0,0) (0,1,0) (0,0,-1)",
                     "right-anterior-superior", "domain domain", "8 7 6", "3000 3000 3000"]),
    st.text(alphabet=st.characters(codec="ascii", exclude_characters="\n\r"), max_size=30),
)


def _mutate_header(data: bytes, changes: dict) -> bytes:
    header, payload = data.split(b"\n\n", 1)
    lines = []
    for line in header.decode("latin-1").split("\n"):
        key = line.split(":", 1)[0]
        if key in changes:
            if changes[key] is not None:
                lines.append(f"{key}: {changes[key]}")
        else:
            lines.append(line)
    return "\n".join(lines).encode("latin-1") + b"\n\n" + payload


@given(changes=st.dictionaries(st.sampled_from(HEADER_KEYS), st.one_of(st.none(), junk_values),
                               min_size=1, max_size=3),
       compressed=st.booleans())
def test_mutated_nrrd_headers(tmp_path_factory, changes, compressed):
    folder = tmp_path_factory.mktemp("nrrd") / "p"
    folder.mkdir()
    (folder / "ct.nrrd").write_bytes(_mutate_header(NRRD_GZIP if compressed else NRRD_RAW, changes))
    try:
        _read_patient(folder)
    except DeepDosimetricsError:
        pass


# ------------------------------------------------------------------------------ gzip payloads
@given(kind=st.sampled_from(["nrrd", "nii.gz"]), data=st.data())
def test_truncated_or_corrupted_gzip_never_becomes_numbers(tmp_path_factory, kind, data):
    original = NRRD_GZIP if kind == "nrrd" else NIFTI_GZ
    start = original.index(b"\n\n") + 2 if kind == "nrrd" else 0  # the gzip stream
    damaged = bytearray(original)
    action = data.draw(st.sampled_from(["truncate", "flip", "both"]))
    if action in ("flip", "both"):
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(start, len(damaged) - 1))
            damaged[position] ^= data.draw(st.integers(1, 255))
    if action in ("truncate", "both"):
        damaged = damaged[: data.draw(st.integers(start, len(damaged) - 1))]
    assume(bytes(damaged) != original)
    folder = tmp_path_factory.mktemp("gz") / "p"
    folder.mkdir()
    (folder / f"ct.{kind}").write_bytes(bytes(damaged))
    try:
        ct = sitk.GetArrayFromImage(Patient.from_folder(folder).ct_image())
    except DeepDosimetricsError:
        return
    # read without an error: then it must be the image that was written (e.g. only the gzip header's
    # modification time or OS byte were hit), never garbage
    np.testing.assert_array_equal(ct, np.rint(ORIGINAL).astype(np.int16))


# ------------------------------------------------------------------------------ DICOM tags
DICOM_MUTATIONS = {
    "ct": ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept",
           "Rows", "Columns", "PixelData", "NumberOfFrames", "GantryDetectorTilt"],
    "rd": ["ImagePositionPatient", "PixelSpacing", "DoseGridScaling", "GridFrameOffsetVector", "NumberOfFrames",
           "Rows", "PixelData", "DoseUnits", "ImageOrientationPatient"],
    "rs": ["ContourData", "ROINumber", "ReferencedROINumber", "ROIContourSequence", "StructureSetROISequence",
           "ReferencedFrameOfReferenceSequence"],
}
GARBAGE = st.sampled_from(["", "abc", "1\\2", "nan\\nan\\nan", "0\\0", "-1\\-1", "1e308\\1e308\\1e308", "0",
                           "-5", "1\\0\\0\\1\\0\\0", "inf", "1\\2\\3\\4\\5\\6\\7", "CGY", "RELATIVE", "99999"])


def _mutate_dicom(path: Path, keyword: str, action: str, value: str) -> None:
    import pydicom
    from pydicom import config

    dataset = pydicom.dcmread(str(path))
    targets = [dataset]
    if keyword in ("ContourData", "ReferencedROINumber"):
        targets = [roi for roi in dataset.ROIContourSequence]
        if keyword == "ContourData":
            targets = [c for roi in targets for c in roi.ContourSequence]
    elif keyword == "ROINumber":
        targets = list(dataset.StructureSetROISequence)
    saved = config.settings.writing_validation_mode, config.settings.reading_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    config.settings.reading_validation_mode = config.IGNORE
    try:
        for target in targets[:1] if action != "all" else targets:
            if keyword not in target:
                continue
            if action == "delete":
                delattr(target, keyword)
            elif keyword == "PixelData":
                target.PixelData = target.PixelData[: len(target.PixelData) // 3]
            elif target[keyword].VR == "SQ":
                setattr(target, keyword, [])
            else:
                element = target[keyword]
                if element.VR in ("US", "UL", "SS", "SL", "FL", "FD"):
                    element.value = 0
                else:  # written as given, bypassing pydicom's conversion (a garbled file)
                    element._value = value
        dataset.save_as(str(path))
    finally:
        config.settings.writing_validation_mode, config.settings.reading_validation_mode = saved


@pytest.fixture(scope="module")
def dicom_patient(tmp_path_factory) -> Path:
    from dicomrt import write_patient

    return write_patient(tmp_path_factory.mktemp("dicom") / "export")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the values garbled on purpose
@given(file=st.sampled_from(["ct", "rd", "rs"]), data=st.data())
def test_dicom_with_missing_or_garbled_tags(dicom_patient, tmp_path_factory, file, data):
    import shutil

    from DeepDosimetricsLib.data.importers import ImportOptions
    from DeepDosimetricsLib.data.importers.dicom import import_dicom

    keyword = data.draw(st.sampled_from(DICOM_MUTATIONS[file]))
    action = data.draw(st.sampled_from(["delete", "garble", "all"]))
    value = data.draw(GARBAGE)
    root = tmp_path_factory.mktemp("dicom-fuzz")
    source = root / "export"
    shutil.copytree(dicom_patient, source)
    files = sorted(source.rglob(f"{file}*.dcm"))
    _mutate_dicom(files[data.draw(st.integers(0, len(files) - 1))], keyword, action, value)
    try:
        report = import_dicom(source, ImportOptions(out=root / "cohort", quiet=True))
    except DeepDosimetricsError:
        return
    for entry in report.entries:
        assert entry.ok or entry.reason, entry  # a skipped patient always says why
        if entry.ok:  # what was imported reads back as a valid patient
            _read_patient(root / "cohort" / entry.patient)


# ------------------------------------------------------------------------------ random geometries
def _rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _grid(spacing, direction, centre, half_extent_mm) -> sitk.Image:
    """An image grid of the given spacing and direction covering a cube of half_extent_mm around centre."""
    size = [int(np.ceil(2 * half_extent_mm / s)) + 1 for s in spacing]
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    middle = direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    image.SetOrigin([float(v) for v in np.asarray(centre) - middle])
    return image


def _centres(image: sitk.Image) -> np.ndarray:
    """LPS coordinates of the voxel centres, shape (z, y, x, 3)."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(float)
    matrix = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    return index @ matrix.T + np.asarray(image.GetOrigin())


def _on(grid: sitk.Image, array: np.ndarray, pixel_id) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return sitk.Cast(image, pixel_id)


spacings = st.tuples(*[st.floats(0.8, 2.5) for _ in range(3)])
angles = st.tuples(*[st.floats(-np.pi, np.pi) for _ in range(3)])
shifts = st.tuples(*[st.floats(-3.0, 3.0) for _ in range(3)])


@given(ct_spacing=spacings, native_spacing=spacings, native_angles=angles, ct_angles=angles, shift=shifts,
       ct_rotated=st.booleans())
@hypothesis.example(ct_spacing=(1.0, 1.0, 1.0), native_spacing=(1.0, 1.0, 1.88), ct_angles=(0.0, 0.0, 0.0),
                    native_angles=(0.0, 2.2250738585072014e-308, 0.0), shift=(0.0, 0.0, 0.0), ct_rotated=False)
def test_resampling_preserves_mask_volume_and_dose_integral(ct_spacing, native_spacing, native_angles,
                                                            ct_angles, shift, ct_rotated):
    radius, sigma, peak = 14.0, 8.0, 60.0
    centre = np.array([10.0, -20.0, 35.0])
    ct_direction = _rotation(ct_angles) if ct_rotated else np.eye(3)
    ct_grid = _grid(ct_spacing, ct_direction, centre + np.asarray(shift), 40.0)
    native = _grid(native_spacing, _rotation(native_angles), centre, 40.0)

    native_points = _centres(native)
    distance2 = ((native_points - centre) ** 2).sum(axis=-1)
    ball = (distance2 <= radius**2).astype(np.uint8)
    dose = (peak * np.exp(-distance2 / (2 * sigma**2))).astype(np.float32)
    ct = np.full(ct_grid.GetSize()[::-1], -1000, np.int16)
    ct[ct.shape[0] // 2] = 40
    patient = Patient.from_images("fuzz", _on(ct_grid, ct, sitk.sitkInt16),
                                  {"Ball": _on(native, ball, sitk.sitkUInt8)}, _on(native, dose, sitk.sitkFloat32))

    ct_voxel = float(np.prod(ct_spacing))
    native_voxel = float(np.prod(native_spacing))
    exact_volume = 4.0 / 3.0 * np.pi * radius**3
    native_volume = float(ball.sum()) * native_voxel
    volume = float(patient.structure("Ball").sum()) * ct_voxel
    # nearest-neighbour sampling of a voxelised ball: the error lies in a shell about one voxel thick
    shell = 4 * np.pi * radius**2 * 0.5 * (max(ct_spacing) + max(native_spacing))
    assert abs(volume - native_volume) <= 0.5 * shell, (volume, native_volume, exact_volume)
    assert abs(volume - exact_volume) <= 0.5 * shell + abs(native_volume - exact_volume)

    exact_integral = peak * (2 * np.pi * sigma**2) ** 1.5
    native_integral = float(dose.sum(dtype=np.float64)) * native_voxel
    integral = float(patient.dose().sum(dtype=np.float64)) * ct_voxel
    assert abs(native_integral - exact_integral) / exact_integral < 0.01
    assert abs(integral - native_integral) / native_integral < 0.02, (integral, native_integral)


def test_gzip_fixtures_are_valid(tmp_path: Path):
    """The undamaged payloads used above read back exactly (so a failure above is the damage's)."""
    for name, payload in (("ct.nrrd", NRRD_GZIP), ("ct.nii.gz", NIFTI_GZ)):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_bytes(payload)
        ct = sitk.GetArrayFromImage(Patient.from_folder(folder).ct_image())
        np.testing.assert_array_equal(ct, np.rint(ORIGINAL).astype(np.int16))
    assert gzip.decompress(NIFTI_GZ)
