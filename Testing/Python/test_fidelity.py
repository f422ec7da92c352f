"""Issue 13 (reconstruction fidelity): loss terms, residual blocks, edge sampling, the budget-driven
schedule, and the per-structure pooling of tile features (centred tiles, decoded dose)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from DeepDosimetricsLib.deep.cache.build import ensure_cache
from DeepDosimetricsLib.deep.cache.store import CacheConfig
from DeepDosimetricsLib.deep.model import (
    LossTerms,
    ModelConfig,
    TileAutoencoder,
    load_model,
    reconstruction_loss,
    save_model,
)
from DeepDosimetricsLib.deep.train.sampling import SamplingConfig, TileSampler, surface_points
from DeepDosimetricsLib.deep.train.training import lr_factor, make_config, train
from DeepDosimetricsLib.runtime.errors import InputError

CHANNELS = ["window:soft_tissue", "mask:PTV", "dose"]
TINY = dict(tile=16, batch=2, features=4, widths=[4, 8], groups=2, val_fraction=0.25, val_tiles=2,
            steps_per_epoch=4, log_every=1, checkpoint_every=4, patience=0, seed=3, device="cpu")


@pytest.fixture(scope="module")
def cache(phantom_cohort, tmp_path_factory):
    return ensure_cache(phantom_cohort, CacheConfig(), cache_dir=tmp_path_factory.mktemp("fidelity-cache"))


def test_loss_terms_off_give_the_plain_loss_and_each_term_reacts():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 8, 8, 8)
    target[:, 1] = (target[:, 1] > 0.5).float()
    logits = torch.randn(2, 3, 8, 8, 8)
    plain, per_channel = reconstruction_loss(logits, target, [1, 1, 2], [1])
    off = LossTerms(dose_channels=[2], mask_channels=[1], target_channel=1)
    assert not off.active
    same, _ = reconstruction_loss(logits, target, [1, 1, 2], [1], 0.0, off)
    assert torch.equal(plain, same) and per_channel.shape == (3,)
    perfect = torch.logit(target.clamp(1e-4, 1 - 1e-4))
    for name in ("dice", "dose_in_target", "gradient"):
        terms = LossTerms(dose_channels=[2], mask_channels=[1], target_channel=1, **{name: 1.0})
        assert terms.active
        worse = terms(torch.sigmoid(logits), target)
        better = terms(torch.sigmoid(perfect), target)
        assert float(worse) > float(better) >= 0.0, name
    assert float(LossTerms(mask_channels=[1], dice=1.0)(target, target)) == pytest.approx(0.0, abs=1e-3)


def test_residual_decoder_depth_model_round_trips(tmp_path):
    config = ModelConfig(channels=CHANNELS, tile=16, features=5, widths=[4, 8], groups=2, residual=True,
                         decoder_convs=2)
    model = TileAutoencoder(config)
    plain = TileAutoencoder(ModelConfig(channels=CHANNELS, tile=16, features=5, widths=[4, 8], groups=2))
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in plain.parameters())
    x = torch.rand(2, 3, 16, 16, 16)
    logits, z = model(x)
    assert logits.shape == x.shape and z.shape == (2, 5)
    save_model(tmp_path, model, config)
    loaded, loaded_config = load_model(tmp_path)
    assert loaded_config.residual and loaded_config.decoder_convs == 2
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="decoder_convs"):
        ModelConfig(channels=CHANNELS, tile=16, widths=[4, 8], decoder_convs=-1)


def test_lr_factor_warms_up_then_decays():
    assert lr_factor(0.0, 0.1, 0.05) == pytest.approx(1e-3)
    assert lr_factor(0.05, 0.1, 0.05) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1, 0.05) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.1, 0.05) == pytest.approx(0.05)
    values = [lr_factor(p, 0.1, 0.05) for p in np.linspace(0.1, 1, 20)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_edge_sampling_centres_tiles_on_the_target_surface(cache):
    from DeepDosimetricsLib.deep.channels import parse_channels

    cube = np.zeros((12, 12, 12), np.uint8)
    cube[3:9, 3:9, 3:9] = 1
    points = surface_points(cube, slab=4)
    assert len(points) == 6**3 - 4**3 and all(cube[tuple(p)] for p in points)
    assert len(surface_points(cube, limit=10)) == 10
    patients = list(cache)
    config = SamplingConfig(tile=16, batch=6, ptv_share=1.0, edge_share=1.0, body_share=0.0, flips=False, jitter=0.0)
    batch = TileSampler(patients, parse_channels("default"), config, seed=2).batch(0)
    ptv = batch[:, 1]
    assert all(0 < tile.mean() < 1 for tile in ptv)  # every tile holds both sides of the PTV's edge
    with pytest.raises(InputError, match="edge_share"):
        SamplingConfig(ptv_share=0.1, edge_share=0.2)


def test_improved_recipe_trains_within_a_time_budget(phantom_cohort, cache, tmp_path):
    config = make_config(None, **TINY, steps=10**6, budget_minutes=0.05, schedule="warmup_cosine",
                         warmup_fraction=0.1, residual=True, mask_dice_weight=0.1, dose_target_weight=1.0,
                         dose_gradient_weight=10.0, channel_weights={"dose": 2.0}, edge_share=0.2)
    result = train(phantom_cohort, tmp_path / "m", config, cache=cache, quiet=True)
    assert 1 <= result.steps < 10**6
    assert result.history[-1]["val_loss"] is not None  # the last step validated and checkpointed
    assert result.history[-1]["elapsed_s"] >= 3.0
    lrs = [row["lr"] for row in result.history]
    assert max(lrs) <= config.lr and lrs[-1] < max(lrs)
    assert load_model(tmp_path / "m")[1].residual


def test_default_recipe_is_the_improved_one():
    config = make_config()
    assert config.schedule == "warmup_cosine" and config.residual
    assert config.mask_dice_weight > 0 and config.dose_target_weight > 0 and config.dose_gradient_weight > 0
    assert 0 < config.edge_share <= config.ptv_share


def test_structure_pooling_centred_tiles_and_decoded_dose(cache):
    from DeepDosimetricsLib.deep.channels import parse_channels
    from DeepDosimetricsLib.deep.encode.encoder import TileModel, encode_patient, structure_centroids

    cp = next(iter(cache))
    torch.manual_seed(0)
    model = TileAutoencoder(ModelConfig(channels=CHANNELS, tile=16, features=4, widths=[4, 8], groups=2))
    runner = TileModel(model, "cpu")
    specs = parse_channels("default")
    encoded = encode_patient(runner, cp, specs, batch=3)
    ptv = np.argwhere(np.asarray(cp.mask("PTV")) > 0).mean(axis=0)
    np.testing.assert_allclose(structure_centroids(cp, ["PTV"])["PTV"], ptv, atol=1e-6)
    assert "PTV" in encoded.centred and "BODY" not in encoded.centred
    table = encoded.feature_table().set_index(["structure", "feature"])["value"]
    assert table[("PTV", "z03_ctr")] == pytest.approx(float(encoded.centred["PTV"][3]))
    dose = table[("PTV", "dose_rec_mean_gy")]
    assert 0 <= dose <= table[("PTV", "dose_rec_max_gy")] <= 80.0 + 1e-3
    # where the decoded dose lies inside the PTV (issue 18), and the codes pooled in its halves
    assert table[("PTV", "dose_rec_Dmean_cranial_half_Gy")] <= table[("PTV", "dose_rec_max_gy")] + 1e-6
    assert np.isfinite(table[("PTV", "dose_rec_gradient_cc_gy_per_mm")])
    assert min(encoded.features[:, 3]) - 1e-6 <= table[("PTV", "z03_mean_cranial_half")] <= max(encoded.features[:, 3]) + 1e-6
    plain = encode_patient(runner, cp, specs, batch=3, structure_tiles=False).feature_table()
    assert not plain["feature"].str.endswith("_ctr").any()


def test_decoded_structure_dose_is_the_reconstructions_dose_in_the_structure(cache):
    """dose_rec_* pool the stitched reconstruction's dose over the whole structure (issue 17 item 5)."""
    from DeepDosimetricsLib.deep.channels import parse_channels, to_units
    from DeepDosimetricsLib.deep.encode.encoder import TileModel, encode_patient
    from DeepDosimetricsLib.deep.encode.reconstruction import air_values
    from DeepDosimetricsLib.deep.tiling import ArraySink

    cp = next(iter(cache))
    torch.manual_seed(1)
    model = TileAutoencoder(ModelConfig(channels=CHANNELS, tile=16, features=4, widths=[4, 8], groups=2))
    specs = parse_channels("default")
    sink = ArraySink(cp.shape, len(specs))
    encoded = encode_patient(TileModel(model, "cpu"), cp, specs, overlap=0.5, batch=5, sink=sink,
                             fill=air_values(cp, specs))
    table = encoded.feature_table().set_index(["structure", "feature"])["value"]
    dose = to_units(specs[2], sink.array[2], cp.prescription_gy)
    for name in ("PTV", *[n for n in cp.structure_names if n not in ("PTV", "BODY")][:2]):
        inside = np.asarray(cp.mask(name)) > 0
        if not inside.any():
            continue
        assert table[(name, "dose_rec_mean_gy")] == pytest.approx(float(dose[inside].mean()), rel=1e-4, abs=1e-4)
        assert table[(name, "dose_rec_max_gy")] == pytest.approx(float(dose[inside].max()), rel=1e-4, abs=1e-4)


def test_output_bias_starts_at_the_channel_means(phantom_cohort, cache, tmp_path):
    from DeepDosimetricsLib.deep.distributed import DistributedContext
    from DeepDosimetricsLib.deep.train.training import Trainer

    config = make_config(None, **TINY, steps=1, init_output_bias=True, pca_start=False)
    trainer = Trainer(phantom_cohort, tmp_path / "m", config, DistributedContext.from_environment())
    trainer.setup(cache=cache)
    tiles = np.stack([trainer.val_sampler.read(p, s, None) for p, s in trainer.val_tiles[:16]])
    expected = torch.logit(torch.as_tensor(np.clip(tiles.mean(axis=(0, 2, 3, 4)), 1e-3, 1 - 1e-3)))
    torch.testing.assert_close(trainer.model.output_bias().detach(), expected.float())
