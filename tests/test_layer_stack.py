"""Remat policies and scan over layers: same numbers as the plain model, less kept for backward."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import TINY_VOCAB, tiny_config
from rf_jax import configs
from rf_jax import layer_stack
from rf_jax import mask as mask_lib
from rf_jax import sampler as sampler_lib
from rf_jax import trainer as trainer_lib
from rf_jax.backbone import Backbone, BackboneConfig
from rf_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rf_jax.encoder import Encoder, EncoderConfig
from rf_jax.model import RFModel

# Remat and scan run the same float32 ops, but XLA may fuse and order them differently.
# The backbone's gradients reach about 30 and differ by up to about 8e-6 (1e-6 of the
# largest value of a leaf), so values are compared with rtol 1e-5, plus atol 1e-5 for
# entries near zero.
RTOL, ATOL = 1e-5, 1e-5
# Cached and full passes sum the same terms in a different order (as in test_model.py).
PARITY_ATOL = 1e-4

TEXT, REP, PIXELS = 4, 3, 8
LENGTH = TEXT + REP + PIXELS
SPANS = (
    (0, TEXT, mask_lib.UNDERSTANDING_EXPERT),
    (TEXT, TEXT + REP, mask_lib.REP_EXPERT),
    (TEXT + REP, LENGTH, mask_lib.PIXEL_EXPERT),
)
BACKBONE = BackboneConfig(width=16, depth=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=24)
ENCODER = EncoderConfig(patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=24, num_registers=1)


def _backbone_inputs(batch=2):
    x = jax.random.normal(jax.random.key(0), (batch, LENGTH, BACKBONE.width))
    positions = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), (batch, LENGTH))
    segments = jnp.ones((batch, LENGTH), jnp.int32)
    modality = [mask_lib.TEXT] * TEXT + [mask_lib.REP] * REP + [mask_lib.PIXEL] * PIXELS
    modality = jnp.broadcast_to(jnp.asarray(modality, jnp.int32), (batch, LENGTH))
    return x, positions, segments, modality


def _backbone_loss(remat="none", scan_layers=False):
    """Return (params, x) -> loss of a 2-layer backbone with generation routing."""
    model = Backbone(dataclasses.replace(BACKBONE, remat=remat, scan_layers=scan_layers))
    _, positions, segments, modality = _backbone_inputs()

    def loss(params, x):
        hidden, _ = model.apply(
            {"params": params}, x, positions, segments, modality, expert_spans=SPANS
        )
        return jnp.sum(jnp.sin(hidden))

    return loss


def _assert_trees_close(tree, reference):
    assert jax.tree.structure(tree) == jax.tree.structure(reference)
    for (path, got), expected in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(reference)
    ):
        np.testing.assert_allclose(
            got, expected, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path)
        )


@pytest.fixture(scope="module")
def plain_backbone():
    """(per-layer params, x, (loss, (params grads, x grads))) of the backbone without remat or scan."""
    x, positions, segments, modality = _backbone_inputs()
    init = jax.jit(Backbone(BACKBONE).init, static_argnames="expert_spans")
    params = nn.unbox(init(jax.random.key(1), x, positions, segments, modality, expert_spans=SPANS))
    params = params["params"]
    return params, x, jax.jit(jax.value_and_grad(_backbone_loss(), argnums=(0, 1)))(params, x)


@pytest.mark.parametrize(
    "remat, scan_layers",
    [("full", False), ("save_dots", False), ("save_attn_mlp", True)],
)
def test_backbone_gradients_match_plain(plain_backbone, remat, scan_layers):
    params, x, (loss, grads) = plain_backbone
    loss_fn = _backbone_loss(remat, scan_layers)
    if scan_layers:
        params = layer_stack.stack_layers(params)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    got_loss, (got_params_grad, got_x_grad) = grad_fn(params, x)
    if scan_layers:
        got_params_grad = layer_stack.unstack_layers(got_params_grad)
    np.testing.assert_allclose(got_loss, loss, atol=ATOL)
    _assert_trees_close(got_params_grad, grads[0])
    np.testing.assert_allclose(got_x_grad, grads[1], rtol=RTOL, atol=ATOL)


def _capturing_loss(capture_layer, scan_layers):
    """(params, x) -> loss of the backbone's output and of its states after `capture_layer` layers."""
    model = Backbone(dataclasses.replace(BACKBONE, scan_layers=scan_layers))
    _, positions, segments, modality = _backbone_inputs()

    def loss(params, x):
        hidden, _, captured = model.apply(
            {"params": params},
            x,
            positions,
            segments,
            modality,
            expert_spans=SPANS,
            capture_layer=capture_layer,
        )
        return jnp.sum(jnp.sin(hidden)) + jnp.sum(jnp.cos(captured))

    return loss


@pytest.mark.parametrize("capture_layer", [1, 2])
def test_scanned_capture_matches_plain(plain_backbone, capture_layer):
    # The REPA loss reads the states after `repa_depth` layers, which the scan carries along.
    params, x, _ = plain_backbone
    plain = jax.jit(jax.value_and_grad(_capturing_loss(capture_layer, False), argnums=(0, 1)))
    scanned = jax.jit(jax.value_and_grad(_capturing_loss(capture_layer, True), argnums=(0, 1)))
    loss, (params_grad, x_grad) = plain(params, x)
    got_loss, (got_params_grad, got_x_grad) = scanned(layer_stack.stack_layers(params), x)

    np.testing.assert_allclose(got_loss, loss, rtol=RTOL)
    _assert_trees_close(layer_stack.unstack_layers(got_params_grad), params_grad)
    np.testing.assert_allclose(got_x_grad, x_grad, rtol=RTOL, atol=ATOL)


def test_capture_layer_outside_the_backbone_is_rejected(plain_backbone):
    params, x, _ = plain_backbone
    with pytest.raises(ValueError, match=r"capture_layer=3 is outside the backbone's layers 1..2"):
        _capturing_loss(3, False)(params, x)


def test_scanned_bfloat16_encoder_matches_plain():
    # The float32 layer scales must not promote the bfloat16 residual stream, which a scan
    # carry has to keep.
    config = dataclasses.replace(ENCODER, dtype=jnp.bfloat16)
    images = jax.random.randint(jax.random.key(2), (2, 16, 16, 3), 0, 256).astype(jnp.uint8)
    plain = Encoder(config)
    params = nn.unbox(jax.jit(plain.init)(jax.random.key(3), images))["params"]
    expected = jax.jit(plain.apply)({"params": params}, images)
    scanned = Encoder(dataclasses.replace(config, scan_layers=True))
    got = jax.jit(scanned.apply)({"params": layer_stack.stack_layers(params)}, images)

    assert got.dtype == expected.dtype == jnp.bfloat16
    # Same bfloat16 ops in the same order: XLA may fuse them differently, within a few ulps.
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(expected, np.float32), atol=0.05, rtol=0.02
    )


def test_remat_keeps_fewer_residuals(plain_backbone):
    params, x, _ = plain_backbone
    sizes = {}
    for remat in layer_stack.REMAT_POLICIES:
        # The backward function contains the residuals, which the forward pass keeps for it.
        backward = jax.eval_shape(lambda p, x: jax.vjp(_backbone_loss(remat), p, x)[1], params, x)
        sizes[remat] = sum(leaf.size for leaf in jax.tree.leaves(backward))
    assert sizes["full"] < sizes["save_attn_mlp"] < sizes["none"], sizes
    assert sizes["full"] < sizes["save_dots"] < sizes["none"], sizes


def test_scanned_encoder_matches_plain():
    images = jax.random.randint(jax.random.key(2), (2, 8, 8, 3), 0, 256).astype(jnp.uint8)
    params = nn.unbox(jax.jit(Encoder(ENCODER).init)(jax.random.key(3), images)["params"])
    scanned = Encoder(dataclasses.replace(ENCODER, remat="full", scan_layers=True))

    def loss_and_grads(model, params):
        loss = lambda params: jnp.sum(
            jnp.sin(model.apply({"params": params}, images))
        )  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    expected, expected_grads = loss_and_grads(Encoder(ENCODER), params)
    got, grads = loss_and_grads(scanned, layer_stack.stack_layers(params))
    np.testing.assert_allclose(got, expected, atol=ATOL)
    _assert_trees_close(layer_stack.unstack_layers(grads), expected_grads)


@pytest.fixture(scope="module")
def scanned_tiny(tiny):
    """The tiny model of conftest with scan over layers (no remat), and its parameters stacked."""
    config, model_config, _, params = tiny
    scanned_config = dataclasses.replace(
        model_config,
        backbone=dataclasses.replace(model_config.backbone, scan_layers=True),
        encoder=dataclasses.replace(model_config.encoder, scan_layers=True),
    )
    return config, scanned_config, RFModel(scanned_config), layer_stack.stack_layers(params)


def test_stacked_parameters_match_scanned_init(scanned_tiny):
    config, model_config, model, params = scanned_tiny
    inputs = trainer_lib.dummy_inputs(model_config, config.data.und_text_len)
    init = jax.eval_shape(
        lambda: model.init(jax.random.key(0), **inputs, method=RFModel.initialize)["params"]
    )
    init = nn.unbox(init)
    assert jax.tree.structure(params) == jax.tree.structure(init)
    for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(init)):
        assert got.shape == expected.shape
    assert params["backbone"]["layers"]["attn"]["q_proj"]["kernel"].shape[0] == 2


def test_scanned_cached_generation_matches_full_pass(scanned_tiny):
    _, model_config, model, params = scanned_tiny
    batch = 2
    text = np.full((batch, model_config.text_len), PAD_ID, np.int32)
    text[0, -3:] = [BOS_ID, 7, 8]
    text[1, -2:] = [BOS_ID, 11]
    keys = jax.random.split(jax.random.key(4), 3)
    rep = jax.random.randint(keys[0], (batch, model_config.num_rep), 0, model_config.codebook_size)
    z = jax.random.normal(keys[1], (batch, model_config.num_pixels, model_config.pixel_dim))
    t = jax.random.uniform(keys[2], (batch,))
    visible = jnp.ones((batch,), bool)
    variables = {"params": params}
    full_logits, full_x_hat = jax.jit(model.apply)(variables, jnp.asarray(text), rep, z, t, visible)

    size = model_config.text_len + model_config.rep_region
    cache = sampler_lib.empty_cache(model_config, batch, size)
    prefill, decode, denoise = (
        jax.jit(functools.partial(model.apply, method=method))
        for method in (RFModel.prefill_generation, RFModel.decode_rep, RFModel.denoise)
    )
    logits, cache = prefill(variables, text, cache)
    np.testing.assert_allclose(logits, full_logits[:, 0], atol=PARITY_ATOL)
    for cell in range(model_config.num_rep):
        logits, cache = decode(variables, rep[:, cell], jnp.int32(cell), cache)
        if cell + 1 < model_config.num_rep:
            np.testing.assert_allclose(logits, full_logits[:, cell + 1], atol=PARITY_ATOL)
    x_hat = denoise(variables, z, t, cache, visible)
    np.testing.assert_allclose(x_hat, full_x_hat, atol=PARITY_ATOL)


def test_scanned_cached_captioning_matches_full_pass(scanned_tiny):
    _, model_config, model, params = scanned_tiny
    images = jax.random.randint(jax.random.key(5), (2, 16, 16, 3), 0, 256).astype(jnp.uint8)
    text = jnp.asarray(
        [[BOS_ID, 5, 6, 7, EOS_ID, PAD_ID], [BOS_ID, 9, 10, 11, 12, EOS_ID]], jnp.int32
    )
    variables = {"params": params}
    understand, prefill, decode = (
        jax.jit(functools.partial(model.apply, method=method))
        for method in (RFModel.understand, RFModel.prefill_understanding, RFModel.decode_text)
    )
    full = understand(variables, images, text)

    cache = sampler_lib.empty_cache(model_config, 2, model_config.num_image_tokens + 6)
    logits, cache = prefill(variables, images, text[:, :1], cache)
    np.testing.assert_allclose(logits, full[:, 0], atol=PARITY_ATOL)
    for position in range(1, 4):
        logits, cache = decode(variables, text[:, position], cache)
        np.testing.assert_allclose(logits, full[:, position], atol=PARITY_ATOL)


def test_stack_and_unstack_round_trip(tiny):
    params = tiny[3]
    stacked = layer_stack.stack_layers(params)
    assert "layers_0" not in stacked["backbone"]
    kernel = stacked["backbone"]["layers"]["expert_1"]["mlp"]["up_proj"]["kernel"]
    for layer in range(2):
        expected = params["backbone"][f"layers_{layer}"]["expert_1"]["mlp"]["up_proj"]["kernel"]
        np.testing.assert_array_equal(kernel[layer], expected)
    restored = layer_stack.unstack_layers(stacked)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for got, expected in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, expected)


def test_optimizer_state_stacks_like_parameters(tiny):
    params = tiny[3]
    tx = trainer_lib.make_optimizer(tiny_config().optim, total_steps=10)
    stacked_state = layer_stack.stack_layers(tx.init(params))
    expected = tx.init(layer_stack.stack_layers(params))
    assert jax.tree.structure(stacked_state) == jax.tree.structure(expected)
    shapes = lambda tree: [leaf.shape for leaf in jax.tree.leaves(tree)]  # noqa: E731
    assert shapes(stacked_state) == shapes(expected)
    assert isinstance(stacked_state[1][0], optax.ScaleByAdamState)


def test_stack_rejects_missing_or_different_layers():
    layer = {"kernel": np.zeros((2, 2))}
    with pytest.raises(ValueError, match="layers_0 .. layers_"):
        layer_stack.stack_layers({"layers_0": layer, "layers_2": layer})
    with pytest.raises(ValueError, match="only identical layers can be stacked"):
        layer_stack.stack_layers({"layers_0": layer, "layers_1": {"bias": np.zeros(2)}})


def test_unknown_remat_policy_is_rejected():
    config = tiny_config()
    config.model.remat = "everything"
    with pytest.raises(ValueError, match="model.remat='everything' is not a remat policy"):
        configs.model_config(config, TINY_VOCAB)


def test_config_without_new_fields_uses_defaults():
    config = tiny_config()
    with config.unlocked():
        del config.model["remat"]
        del config.model["scan_layers"]
    model_config = configs.model_config(config, TINY_VOCAB)
    assert model_config.backbone.remat == "none"
    assert not model_config.encoder.scan_layers
