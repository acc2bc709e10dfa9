"""Model-level checks: KV-cache parity, MoT routing, sampler outputs, CFG dropout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rf_jax import mask as mask_lib
from rf_jax import objectives
from rf_jax import sampler as sampler_lib
from rf_jax.backbone import Backbone, BackboneConfig
from rf_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rf_jax.model import RFModel

# Cached and full passes sum the same terms in a different order, because the cache
# has empty slots and shorter rows. Float32 rounding stays far below 1e-4.
PARITY_ATOL = 1e-4


def _generation_inputs(model_config, batch=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    text = np.full((batch, model_config.text_len), PAD_ID, np.int32)
    text[0, -4:] = [BOS_ID, 7, 8, 9]
    text[1, -2:] = [BOS_ID, 11]
    rep = jax.random.randint(keys[0], (batch, model_config.num_rep), 0, model_config.codebook_size)
    z = jax.random.normal(keys[1], (batch, model_config.num_pixels, model_config.pixel_dim))
    t = jax.random.uniform(keys[2], (batch,))
    return jnp.asarray(text), rep, z, t


def test_cached_rep_logits_match_full_pass(tiny):
    _, model_config, model, params = tiny
    text, rep, z, t = _generation_inputs(model_config)
    variables = {"params": params}
    full_logits, _ = model.apply(variables, text, rep, z, t, jnp.ones((2,), bool))

    cache = sampler_lib.empty_cache(
        model_config, 2, model_config.text_len + model_config.rep_region
    )
    logits, cache = model.apply(variables, text, cache, method=RFModel.prefill_generation)
    np.testing.assert_allclose(logits, full_logits[:, 0], atol=PARITY_ATOL)
    for cell in range(model_config.num_rep - 1):
        logits, cache = model.apply(
            variables, rep[:, cell], jnp.int32(cell), cache, method=RFModel.decode_rep
        )
        np.testing.assert_allclose(logits, full_logits[:, cell + 1], atol=PARITY_ATOL)


@pytest.mark.parametrize("rep_visible", [True, False])
def test_cached_denoise_matches_full_pass(tiny, rep_visible):
    _, model_config, model, params = tiny
    text, rep, z, t = _generation_inputs(model_config)
    visible = jnp.full((2,), rep_visible)
    variables = {"params": params}
    _, full_x_hat = model.apply(variables, text, rep, z, t, visible)

    cache = sampler_lib.empty_cache(
        model_config, 2, model_config.text_len + model_config.rep_region
    )
    _, cache = model.apply(variables, text, cache, method=RFModel.prefill_generation)
    for cell in range(model_config.num_rep):
        _, cache = model.apply(
            variables, rep[:, cell], jnp.int32(cell), cache, method=RFModel.decode_rep
        )
    x_hat = model.apply(variables, z, t, cache, visible, method=RFModel.denoise)
    np.testing.assert_allclose(x_hat, full_x_hat, atol=PARITY_ATOL)


def test_cached_text_logits_match_full_pass(tiny):
    config, model_config, model, params = tiny
    images = jax.random.randint(jax.random.key(3), (2, 16, 16, 3), 0, 256).astype(jnp.uint8)
    text = jnp.asarray(
        [
            [BOS_ID, 5, 6, 7, EOS_ID, PAD_ID, PAD_ID, PAD_ID],
            [BOS_ID, 9, 10, 11, 12, 13, EOS_ID, PAD_ID],
        ],
        jnp.int32,
    )
    variables = {"params": params}
    full = model.apply(variables, images, text, method=RFModel.understand)

    cache = sampler_lib.empty_cache(model_config, 2, model_config.num_image_tokens + 8)
    logits, cache = model.apply(
        variables, images, text[:, :1], cache, method=RFModel.prefill_understanding
    )
    np.testing.assert_allclose(logits, full[:, 0], atol=PARITY_ATOL)
    for position in range(1, 4):
        logits, cache = model.apply(variables, text[:, position], cache, method=RFModel.decode_text)
        np.testing.assert_allclose(logits, full[:, position], atol=PARITY_ATOL)


ROUTING_MODALITY = [
    mask_lib.TEXT,
    mask_lib.TEXT,
    mask_lib.REP,
    mask_lib.REP,
    mask_lib.PIXEL,
    mask_lib.PIXEL,
    mask_lib.IMAGE,
]


def _one_layer_backbone():
    config = BackboneConfig(width=16, depth=1, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=24)
    model = Backbone(config)
    length = len(ROUTING_MODALITY)
    x = jax.random.normal(jax.random.key(0), (1, length, 16))
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    # Each token is its own segment so attention cannot carry a change elsewhere.
    segments = jnp.arange(1, length + 1, dtype=jnp.int32)[None]
    modality = jnp.asarray([ROUTING_MODALITY], jnp.int32)
    params = model.init(jax.random.key(1), x, positions, segments, modality)
    run = lambda p: np.asarray(model.apply(p, x, positions, segments, modality)[0][0])  # noqa: E731
    return params, run


@pytest.mark.parametrize("expert", range(mask_lib.NUM_EXPERTS))
def test_perturbed_expert_changes_only_its_tokens(expert):
    params, run = _one_layer_backbone()
    before = run(params)
    perturbed = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf + 1.0 if f"expert_{expert}" in jax.tree_util.keystr(path) else leaf,
        params,
    )
    changed = np.abs(run(perturbed) - before).max(axis=-1) > 1e-6
    routed = np.asarray([mask_lib.EXPERT_OF_MODALITY[m] == expert for m in ROUTING_MODALITY])
    np.testing.assert_array_equal(changed, routed)


def test_static_spans_match_routing_by_modality():
    config = BackboneConfig(width=16, depth=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=24)
    model = Backbone(config)
    modality = jnp.asarray([[mask_lib.TEXT] * 3 + [mask_lib.REP] * 2 + [mask_lib.PIXEL] * 4])
    x = jax.random.normal(jax.random.key(0), (2, 9, 16))
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    segments = jnp.ones((2, 9), jnp.int32)
    modality = jnp.broadcast_to(modality, (2, 9)).astype(jnp.int32)
    params = model.init(jax.random.key(1), x, positions, segments, modality)
    dense, _ = model.apply(params, x, positions, segments, modality)
    spans = (
        (0, 3, mask_lib.UNDERSTANDING_EXPERT),
        (3, 5, mask_lib.REP_EXPERT),
        (5, 9, mask_lib.PIXEL_EXPERT),
    )
    sliced, _ = model.apply(params, x, positions, segments, modality, expert_spans=spans)
    np.testing.assert_allclose(sliced, dense, atol=1e-6)


def test_cfg_dropout_rates():
    rows = 20000
    text = jnp.full((rows, 4), 5, jnp.int32).at[:, 0].set(BOS_ID)
    dropped_text, rep_visible, text_dropped = objectives.cfg_dropout(
        jax.random.key(0), text, 0.1, 0.1
    )
    text_rate = float(text_dropped.mean())
    rep_rate = float((~rep_visible).mean())
    both_rate = float((text_dropped & ~rep_visible).mean())
    # Binomial standard deviation at p = 0.1 over 20,000 rows is 0.0021; allow 4 of them.
    assert abs(text_rate - 0.1) < 0.0085
    assert abs(rep_rate - 0.1) < 0.0085
    assert abs(both_rate - 0.01) < 0.003, "the two dropouts must be independent"
    np.testing.assert_array_equal(dropped_text[text_dropped][:, -1], BOS_ID)
    np.testing.assert_array_equal(dropped_text[text_dropped][:, :-1], PAD_ID)
    np.testing.assert_array_equal(dropped_text[~text_dropped], text[~text_dropped])


def test_text_to_image_outputs(tiny):
    _, model_config, _, params = tiny
    cfg = sampler_lib.SamplerConfig(
        num_steps=3, top_k=5, rep_logits_scale=1.5, text_scale=2.0, rep_scale=2.0
    )
    sample = sampler_lib.make_text_to_image(model_config, cfg)
    prompts, _, _, _ = _generation_inputs(model_config)
    out = sample(params, prompts, jax.random.key(0))
    assert out["images"].shape == (2, 16, 16, 3)
    assert out["images"].dtype == jnp.uint8
    assert out["rep_tokens"].shape == (2, model_config.num_rep)
    assert int(out["rep_tokens"].min()) >= 0
    assert int(out["rep_tokens"].max()) < model_config.codebook_size
    assert len(np.unique(np.asarray(out["images"]))) > 10, "images must not be constant"
    again = sample(params, prompts, jax.random.key(0))
    np.testing.assert_array_equal(out["images"], again["images"])
    other = sample(params, prompts, jax.random.key(1))
    assert not np.array_equal(out["images"], other["images"])


def test_guidance_scale_one_equals_unguided(tiny):
    _, model_config, _, params = tiny
    prompts, _, _, _ = _generation_inputs(model_config)
    plain = sampler_lib.make_text_to_image(
        model_config, sampler_lib.SamplerConfig(num_steps=2, text_scale=1.0)
    )
    guided_off = sampler_lib.make_text_to_image(
        model_config,
        sampler_lib.SamplerConfig(
            num_steps=2, text_scale=1.0, rep_logits_scale=1.0, rep_scale=1.0, guidance_low=0.0
        ),
    )
    a = plain(params, prompts, jax.random.key(0))["images"]
    b = guided_off(params, prompts, jax.random.key(0))["images"]
    np.testing.assert_array_equal(a, b)


def test_image_to_text_stops_after_eos(tiny):
    _, model_config, _, params = tiny
    images = jnp.zeros((2, 16, 16, 3), jnp.uint8)
    answer = sampler_lib.make_image_to_text(model_config, max_new_tokens=6)
    tokens = np.asarray(
        answer(params, images, jnp.full((2, 1), BOS_ID, jnp.int32), jax.random.key(0))
    )
    assert tokens.shape == (2, 6)
    for row in tokens:
        eos = np.flatnonzero(row == EOS_ID)
        if eos.size:
            assert (row[eos[0] + 1 :] == PAD_ID).all()


def test_sampler_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_steps"):
        sampler_lib.SamplerConfig(num_steps=0)
    with pytest.raises(ValueError, match="guidance interval"):
        sampler_lib.SamplerConfig(guidance_low=0.8, guidance_high=0.2)


def test_model_without_rep_tokens(tiny):
    config, model_config, _, _ = tiny
    no_rep = dataclasses.replace(model_config, variant="pixel")
    model = RFModel(no_rep)
    text, _, z, t = _generation_inputs(no_rep)
    from rf_jax.trainer import dummy_inputs

    params = model.init(jax.random.key(0), **dummy_inputs(no_rep, 8), method=RFModel.initialize)
    rep_logits, x_hat = model.apply(
        params, text, jnp.zeros((2, 0), jnp.int32), z, t, jnp.ones((2,), bool)
    )
    assert rep_logits is None
    assert x_hat.shape == z.shape
