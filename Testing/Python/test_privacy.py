"""Pseudonymised import and identifiers that never reach an output (issue 12, item 4), and the one
file-system-safe patient id mapping shared by folders and clinical.csv (item 8)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from DeepDosimetricsLib.cli import main
from DeepDosimetricsLib.data.cohort import Cohort
from DeepDosimetricsLib.data.ids import MAX_ID_BYTES, safe_patient_id
from DeepDosimetricsLib.data.pseudonym import Pseudonymizer
from dicomrt import ACCESSION, BIRTH_DATE, INSTITUTION, NAME, PATIENT_ID, write_patient

#: what must never appear in any output byte (in every mode)
SECRETS = [NAME, "Rossi", "Mariagrazia", "Rossi Mariagrazia", BIRTH_DATE, ACCESSION, INSTITUTION]


def all_bytes(*folders: Path) -> dict:
    """Every file under the folders (links followed: a linked source file is an output too) -> bytes."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                found[path] = path.read_bytes()
    return found


def leaks(outputs: dict, texts: list, secrets: list) -> list:
    """(where, secret) for every secret found, case-insensitively, in a file's bytes or in a text."""
    found = []
    for secret in secrets:
        needle = secret.lower().encode()
        found += [(str(path), secret) for path, data in outputs.items() if needle in data.lower()]
        found += [("captured text", secret) for text in texts if secret.lower() in text.lower()]
        found += [("a file name", secret) for path in outputs if secret.lower() in str(path).lower()]
    return found


@pytest.fixture(scope="module")
def dicom_source(tmp_path_factory) -> Path:
    return write_patient(tmp_path_factory.mktemp("archive") / "export")


def _run(argv: list, capsys, caplog) -> tuple:
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        code = main(argv)
    captured = capsys.readouterr()
    return code, [captured.out, captured.err, caplog.text]


def _analyse(cohort: Path, results: Path, capsys, caplog) -> list:
    """dvh and radiomics on the imported cohort; their captured output."""
    texts = []
    for argv in (["dvh", "--cohort", str(cohort), "--quiet", "--out", str(results / "dvh.csv")],
                 ["radiomics", "--cohort", str(cohort), "--quiet", "--out", str(results / "radiomics.csv")]):
        code, captured = _run(argv, capsys, caplog)
        assert code == 0, captured
        texts += captured
    return texts


@pytest.mark.parametrize("pseudonymised", [False, True], ids=["plain", "pseudonymised"])
def test_no_identifier_reaches_any_output(dicom_source: Path, tmp_path: Path, capsys, caplog, pseudonymised):
    cohort, results, key = tmp_path / "cohort", tmp_path / "results", tmp_path / "private" / "key.json"
    argv = ["import", "dicom", str(dicom_source), "--out", str(cohort), "--quiet"]
    if pseudonymised:
        argv += ["--pseudonymize", str(key)]
    code, texts = _run(argv, capsys, caplog)
    assert code == 0, texts
    (pid,) = [p.name for p in cohort.iterdir() if p.is_dir()]
    record = json.loads((cohort / pid / "import.json").read_text())
    assert set(record["structures"]) == {"Body", "PTV"} and record["dose"]
    texts += _analyse(cohort, results, capsys, caplog)
    outputs = all_bytes(cohort, results)
    assert len(outputs) >= 6
    secrets = SECRETS + ([PATIENT_ID, str(dicom_source)] if pseudonymised else [])
    assert leaks(outputs, texts, secrets) == []
    if pseudonymised:
        assert pid.startswith("anon-") and record["pseudonymised"]
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert json.loads(key.read_text())["pseudonyms"] == {pid: PATIENT_ID}
    else:
        assert pid == PATIENT_ID


def test_pseudonyms_are_stable_with_the_key_and_differ_without_it(dicom_source: Path, tmp_path: Path):
    key = tmp_path / "key.json"
    ids = []
    for index, key_file in enumerate([key, key, tmp_path / "other.json"]):
        out = tmp_path / f"cohort{index}"
        assert main(["import", "dicom", str(dicom_source), "--out", str(out), "--quiet",
                     "--pseudonymize", str(key_file)]) == 0
        ids.append([p.name for p in out.iterdir() if p.is_dir()][0])
    assert ids[0] == ids[1] != ids[2]
    assert Pseudonymizer(key).pseudonym(PATIENT_ID) == ids[0]
    with pytest.raises(Exception, match="must not lie inside the cohort"):
        from DeepDosimetricsLib.data.importers import ImportOptions

        ImportOptions(out=tmp_path / "c", pseudonymize=tmp_path / "c" / "key.json")


def _folder_source(root: Path) -> Path:
    """Two patients with awkward ids, NRRD headers carrying identifying keys, and a clinical table."""
    ct = np.full((4, 8, 8), -1000, np.int16)
    ct[1:3, 2:6, 2:6] = 30
    ptv = np.zeros(ct.shape, np.uint8)
    ptv[1:3, 3:5, 3:5] = 1
    ids = ["Pt 001", "Pt/002 ü" if os.sep != "/" else "Pté 002", "x" * 90]
    for pid in ids:
        folder = root / pid
        folder.mkdir(parents=True)
        for name, array in (("ct", ct), ("PTV", ptv)):
            image = sitk.GetImageFromArray(array)
            image.SetMetaData("PatientName", NAME)
            image.SetMetaData("0008|0080", INSTITUTION)
            sitk.WriteImage(image, str(folder / f"{name}.nrrd"))
    pd.DataFrame({"patient": ids, "Name": [NAME] * 3, "age": [60, 70, 80]}).to_csv(root / "clinical.csv",
                                                                                  index=False)
    return root


@pytest.mark.parametrize("pseudonymised", [False, True], ids=["plain", "pseudonymised"])
def test_folder_import_ids_clinical_and_header_keys(tmp_path: Path, capsys, caplog, pseudonymised):
    source = _folder_source(tmp_path / "source")
    cohort = tmp_path / "cohort"
    argv = ["import", "folder", str(source), "--out", str(cohort), "--quiet"]
    if pseudonymised:
        argv += ["--pseudonymize", str(tmp_path / "key.json")]
    code, texts = _run(argv, capsys, caplog)
    assert code == 0, texts
    opened = Cohort.open(cohort)
    clinical = opened.clinical
    assert sorted(clinical["patient"]) == sorted(opened.ids)  # no clinical row orphaned
    if pseudonymised:
        assert all(pid.startswith("anon-") for pid in opened.ids) and "Name" not in clinical.columns
        secrets = [NAME, INSTITUTION, "Pt 001", "Pt_001", "x" * 20]
    else:
        assert opened.ids == ["Pt_001", "Pté_002", safe_patient_id("x" * 90)]
        secrets = [INSTITUTION, "PatientName"]  # stripped from the NRRD headers (no link to the source)
    assert leaks(all_bytes(*(cohort / pid for pid in opened.ids)), texts, secrets) == []


def test_safe_patient_id():
    assert safe_patient_id("Pt 001") == "Pt_001"
    assert safe_patient_id(" a/b\\c:d*e ") == "a_b_c_d_e"
    assert safe_patient_id("ﬁle") == "file"  # NFKC
    assert safe_patient_id("Cafe\u0301") == safe_patient_id("Café")  # one id however it was typed
    assert safe_patient_id("..") == "unnamed" and safe_patient_id("CON") == "CON_"
    long = safe_patient_id("y" * 200)
    assert len(long.encode()) <= MAX_ID_BYTES and long == safe_patient_id("y" * 200) != safe_patient_id("y" * 201)
    for text in ("Pt 001", "y" * 200, "Pté/ 3", "CON"):
        assert safe_patient_id(safe_patient_id(text)) == safe_patient_id(text)


def test_clinical_rows_with_source_ids_match_the_folders(tmp_path: Path):
    folder = tmp_path / "cohort" / "Pt_001"
    ct = np.full((4, 8, 8), -1000, np.int16)
    ct[1:3, 2:6, 2:6] = 30
    folder.mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(ct), str(folder / "ct.nrrd"))
    pd.DataFrame({"patient": ["Pt 001"], "age": [60]}).to_csv(tmp_path / "cohort" / "clinical.csv", index=False)
    assert list(Cohort.open(tmp_path / "cohort").clinical["patient"]) == ["Pt_001"]


def _openkbp_patient(folder: Path) -> None:
    """A tiny synthetic OpenKBP sparse-CSV patient."""
    folder.mkdir(parents=True)
    inside = np.arange(1000, 5000)
    pd.DataFrame({"data": np.full(inside.size, 1064.0)}, index=inside).to_csv(folder / "ct.csv")
    pd.DataFrame({"data": np.linspace(1, 60, inside.size)}, index=inside).to_csv(folder / "dose.csv")
    pd.DataFrame({"data": [np.nan] * 50}, index=inside[:50]).to_csv(folder / "PTV70.csv")
    (folder / "voxel_dimensions.csv").write_text("3.5\n3.5\n2\n")


def test_openkbp_import_pseudonymised(tmp_path: Path):
    """The OpenKBP importer names patients by their pseudonyms too (a tiny synthetic sparse-CSV patient)."""
    _openkbp_patient(tmp_path / "source" / "pt_7")
    key, cohort = tmp_path / "key.json", tmp_path / "cohort"
    assert main(["import", "openkbp", str(tmp_path / "source"), "--out", str(cohort), "--quiet",
                 "--pseudonymize", str(key)]) == 0
    (pid,) = [p.name for p in cohort.iterdir() if p.is_dir()]
    assert pid == Pseudonymizer(key).pseudonym("pt_7")
    assert leaks(all_bytes(cohort), [], ["pt_7", str(tmp_path / "source")]) == []


def _tree(folder: Path) -> dict:
    """Every entry under a cohort: relative path -> bytes (a link: its target and the bytes it leads to)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder))
        if path.is_symlink():
            found[relative] = ("link", os.readlink(path), path.read_bytes())
        elif path.is_file():
            found[relative] = path.read_bytes()
    return found


def _sources(root: Path) -> dict:
    """A source per importer, each with 2-3 patients (the folder one also a patient without a CT)."""
    folder = _folder_source(root / "folder")
    (folder / "Pt 004").mkdir()
    (folder / "Pt 004" / "notes.txt").write_text("no image here")
    write_patient(root / "dicom" / "a", frame="1.9.1")
    write_patient(root / "dicom" / "b", frame="1.9.2")  # same PatientID, another frame: a second patient
    for name in ("pt_1", "pt_2"):
        _openkbp_patient(root / "openkbp" / name)
    return {"folder": folder, "dicom": root / "dicom", "openkbp": root / "openkbp"}


@pytest.mark.parametrize("kind", ["folder", "dicom", "openkbp"])
def test_parallel_import_equals_one_process(kind: str, tmp_path: Path):
    """`import --jobs 2` and `--scheduler local:2` write the cohort (every file, byte for byte), the report
    and the key file of `--jobs 1`; only the importing process holds the key and writes the key file."""
    source = _sources(tmp_path / "source")[kind]
    Pseudonymizer(tmp_path / "key.json")  # one key for every run, so the pseudonyms can be compared
    runs = {"jobs1": ["--jobs", "1"], "jobs2": ["--jobs", "2"]}
    if kind != "openkbp" and importlib.util.find_spec("distributed") is not None:  # (openkbp: slow grids)
        runs["local2"] = ["--scheduler", "local:2"]
    trees, keys, codes = {}, {}, {}
    for name, options in runs.items():
        key = tmp_path / "keys" / name / "key.json"
        key.parent.mkdir(parents=True)
        shutil.copy2(tmp_path / "key.json", key)
        cohort = tmp_path / name
        codes[name] = main(["import", kind, str(source), "--out", str(cohort), "--quiet",
                            "--pseudonymize", str(key), *options])
        trees[name], keys[name] = _tree(cohort), key.read_bytes()
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    expected = trees.pop("jobs1")
    patients = sorted({p.split("/")[0] for p in expected if p.startswith("anon-")})
    assert len(patients) >= 2 and "import_report.csv" in expected
    assert leaks({Path(k): v if isinstance(v, bytes) else v[2] for k, v in expected.items()}, [],
                 SECRETS + [str(source)]) == []
    for name, tree in trees.items():
        assert sorted(tree) == sorted(expected), name
        assert [p for p in tree if tree[p] != expected[p]] == [], name
        assert keys[name] == keys["jobs1"] and codes[name] == codes["jobs1"], name
    mapping = json.loads(keys["jobs1"])["pseudonyms"]  # (dicom: <pseudonym>_1, _2 for two frames)
    assert all(any(p == name or p.startswith(name + "_") for name in mapping) for p in patients)


def test_imports_sharing_a_key_file_keep_each_others_pseudonyms(tmp_path: Path):
    """Two imports with one key file: each save merges the mapping on disk (under the key file's lock)."""
    key = tmp_path / "key.json"
    first, second = Pseudonymizer(key), Pseudonymizer(key)  # both loaded before either saved
    a, b = first.pseudonym("patient A"), second.pseudonym("patient B")
    first.save()
    second.save()
    assert json.loads(key.read_text())["pseudonyms"] == {a: "patient A", b: "patient B"}
    assert Pseudonymizer(key).mapping == {a: "patient A", b: "patient B"}


def test_worker_options_carry_no_key(tmp_path: Path):
    """What a patient task receives (pickled for a worker) holds no pseudonym key; the ids it needs were
    named by the importing process, and its redactor removes the same identifiers."""
    import pickle

    from DeepDosimetricsLib.data.importers import ImportOptions

    options = ImportOptions(out=tmp_path / "cohort", pseudonymize=tmp_path / "key.json")
    pid = options.patient_id(PATIENT_ID, "Rossi_Mariagrazia")
    options.redact.add(NAME)
    secret = json.loads((tmp_path / "key.json").read_text())["key"]
    for worker in (options.for_worker(), pickle.loads(pickle.dumps(options))):
        assert worker.pseudonymizer is None and worker.pseudonymised
        assert secret.encode() not in pickle.dumps(worker)
        assert worker.redact(f"/x/{PATIENT_ID}/Rossi Mariagrazia") == f"/x/{pid}/[removed]"
