"""Every command against the one exit-code contract of the README ("exit codes" table), one test per row:

- 0: everything done, or left out for a reason the data give (a reason row) or the user chose
  (`train --skip-incomplete`);
- 1: something that should have been done could not be (an unreadable or damaged file, values failing the
  checks, a patient the cache refused): the command finishes the rest and names what it left out in its
  last lines (and its outputs: `model.json`, encode's `summary.json`, the tables' `error:` rows);
- 2: bad arguments or input that stops the command: one `error:` line, no traceback.

`test_data_checks.py::test_exit_code_contract` checks the reason rows themselves (dvh, cache).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from DeepDosimetricsLib.cli import main
from DeepDosimetricsLib.commands import COMMANDS

#: the commands that finish the rest when part of their work fails (exit code 1); the others do all or nothing
PARTIAL = {"import", "radiomics", "dvh", "cache", "train", "encode"}
TINY = dict(tile=16, batch=2, features=4, widths=[4, 8], groups=2, val_fraction=0.25, val_tiles=2, steps=2,
            steps_per_epoch=2, log_every=1, checkpoint_every=2, patience=0, seed=3, device="cpu", threads=1,
            num_workers=0)


@pytest.fixture(scope="module")
def root(phantom_cohort, tmp_path_factory) -> dict[str, Path]:
    """good: three phantom patients; refused: the same and a fourth whose dose holds NaN voxels (refused
    by the value checks, so by the cache); no_dose: the three, one without its dose; recipe: a tiny
    training configuration."""
    top = tmp_path_factory.mktemp("exit-codes")
    ids = sorted(p.name for p in phantom_cohort.iterdir() if p.is_dir())
    paths = {name: top / name for name in ("good", "refused", "no_dose")}
    for folder in paths.values():
        folder.mkdir()
        for pid in ids[:3]:
            shutil.copytree(phantom_cohort / pid, folder / pid)
    shutil.copytree(phantom_cohort / ids[3], paths["refused"] / ids[3])
    dose_path = paths["refused"] / ids[3] / "dose.nrrd"
    image = sitk.ReadImage(str(dose_path))
    array = sitk.GetArrayFromImage(image)
    array[5:7, 10:14, 10:14] = np.nan
    damaged = sitk.GetImageFromArray(array)
    damaged.CopyInformation(image)
    sitk.WriteImage(damaged, str(dose_path), True)
    (paths["no_dose"] / ids[2] / "dose.nrrd").unlink()
    paths["recipe"] = top / "tiny.yaml"
    paths["recipe"].write_text(yaml.safe_dump(TINY))
    paths["top"] = top
    paths["ids"] = ids  # type: ignore[assignment]
    return paths


@pytest.fixture(scope="module")
def model(root) -> Path:
    """A model trained (2 steps) on the good cohort."""
    out = root["top"] / "model"
    assert main(["train", "--cohort", str(root["good"]), "--cache", str(root["top"] / "cache-good"), "--out",
                 str(out), "--config", str(root["recipe"]), "--quiet"]) == 0
    return out


def _tail(capsys, lines: int) -> list[str]:
    return capsys.readouterr().out.strip().splitlines()[-lines:]


def _outcome_tables(folder: Path) -> tuple[Path, Path]:
    """A clinical table and a feature table with a signal (60 patients), as the Outcome module's Test."""
    rng = np.random.default_rng(0)
    ids = [f"pt{i:03d}" for i in range(60)]
    outcome = rng.permutation(np.tile([0, 1], 30))
    clinical, features = folder / "clinical.csv", folder / "dvh.csv"
    pd.DataFrame({"patient": ids, "age": rng.normal(60, 5, 60), "outcome": outcome}).to_csv(clinical, index=False)
    pd.DataFrame({"patient": ids, "Dmean": outcome + rng.normal(scale=0.5, size=60)}).to_csv(features, index=False)
    return clinical, features


def test_exit_code_0_everything_done_or_left_out_by_the_data_or_the_user(root, model, tmp_path, monkeypatch, capsys):
    good = str(root["good"])
    assert main(["synth", "--out", str(tmp_path / "synth"), "--patients", "1", "--shape", "24", "24", "12",
                 "--quiet"]) == 0
    assert main(["import", "folder", good, "--out", str(tmp_path / "imported"), "--quiet"]) == 0
    assert main(["radiomics", "--cohort", good, "--quiet", "--out", str(tmp_path / "radiomics.csv")]) == 0
    # a structure only some patients have: reason rows for the others, not a failure
    assert main(["dvh", "--cohort", str(root["no_dose"]), "--quiet", "--out", str(tmp_path / "dvh.csv")]) == 0
    assert pd.read_csv(tmp_path / "dvh.csv")["reason"].fillna("").str.startswith("no dose").any()
    assert main(["cache", "--cohort", good, "--cache", str(tmp_path / "cache"), "--quiet"]) == 0
    # trained without the patient that lacks a channel, as the user asked: listed, exit 0
    no_dose = root["ids"][2]
    out = tmp_path / "skip-model"
    assert main(["train", "--cohort", str(root["no_dose"]), "--cache", str(tmp_path / "cache-no-dose"), "--out",
                 str(out), "--config", str(root["recipe"]), "--skip-incomplete", "--quiet"]) == 0
    summary = json.loads((out / "model.json").read_text())["training"]
    assert list(summary["skipped_patients"]) == [no_dose] and summary["refused_patients"] == {}
    assert _tail(capsys, 2)[0] == "left out 1 patient(s) lacking a channel (--skip-incomplete):"
    encoded = tmp_path / "encoded"
    assert main(["encode", "--model", str(model), "--cohort", good, "--cache", str(root["top"] / "cache-good"),
                 "--out", str(encoded), "--reconstruct", "--no-residuals", "--quiet", "--device", "cpu"]) == 0
    assert json.loads((encoded / "summary.json").read_text())["left_out_patients"] == {}
    clinical, features = _outcome_tables(tmp_path)
    assert main(["predict", "--clinical", str(clinical), "--outcome", "outcome", "--features", f"dvh={features}",
                 "--folds", "2", "--repeats", "1", "--bootstrap", "100", "--no-report", "--quiet", "--out",
                 str(tmp_path / "predict")]) == 0

    class Station:  # the browser station, stopped at once (the real one serves until interrupted)
        def __init__(self, *args):
            pass

        def start(self, port=0):
            return None

    import DeepDosimetricsLib.review.app as review_app

    monkeypatch.setattr(review_app, "ReviewApp", Station)
    assert main(["review", "--encoding", str(encoded), "--cohort", good]) == 0


def test_exit_code_1_something_left_out_the_rest_done_and_named_last(root, model, tmp_path, capsys):
    refused, bad = str(root["refused"]), root["ids"][3]
    assert main(["dvh", "--cohort", refused, "--quiet", "--out", str(tmp_path / "dvh.csv")]) == 1
    rows = pd.read_csv(tmp_path / "dvh.csv", keep_default_na=False)
    assert rows[rows["patient"] == bad]["reason"].str.startswith("error:").all()
    assert (rows[rows["patient"] != bad]["reason"] == "").all()  # the others are measured
    assert main(["radiomics", "--cohort", refused, "--image", "dose", "--quiet", "--out",
                 str(tmp_path / "radiomics.csv")]) == 1
    capsys.readouterr()

    assert main(["cache", "--cohort", refused, "--cache", str(tmp_path / "cache"), "--quiet"]) == 1
    assert _tail(capsys, 2)[0] == "left out 1 patient(s) that could not be cached (exit code 1):"

    out = tmp_path / "model"
    assert main(["train", "--cohort", refused, "--cache", str(tmp_path / "cache"), "--out", str(out), "--config",
                 str(root["recipe"]), "--quiet"]) == 1
    last = _tail(capsys, 2)
    assert last[0] == "left out 1 patient(s) refused by the cache (exit code 1):"
    assert last[1].startswith(f"  {bad}: ") and "dose.nrrd" in last[1] and "not finite" in last[1]
    summary = json.loads((out / "model.json").read_text())["training"]
    assert list(summary["refused_patients"]) == [bad] and "not finite" in summary["refused_patients"][bad]
    assert bad not in summary["train_patients"] + summary["val_patients"]
    assert len(summary["train_patients"] + summary["val_patients"]) == 3  # trained on the others
    assert (out / "model.pt").is_file()

    encoded = tmp_path / "encoded"
    assert main(["encode", "--model", str(model), "--cohort", refused, "--cache", str(tmp_path / "cache"),
                 "--out", str(encoded), "--quiet", "--device", "cpu"]) == 1
    last = _tail(capsys, 2)
    assert last[0].startswith("left out 1 patient(s)") and last[1].startswith(f"  {bad}: not cached: ")
    summary = json.loads((encoded / "summary.json").read_text())
    assert list(summary["left_out_patients"]) == [bad] and "not finite" in summary["left_out_patients"][bad]
    assert sorted(summary["patients_encoded"]) == root["ids"][:3]
    assert set(pd.read_csv(encoded / "features.csv")["patient"]) == set(root["ids"][:3])

    source = tmp_path / "source"
    shutil.copytree(root["good"], source)
    (source / root["ids"][0] / "ct.nrrd").write_bytes(b"NRRD0004\ntype: garbage\n\n")  # a damaged CT
    assert main(["import", "folder", str(source), "--out", str(tmp_path / "imported"), "--quiet"]) == 1
    assert _tail(capsys, 1)[0].startswith(f"  skipped {root['ids'][0]}: ")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_exit_code_2_bad_input_stops_the_command(command, tmp_path, capsys):
    nowhere = str(tmp_path / "nowhere")
    argv = {
        "synth": ["synth", "--out", nowhere, "--patients", "0"],
        "import": ["import", "folder", nowhere, "--out", str(tmp_path / "out")],
        "radiomics": ["radiomics", "--cohort", nowhere, "--out", str(tmp_path / "r.csv")],
        "dvh": ["dvh", "--cohort", nowhere, "--out", str(tmp_path / "d.csv")],
        "cache": ["cache", "--cohort", nowhere, "--cache", str(tmp_path / "cache")],
        "train": ["train", "--cohort", nowhere, "--out", str(tmp_path / "model"), "--steps", "1"],
        "encode": ["encode", "--model", nowhere, "--cohort", nowhere, "--out", str(tmp_path / "enc")],
        "review": ["review", "--encoding", nowhere, "--cohort", nowhere],
        "predict": ["predict", "--clinical", str(tmp_path / "nowhere.csv"), "--outcome", "y", "--features",
                    f"dvh={tmp_path / 'none.csv'}", "--out", str(tmp_path / "p")],
        "federated": ["federated", "local", "--site", f"A={nowhere}", "--out", str(tmp_path / "fed")],
    }[command]
    assert main(argv) == 2
    printed = capsys.readouterr()
    assert printed.err.startswith("error: ") and len(printed.err.strip().splitlines()) == 1, printed.err
    assert "Traceback" not in printed.out + printed.err
    with pytest.raises(SystemExit) as stop:  # an unknown option: argparse's own exit code 2
        main([*argv, "--no-such-option"])
    assert stop.value.code == 2


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_help_states_the_contract(command, capsys):
    """Each command's --help ends with its reading of the table: 0 and 2 always, 1 for the commands that
    finish the rest when part of their work fails."""
    argv = ["import", "folder"] if command == "import" else [command]
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit code 0: " in text and "Exit code 2: bad arguments or input that stops the command" in text
    assert ("Exit code 1: " in text) == (command in PARTIAL)
