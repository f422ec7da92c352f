"""TileAutoencoder: the bottleneck bounds information, safe save/load, channel checks, loss."""

from __future__ import annotations

import json

import pytest
import torch
from DeepDosimetricsLib.deep.model import (
    MODEL_JSON,
    MODEL_WEIGHTS,
    ModelConfig,
    TileAutoencoder,
    check_channels,
    load_model,
    reconstruction_loss,
    save_model,
)
from DeepDosimetricsLib.runtime.errors import InputError

CHANNELS = ["window:soft_tissue", "mask:PTV", "dose"]


def tiny_config(**changes) -> ModelConfig:
    values = dict(channels=CHANNELS, tile=16, features=6, widths=[4, 8], groups=2)
    values.update(changes)
    return ModelConfig(**values)


def tiles(n: int = 2, seed: int = 0, channels: int = 3, tile: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, tile, tile, tile, generator=generator)


def test_shapes_and_value_range():
    torch.manual_seed(0)
    model = TileAutoencoder(tiny_config()).eval()
    x = tiles()
    with torch.no_grad():
        z = model.encode(x)
        y = model.decode(z)
        logits, z2 = model(x)
    assert z.shape == (2, 6)
    assert y.shape == x.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert torch.allclose(torch.sigmoid(logits), y) and torch.allclose(z, z2)


def test_output_depends_on_the_features_alone():
    """Replacing z by a fixed code makes the output independent of the input: no path skips the bottleneck."""
    torch.manual_seed(0)
    model = TileAutoencoder(tiny_config()).eval()
    fixed = torch.randn(1, 6).expand(2, 6).clone()
    handle = model.to_features.register_forward_hook(lambda module, inputs, output: fixed)
    try:
        out_a, _ = model(tiles(seed=1))
        out_b, _ = model(tiles(seed=2))
    finally:
        handle.remove()
    assert torch.equal(out_a, out_b)
    assert torch.equal(out_a, model.decode_logits(fixed))
    # and the input gradient flows only through z: with z detached the input gets no gradient
    x = tiles(seed=3).requires_grad_(True)
    model.decode(model.encode(x).detach()).sum().backward()
    assert x.grad is None
    # different inputs do give different codes
    assert not torch.allclose(model.encode(tiles(seed=1)), model.encode(tiles(seed=2)))


def test_configuration_errors():
    with pytest.raises(InputError, match="multiple of 4"):
        tiny_config(tile=18)
    with pytest.raises(InputError, match="activation"):
        tiny_config(activation="tanhh")
    with pytest.raises(InputError, match="duplicated"):
        tiny_config(channels=["dose", "dose"])
    model = TileAutoencoder(tiny_config())
    with pytest.raises(InputError, match="expects tiles of shape"):
        model.encode(tiles(channels=2))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(activation="leaky_relu")
    model = TileAutoencoder(config).eval()
    save_model(tmp_path, model, config, extra={"steps": 3})
    meta = json.loads((tmp_path / MODEL_JSON).read_text())
    assert meta["channels"] == CHANNELS and meta["training"] == {"steps": 3}
    loaded, loaded_config = load_model(tmp_path, device="cpu", channels=CHANNELS)
    assert loaded_config == config
    assert not loaded.training
    x = tiles()
    with torch.no_grad():
        assert torch.allclose(loaded.decode(loaded.encode(x)), model.decode(model.encode(x)), atol=1e-6)
    # the weights file is a plain state dict that torch reads with weights_only=True
    state = torch.load(tmp_path / MODEL_WEIGHTS, weights_only=True)
    assert set(state) == set(model.state_dict())
    assert not list(tmp_path.glob("*.tmp"))


def test_channel_mismatch_is_refused_naming_the_channels(tmp_path):
    config = tiny_config()
    save_model(tmp_path, TileAutoencoder(config), config)
    with pytest.raises(InputError, match=r"needs dose, absent.*has window:lung, unknown"):
        load_model(tmp_path, channels=["window:soft_tissue", "mask:PTV", "window:lung"])
    with pytest.raises(InputError, match="another order"):
        check_channels(config, ["dose", "mask:PTV", "window:soft_tissue"])


class _Payload:
    """Pickling this would run code on load; weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_foreign_and_corrupt_files_are_refused(tmp_path, capsys):
    config = tiny_config()
    save_model(tmp_path, TileAutoencoder(config), config)
    # an object that is not a state dict (would execute code if unpickled freely)
    torch.save({"x": _Payload()}, tmp_path / MODEL_WEIGHTS)
    with pytest.raises(InputError, match="corrupt or not a DeepDosimetrics weights file"):
        load_model(tmp_path)
    assert "code ran" not in capsys.readouterr().out
    # truncated weights
    save_model(tmp_path, TileAutoencoder(config), config)
    data = (tmp_path / MODEL_WEIGHTS).read_bytes()
    (tmp_path / MODEL_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt"):
        load_model(tmp_path)
    # weights of another architecture
    other = tiny_config(widths=[4, 4])
    torch.save(TileAutoencoder(other).state_dict(), tmp_path / MODEL_WEIGHTS)
    with pytest.raises(InputError, match="do not fit the configuration"):
        load_model(tmp_path)
    # a foreign model.json
    (tmp_path / MODEL_JSON).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="not a DeepDosimetrics model"):
        load_model(tmp_path)
    with pytest.raises(InputError, match="no model.json"):
        load_model(tmp_path / "missing")


def test_loss_weights_and_mask_bce():
    target = torch.zeros(1, 3, 4, 4, 4)
    logits = torch.zeros(1, 3, 4, 4, 4)  # sigmoid 0.5 everywhere: MSE 0.25 per channel
    logits[:, 2] = 10.0  # channel 2 predicts ~1: MSE ~1
    loss, per_channel = reconstruction_loss(logits, target)
    assert per_channel[0] == pytest.approx(0.25) and per_channel[2] == pytest.approx(1.0, abs=1e-3)
    assert float(loss) == pytest.approx(float(per_channel.mean()))
    weighted, _ = reconstruction_loss(logits, target, channel_weights=[1, 1, 0])
    assert float(weighted) == pytest.approx(0.25)
    with_bce, _ = reconstruction_loss(logits, target, mask_channels=[1], mask_bce_weight=1.0)
    assert float(with_bce) == pytest.approx(float(loss) + 0.6931, abs=1e-3)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = tiles()
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = TileAutoencoder(tiny_config(gradient_checkpointing=flag))
        logits, _ = model(x)
        reconstruction_loss(logits, x)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
