"""Training in stages: frozen alignment, start from the previous stage, resolution change."""

import logging

import jax
import numpy as np
import pytest

import stage1_align
import stage2_pretrain
import stage3_continue
from conftest import tiny_config
from rf_jax import checkpointing
from rf_jax import configs
from rf_jax import layer_stack
from rf_jax import partitioning
from rf_jax import train
from rf_jax import trainer as trainer_lib
from rf_jax.data import build
from rf_jax.data import pipeline


def _names(tree):
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _stage_config(module, data_dir, image_size=16, init_from="", steps=4):
    """The stage's `small` config with the tiny model of the unit tests."""
    config = module.get_config("small")
    tiny = tiny_config(image_size)
    for section in ("backbone", "encoder", "codebook"):
        config.model[section].update(tiny.model[section].to_dict())
    config.model.image_size = image_size
    config.model.text_len = 6
    config.model.pixel_bottleneck = 8
    config.data.update(dir=data_dir, vocab_size=200, und_text_len=8, batch_size=8)
    config.train.update(
        steps=steps,
        log_every=2,
        checkpoint_every=2,
        num_caption_images=2,
        caption_max_tokens=2,
        init_from=init_from,
    )
    config.sample.update(num_steps=2, prompts=("sun",))
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    build.build_dataset("openmoji", root, 16, 200, limit=48)
    build.build_dataset("openmoji", root, 32, 200, limit=48)
    return root


@pytest.fixture(scope="module")
def stage1(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("stage1"))
    config = _stage_config(stage1_align, data_dir)
    trainer = _trainer(config)
    initial = _names(trainer.init_state(config.train.seed).params)
    final = train.train_and_evaluate(config, workdir)
    return workdir, initial, final


@pytest.fixture(scope="module")
def stage2(stage1, data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("stage2"))
    config = _stage_config(stage2_pretrain, data_dir, init_from=stage1[0])
    return workdir, config, train.train_and_evaluate(config, workdir)


def _trainer(config):
    tokenizer = pipeline.load_tokenizer(config.data)
    model_config = configs.model_config(config, tokenizer.vocab_size)
    mesh = partitioning.create_mesh(config.mesh)
    return trainer_lib.Trainer(config, model_config, mesh, config.train.steps)


def test_alignment_stage_keeps_the_frozen_parameters(stage1):
    _, initial, final = stage1
    final = _names(final.params)
    frozen = trainer_lib.frozen_labels(final, configs.ALIGNMENT_FROZEN)
    frozen_names = [name for name, label in frozen.items() if label == "frozen"]
    assert "backbone/layers_0/attn/q_proj/kernel" in frozen_names
    assert "encoder/patch_embed/kernel" in frozen_names
    for name in frozen_names:
        np.testing.assert_array_equal(final[name], initial[name], err_msg=name)
    for name in ("connector/fc1/kernel", "backbone/layers_0/expert_2/mlp/up_proj/kernel"):
        assert not np.array_equal(final[name], initial[name]), f"{name} did not train"


def test_alignment_patterns_cover_the_scanned_layout(stage1):
    _, _, final = stage1
    stacked = layer_stack.stack_layers(final.params)
    labels = trainer_lib.frozen_labels(_names(stacked), configs.ALIGNMENT_FROZEN)
    assert labels["backbone/layers/attn/q_proj/kernel"] == "frozen"
    assert labels["backbone/layers/expert_0/mlp/up_proj/kernel"] == "frozen"
    assert labels["backbone/layers/expert_2/mlp/up_proj/kernel"] != "frozen"


def test_next_stage_takes_previous_parameters(stage1, data_dir):
    workdir, _, previous = stage1
    config = _stage_config(stage2_pretrain, data_dir, init_from=workdir)
    trainer = _trainer(config)
    abstract, _ = trainer.abstract_state()
    state = train.start_from_previous_stage(trainer, abstract, config)
    for part in ("params", "ema_encoder", "codebook"):
        got, want = _names(getattr(state, part)), _names(getattr(previous, part))
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{part}/{name}")
    assert int(state.step) == 0
    # A fresh AdamW state: zero moments (stage 1 had frozen parts and another layout).
    for leaf in jax.tree.leaves(state.opt_state):
        if leaf.ndim:
            np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_stage_resumes_own_checkpoint_first(stage2, data_dir, caplog):
    workdir, config, state = stage2
    assert int(state.step) == 4
    config.train.steps = 6
    with caplog.at_level(logging.INFO):
        resumed = train.train_and_evaluate(config, workdir)
    assert "Resuming from the checkpoint of step 4" in caplog.text
    assert "previous stage" not in caplog.text
    assert int(resumed.step) == 6


def test_resolution_change_loads_the_previous_stage(stage2, data_dir, tmp_path, caplog):
    previous = stage2[2]
    config = _stage_config(stage3_continue, data_dir, image_size=32, init_from=stage2[0], steps=2)
    trainer = _trainer(config)
    assert trainer.model_config.rep_grid == 4  # 4 x 4 rep cells at 32 px, 2 x 2 before.
    with caplog.at_level(logging.INFO):
        state = train.train_and_evaluate(config, str(tmp_path))
    assert "Starting from step 6 of the previous stage" in caplog.text
    assert int(state.step) == 2
    assert _names(state.params).keys() == _names(previous.params).keys()


def test_previous_stage_with_another_codebook_size_is_rejected(stage1, data_dir):
    config = _stage_config(stage2_pretrain, data_dir, init_from=stage1[0])
    config.model.codebook.size = 20
    trainer = _trainer(config)
    abstract, _ = trainer.abstract_state()
    with pytest.raises(
        ValueError, match=r"rep_head/kernel: checkpoint \(32, 12\), config \(32, 20\)"
    ):
        train.start_from_previous_stage(trainer, abstract, config)


def test_missing_previous_stage_names_the_setting(data_dir, tmp_path):
    config = _stage_config(stage2_pretrain, data_dir, init_from=str(tmp_path / "nothing"))
    trainer = _trainer(config)
    abstract, _ = trainer.abstract_state()
    with pytest.raises(FileNotFoundError, match="train.init_from"):
        train.start_from_previous_stage(trainer, abstract, config)


def test_frozen_pattern_that_matches_nothing_is_rejected(data_dir):
    config = _stage_config(stage1_align, data_dir)
    config.optim.frozen = (r"^backbone/layer_0/",)
    with pytest.raises(ValueError, match="optim.frozen pattern '\\^backbone/layer_0/'"):
        _trainer(config).abstract_state()


def test_restore_parts_reads_the_checkpoints_directory_too(stage1):
    workdir, _, final = stage1
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step, parts = checkpointing.restore_parts(
        checkpointing.checkpoint_dir(workdir),
        {"step": jax.ShapeDtypeStruct((), np.int32, sharding=sharding)},
    )
    assert step == 4
    assert int(parts["step"]) == int(final.step)
