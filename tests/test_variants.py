"""The ablation variants: pixel (no rep tokens), repa (feature alignment) and continuous rep."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_VOCAB, tiny_config
from rf_jax import configs
from rf_jax import objectives
from rf_jax import partitioning
from rf_jax import sampler as sampler_lib
from rf_jax import trainer as trainer_lib
from rf_jax.backbone import Backbone
from rf_jax.data.tokenizer import BOS_ID, PAD_ID
from rf_jax.layers import RMSNorm
from rf_jax.model import RFModel

# Cached and full passes sum the same float32 terms in another order (see test_model).
PARITY_ATOL = 1e-4


def _variant_setup(variant, seed=1):
    """(config, model_config, model, params) of the tiny model as `variant`, random weights."""
    config = tiny_config()
    config.model.variant = variant
    model_config = configs.model_config(config, TINY_VOCAB)
    model = RFModel(model_config)
    inputs = trainer_lib.dummy_inputs(model_config, config.data.und_text_len)
    params = nn.unbox(model.init(jax.random.key(0), **inputs, method=RFModel.initialize)["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    params = jax.tree.unflatten(
        treedef,
        [
            leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)
            for leaf, k in zip(leaves, keys)
        ],
    )
    return config, model_config, model, params


def _text(model_config):
    text = np.full((2, model_config.text_len), PAD_ID, np.int32)
    text[0, -3:] = [BOS_ID, 7, 8]
    text[1, -2:] = [BOS_ID, 11]
    return jnp.asarray(text)


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    size = config.model.image_size
    und_len = config.data.und_text_len
    und_text = np.zeros((2, und_len), np.int32)
    und_text[:, :5] = [BOS_ID, 5, 6, 7, 2]
    return dict(
        gen_text=np.asarray(_text(configs.model_config(config, TINY_VOCAB))),
        gen_image=rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8),
        und_image=rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8),
        und_text=und_text,
        und_loss_mask=(np.arange(und_len) >= 3).astype(np.float32)[None].repeat(2, 0),
    )


def test_unknown_variant_is_rejected_with_the_choices():
    config = tiny_config()
    config.model.variant = "vae"
    with pytest.raises(ValueError, match="model.variant='vae' is not one of"):
        configs.model_config(config, TINY_VOCAB)


def test_repa_depth_outside_the_backbone_is_rejected():
    config = tiny_config()
    config.model.variant = "repa"
    config.model.repa_depth = 3
    with pytest.raises(ValueError, match="model.repa_depth=3"):
        configs.model_config(config, TINY_VOCAB)


@pytest.mark.parametrize(
    "variant, present, absent",
    [
        ("pixel_rf", {"rep_embed", "rep_head"}, {"rep_in", "repa_fc1"}),
        ("pixel", set(), {"rep_embed", "rep_head", "rep_in", "repa_fc1"}),
        ("repa", {"repa_fc1", "repa_fc2"}, {"rep_embed", "rep_head", "rep_in"}),
        ("continuous", {"rep_embed", "rep_in", "rep_out"}, {"rep_head", "repa_fc1"}),
    ],
)
def test_each_variant_has_its_own_parameters(variant, present, absent):
    _, _, _, params = _variant_setup(variant)
    assert present <= set(params), sorted(params)
    assert not absent & set(params), sorted(params)


def test_backbone_capture_equals_a_truncated_backbone():
    _, model_config, _, params = _variant_setup("repa")
    cfg = model_config.backbone
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, cfg.width)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    ones = jnp.ones((2, 5), jnp.int32)
    spans = ((0, 5, 0),)
    backbone_params = params["backbone"]
    _, _, captured = Backbone(cfg).apply(
        {"params": backbone_params},
        x,
        positions,
        ones,
        ones * 0,
        expert_spans=spans,
        capture_layer=1,
    )
    # A one-layer backbone with the first layer's weights ends in final_norm_0 of that state.
    short = dataclasses.replace(cfg, depth=1)
    short_params = {k: v for k, v in backbone_params.items() if k != "layers_1"}
    expected, _ = Backbone(short).apply(
        {"params": short_params}, x, positions, ones, ones * 0, expert_spans=spans
    )
    normed = RMSNorm(cfg.norm_eps).apply({"params": backbone_params["final_norm_0"]}, captured)
    np.testing.assert_allclose(normed, expected, atol=1e-5)


def test_repa_projection_pools_then_applies_the_mlp():
    _, model_config, model, params = _variant_setup("repa")
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(2, model_config.num_pixels, model_config.backbone.width))
    out = model.apply(
        {"params": params}, jnp.asarray(hidden, jnp.float32), method=RFModel.repa_projection
    )
    # Plain numpy: average each factor x factor block of the pixel grid, then the MLP.
    g, f = model_config.rep_grid, model_config.pixel_grid // model_config.rep_grid
    grid = hidden.reshape(2, g, f, g, f, -1).mean(axis=(2, 4)).reshape(2, g * g, -1)
    fc1, fc2 = params["repa_fc1"], params["repa_fc2"]
    h = grid @ np.asarray(fc1["kernel"]) + np.asarray(fc1["bias"])
    h = h / (1 + np.exp(-h))
    expected = h @ np.asarray(fc2["kernel"]) + np.asarray(fc2["bias"])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_negative_cosine_matches_numpy():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    expected = -np.mean(
        np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    )
    got = objectives.negative_cosine(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(objectives.negative_cosine(jnp.asarray(a), jnp.asarray(a)), -1.0)


def _trainer(config, model_config):
    return trainer_lib.Trainer(config, model_config, partitioning.create_mesh(config.mesh), 10)


@pytest.mark.parametrize("variant", ["pixel", "repa", "continuous"])
def test_ablation_train_step_keeps_codebook(variant):
    config, model_config, _, _ = _variant_setup(variant)
    trainer = _trainer(config, model_config)
    state = trainer.init_state(0)
    prototypes = np.asarray(state.codebook.prototypes)
    step = trainer.jit_train_step(trainer.abstract_state()[1])
    state, metrics = step(state, partitioning.global_batch(_batch(config), trainer.mesh))
    assert np.isfinite(float(metrics["loss"]))
    assert ("loss_repa" in metrics) == (variant == "repa")
    assert ("loss_rep" in metrics) == (variant == "continuous")
    # Only the method assigns codes, so the ablations never move the prototypes.
    np.testing.assert_array_equal(np.asarray(state.codebook.prototypes), prototypes)


def test_repa_loss_weighted_cosine():
    config, model_config, _, _ = _variant_setup("repa")
    trainer = _trainer(config, model_config)
    state = trainer.init_state(0)
    batch = jax.tree.map(jnp.asarray, _batch(config))
    _, targets = trainer.rep_targets(state.ema_encoder, state.codebook, batch["gen_image"])
    assert targets["tokens"].shape == (2, 0)
    expected_features = trainer.encoder.apply({"params": state.ema_encoder}, batch["gen_image"])
    np.testing.assert_array_equal(targets["features"], expected_features)

    with_repa = trainer.loss(state.params, batch, targets, jax.random.key(0))
    config.loss.repa_weight = 0.0
    without = trainer_lib.Trainer(config, model_config, trainer.mesh, 10).loss(
        state.params, batch, targets, jax.random.key(0)
    )
    # The same rng gives the same flow-matching draw, so the totals differ by 0.5 * L_repa.
    np.testing.assert_allclose(
        with_repa[0] - without[0], 0.5 * with_repa[1]["loss_repa"], rtol=1e-5, atol=1e-6
    )
    assert -1.0 <= float(with_repa[1]["loss_repa"]) <= 1.0


def test_continuous_rep_loss_is_mse():
    _, model_config, model, _ = _variant_setup("continuous")
    rng = np.random.default_rng(3)
    prediction = rng.normal(size=(2, model_config.num_rep, model_config.encoder.width))
    features = rng.normal(size=prediction.shape)
    loss, metrics = objectives.rep_loss(
        model, jnp.asarray(prediction, jnp.float32), {"features": jnp.asarray(features)}
    )
    np.testing.assert_allclose(loss, np.mean((prediction - features) ** 2), rtol=1e-5)
    assert "rep_accuracy" not in metrics


def test_continuous_cached_predictions_match_full_pass():
    _, model_config, model, params = _variant_setup("continuous")
    text = _text(model_config)
    rng = np.random.default_rng(4)
    features = jnp.asarray(
        rng.normal(size=(2, model_config.num_rep, model_config.encoder.width)), jnp.float32
    )
    z = jnp.asarray(rng.normal(size=(2, model_config.num_pixels, model_config.pixel_dim)))
    t = jnp.asarray([0.3, 0.8], jnp.float32)
    variables = {"params": params}
    full, x_hat = model.apply(variables, text, features, z, t, jnp.ones((2,), bool))

    size = model_config.text_len + model_config.rep_region
    cache = sampler_lib.empty_cache(model_config, 2, size)
    prediction, cache = model.apply(variables, text, cache, method=RFModel.prefill_generation)
    np.testing.assert_allclose(prediction, full[:, 0], atol=PARITY_ATOL)
    for cell in range(model_config.num_rep):
        prediction, cache = model.apply(
            variables, features[:, cell], jnp.int32(cell), cache, method=RFModel.decode_rep
        )
        if cell + 1 < model_config.num_rep:
            np.testing.assert_allclose(prediction, full[:, cell + 1], atol=PARITY_ATOL)
    cached_x_hat = model.apply(variables, z, t, cache, jnp.ones((2,), bool), method=RFModel.denoise)
    np.testing.assert_allclose(cached_x_hat, x_hat, atol=PARITY_ATOL)


@pytest.mark.parametrize("variant", ["pixel", "repa", "continuous"])
def test_sampler_runs_for_each_ablation(variant):
    _, model_config, _, params = _variant_setup(variant)
    sample = sampler_lib.make_text_to_image(
        model_config, sampler_lib.SamplerConfig(num_steps=2, rep_logits_scale=2.0)
    )
    out = sample(params, _text(model_config), jax.random.key(0))
    size = model_config.image_size
    assert out["images"].shape == (2, size, size, 3)
    assert out["images"].dtype == jnp.uint8
    expected_rep = {
        "pixel": (2, 0),
        "repa": (2, 0),
        "continuous": (2, model_config.num_rep, model_config.encoder.width),
    }[variant]
    assert out["rep_tokens"].shape == expected_rep
