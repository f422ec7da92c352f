"""Issue 17 item 3: shipped pre-trained models: names that stand for folders, checked weights, the card."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch
from DeepDosimetricsLib.deep import shipped
from DeepDosimetricsLib.deep.model import ModelConfig, TileAutoencoder, file_sha256, load_model, save_model
from DeepDosimetricsLib.runtime.errors import InputError

CHANNELS = ["window:soft_tissue", "mask:PTV", "dose"]


def ship(folder, name):
    """A tiny model shipped under ``folder/name`` the way Utilities/ship_model.py ships one."""
    config = ModelConfig(channels=CHANNELS, tile=8, features=3, widths=[4], groups=2)
    target = folder / name
    save_model(target, TileAutoencoder(config), config)
    meta = json.loads((target / "model.json").read_text())
    meta["weights_sha256"] = file_sha256(target / "model.pt")
    (target / "model.json").write_text(json.dumps(meta))
    return target


def test_a_shipped_name_stands_for_its_folder_and_its_weights_are_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "SHIPPED_MODELS_DIR", tmp_path / "models")
    folder = ship(tmp_path / "models", "tiny-hn")
    assert shipped.shipped_models() == {"tiny-hn": folder}
    monkeypatch.chdir(tmp_path)
    model, config = load_model("tiny-hn")
    assert config.features == 3
    # a user's folder of the same name wins over the shipped model
    own = ship(tmp_path, "tiny-hn-own")
    (tmp_path / "tiny-hn-own").rename(tmp_path / "tiny-hn")
    assert shipped.resolve_model("tiny-hn").resolve() == (tmp_path / "tiny-hn").resolve() != folder
    (tmp_path / "tiny-hn").rename(own)
    # an unknown name names the shipped models
    with pytest.raises(InputError, match="shipped models: tiny-hn"):
        load_model("no-such-model")
    # damaged weights are refused before they are read
    weights = folder / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="SHA-256"):
        load_model("tiny-hn")


@pytest.fixture(scope="module")
def head_and_neck():
    models = shipped.shipped_models()
    assert "openkbp-hn" in models, "the pre-trained head-and-neck encoder is shipped in the repository"
    return models["openkbp-hn"]


def test_the_shipped_head_and_neck_encoder_loads_and_its_card_states_its_checksum(head_and_neck):
    meta = json.loads((head_and_neck / "model.json").read_text())
    digest = file_sha256(head_and_neck / "model.pt")
    assert meta["weights_sha256"] == digest
    card = (head_and_neck / shipped.MODEL_CARD).read_text()
    assert digest in card
    for heading in ("Data", "Recipe", "Fidelity", "NTCP", "Intended use", "Limits"):
        assert re.search(rf"^#+ .*{heading}", card, re.MULTILINE | re.IGNORECASE), heading
    model, config = load_model("openkbp-hn")
    assert config.pca_start and config.channels == CHANNELS
    assert (head_and_neck / "model.pt").stat().st_size < 8 * 2**20  # a few MB
    x = torch.rand(2, 3, config.tile, config.tile, config.tile)
    with torch.no_grad():
        assert torch.isfinite(model.decode(model.encode(x))).all()


def test_the_extension_installs_every_file_of_the_shipped_model(head_and_neck):
    module = head_and_neck.parents[3]
    listed = (module / "CMakeLists.txt").read_text()
    for path in head_and_neck.iterdir():
        assert f"DeepDosimetricsLib/Resources/models/openkbp-hn/{path.name}" in listed, path.name


def test_encode_takes_the_shipped_model_by_name(head_and_neck, phantom_cohort, tmp_path):
    out = tmp_path / "encoded"
    done = subprocess.run([sys.executable, "-m", "DeepDosimetricsLib.cli", "encode", "--model", "openkbp-hn",
                           "--cohort", str(phantom_cohort), "--out", str(out), "--cache", str(tmp_path / "cache"),
                           "--patients", "phantom_000", "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    features = pd.read_csv(out / "features.csv")
    assert set(features["patient"]) == {"phantom_000"} and "z00_mean" in set(features["feature"])


def test_the_panel_offers_the_shipped_encoder(head_and_neck, tmp_path):
    pytest.importorskip("slicer")
    module_dir = head_and_neck.parents[3]  # DeepDosimetrics/ (the module's folder)
    sys.path.insert(0, str(module_dir))
    try:
        import DeepDosimetrics
    finally:
        sys.path.remove(str(module_dir))
    logic = DeepDosimetrics.DeepDosimetricsLogic
    choice = DeepDosimetrics.DeepDosimetricsParameterNode.__annotations__["pretrainedModel"]
    assert "openkbp-hn" in repr(choice) and DeepDosimetrics.MODEL_FOLDER_CHOICE in repr(choice)
    assert logic.encoderFor("openkbp-hn", tmp_path) == "openkbp-hn"
    assert logic.encoderFor(DeepDosimetrics.MODEL_FOLDER_CHOICE, tmp_path) == tmp_path
    arguments = logic.encodeArguments(logic.encoderFor("openkbp-hn", tmp_path), tmp_path / "c", tmp_path / "o")
    assert arguments[arguments.index("--model") + 1] == "openkbp-hn"
