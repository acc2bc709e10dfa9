"""DINOv3 ViT checkpoints into the understanding encoder: patch features match transformers.

Both sides compute in float32 on the CPU. The tolerance is 1e-4 of the largest
reference magnitude, far above the summation-order differences (near 1e-6 of
that scale) and far below what a mapping error would cause.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_checkpoints as hf
from rf_jax.model import RFModel
from rf_jax.pretrained import load_pretrained

RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["gelu", "gated"])
def dinov3(request, tmp_path_factory):
    """(torch model, directory, gated) of a DINOv3 ViT with a plain or gated MLP."""
    gated = request.param
    model = hf.dinov3_model(gated=gated, seed=3)
    return model, hf.save(model, tmp_path_factory.mktemp("dinov3")), gated


def convert(directory, gated):
    config = hf.rf_config(gated=gated)
    model_config = hf.model_config(config)
    state = hf.blank_state(config, model_config)
    state, report = load_pretrained(state, model_config, encoder_path=directory)
    return RFModel(model_config), state, report


def test_dinov3_patch_features_match(dinov3):
    torch_model, directory, gated = dinov3
    model, state, _ = convert(directory, gated)
    images = np.random.RandomState(0).randint(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    prefix = 1 + hf.DINO_FIELDS["num_registers"]

    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=RFModel.encode))
    features = np.asarray(encode(state.params, jnp.asarray(images)))
    with torch.no_grad():
        expected = torch_model(hf.normalised_pixels(images)).last_hidden_state[:, prefix:].numpy()

    assert features.shape == expected.shape
    error = np.max(np.abs(features - expected)) / np.max(np.abs(expected))
    assert error < RELATIVE_TOLERANCE


def test_dinov3_ema_encoder_equals_encoder(dinov3):
    _, directory, gated = dinov3
    _, state, _ = convert(directory, gated)

    online = jax.tree_util.tree_flatten_with_path(state.params["encoder"])[0]
    ema = dict(jax.tree_util.tree_flatten_with_path(state.ema_encoder)[0])
    for path, leaf in online:
        np.testing.assert_array_equal(np.asarray(ema[path]), np.asarray(leaf))


def test_dinov3_missing_key_bias_is_zero(dinov3):
    torch_model, directory, gated = dinov3
    _, state, report = convert(directory, gated)
    layer = state.params["encoder"]["layers_0"]

    np.testing.assert_array_equal(np.asarray(layer["k_proj"]["bias"]), 0.0)
    expected_q_bias = torch_model.model.layer[0].attention.q_proj.bias.detach().numpy()
    np.testing.assert_array_equal(np.asarray(layer["q_proj"]["bias"]), expected_q_bias)
    assert any("['k_proj'] set to zero" in line for line in report.lines)


def test_dinov3_config_mismatch_names_field(dinov3):
    _, directory, gated = dinov3
    config = hf.rf_config(gated=not gated)
    config.model.encoder.num_registers = 4
    model_config = hf.model_config(config)
    state = hf.blank_state(config, model_config)

    with pytest.raises(ValueError) as error:
        load_pretrained(state, model_config, encoder_path=directory)

    message = str(error.value)
    assert "--config.model.encoder.num_registers=2" in message
    assert f"--config.model.encoder.mlp_type={'swiglu' if gated else 'gelu'}" in message


def test_dinov3_checkpoint_as_llm_raises(dinov3):
    _, directory, _ = dinov3
    config = hf.rf_config()
    model_config = hf.model_config(config)
    state = hf.blank_state(config, model_config)

    with pytest.raises(ValueError, match="model_type='dinov3_vit'"):
        load_pretrained(state, model_config, llm_path=directory)
