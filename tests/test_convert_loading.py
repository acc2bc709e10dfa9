"""Loading into sharded states, the training hook and the `rf_jax.convert` command."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import hf_checkpoints as hf
from rf_jax import convert as convert_cli
from rf_jax import layer_stack
from rf_jax import pretrained

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "convert_sharded.py")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(Qwen2 directory, DINOv3 directory) of tiny random models."""
    root = tmp_path_factory.mktemp("checkpoints")
    llm = hf.save(hf.qwen2_model(tied=False, seed=4), root / "qwen", max_shard_size="50KB")
    encoder = hf.save(hf.dinov3_model(seed=5), root / "dinov3")
    return llm, encoder


@pytest.fixture(scope="module")
def sharded(checkpoints):
    """Output of the conversion onto a (data 1, fsdp 4, tensor 2) mesh of 8 fake devices."""
    result = subprocess.run(
        [sys.executable, SCRIPT, *checkpoints],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_sharded_conversion_keeps_target_shardings(sharded):
    assert len(sharded["specs"]) > 50
    for name, (actual, expected) in sharded["specs"].items():
        assert actual == expected, name


def test_sharded_conversion_splits_parameters(sharded):
    # q_proj kernel [64, 64] is ("embed", "heads") -> (fsdp 4, tensor 2): 16 x 32 per device.
    assert sharded["shard_shapes"]["q_proj"] == [[16, 32]]
    # The embedding [300, 64] is ("vocab", "embed") -> (tensor 2, fsdp 4).
    assert sharded["shard_shapes"]["embedding"] == [[150, 16]]


def test_sharded_conversion_equals_sources(sharded):
    # Copies and transposes only: every value is exact.
    for name, difference in sharded["differences"].items():
        assert difference == 0.0, name


def test_load_for_training_applies_config_paths(checkpoints):
    llm, encoder = checkpoints
    config = hf.rf_config()
    config.init.update(llm_path=llm, encoder_path=encoder)
    model_config = hf.model_config(config)

    state = pretrained.load_for_training(config, model_config, hf.blank_state(config, model_config))

    expected = hf.qwen2_model(tied=False, seed=4).model.norm.weight.detach().numpy()
    np.testing.assert_array_equal(
        np.asarray(state.params["backbone"]["final_norm_0"]["scale"]), expected
    )
    assert np.any(np.asarray(state.ema_encoder["final_norm"]["scale"]) != 0.0)


def test_scanned_model_loads_stacked_rows(checkpoints):
    llm, encoder = checkpoints
    loaded = {}
    for scan in (False, True):
        config = hf.rf_config()
        config.model.scan_layers = scan
        config.init.update(llm_path=llm, encoder_path=encoder)
        model_config = hf.model_config(config)
        state = pretrained.load_for_training(
            config, model_config, hf.blank_state(config, model_config)
        )
        loaded[scan] = state

    stacked = loaded[True].params["backbone"]["layers"]
    assert "layers_0" not in loaded[True].params["backbone"]
    # The stacked layout contains the same numbers as the per-layer one, copies only: exact.
    per_layer = layer_stack.unstack_layers(loaded[True].params)
    jax.tree.map(np.testing.assert_array_equal, per_layer, loaded[False].params)
    jax.tree.map(
        np.testing.assert_array_equal,
        layer_stack.unstack_layers(loaded[True].ema_encoder),
        loaded[False].ema_encoder,
    )
    assert stacked["attn"]["q_proj"]["kernel"].shape[0] == hf.rf_config().model.backbone.depth


def test_load_for_training_without_paths_is_identity():
    config = hf.rf_config()
    model_config = hf.model_config(config)
    state = hf.blank_state(config, model_config)

    assert pretrained.load_for_training(config, model_config, state) is state


def test_convert_command_reports_conversion(checkpoints, tmp_path):
    llm, encoder = checkpoints
    hf.write_tokenizer(llm, ["red", "apple"])

    lines, state = convert_cli.convert(hf.rf_config(), llm, encoder)
    text = "\n".join(lines)

    assert "added special tokens: <|rf_pad|>, <|rf_bos|>" in text
    assert "LM head: checkpoint untied, rf_jax separate lm_head." in text
    assert "Vocabulary: 300 rows, unchanged." in text
    assert "DINOv3 checkpoint" in text
    assert state.params["text_embed"]["embedding"].shape == (300, 64)
