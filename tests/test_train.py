"""End-to-end training on a tiny OpenMoji build: loss, outputs, checkpoints, bad input."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from rf_jax import caption
from rf_jax import checkpointing
from rf_jax import configs
from rf_jax import inference
from rf_jax import partitioning
from rf_jax import sample
from rf_jax import train
from rf_jax import trainer as trainer_lib
from rf_jax.data import build
from rf_jax.data import pipeline

STEPS = 20
QUICKSTART = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "quickstart.py"
)


def _config(data_dir):
    config = tiny_config()
    config.data.dir = data_dir
    config.data.vocab_size = 200
    config.data.text_len = 6
    config.model.text_len = 6
    config.train.steps = STEPS
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.num_caption_images = 4
    config.train.caption_max_tokens = 4
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 2
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    build.build_dataset("openmoji", root, 16, 200, limit=64)
    return root


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    state = train.train_and_evaluate(_config(data_dir), workdir)
    return workdir, state


def test_loss_falls_over_twenty_steps(data_dir):
    config = _config(data_dir)
    tokenizer = pipeline.load_tokenizer(config.data)
    model_config = configs.model_config(config, tokenizer.vocab_size)
    mesh = partitioning.create_mesh(config.mesh)
    trainer = trainer_lib.Trainer(config, model_config, mesh, STEPS)
    _, shardings = trainer.abstract_state()
    state = trainer.init_state(0)
    step = trainer.jit_train_step(shardings)
    iterator = pipeline.make_train_iterator(config.data, tokenizer)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, partitioning.global_batch(next(iterator), mesh))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    # Text cross-entropy alone starts near ln(vocab) = 5.3; 20 steps at lr 3e-3 remove
    # well over a third of the loss.
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_run_writes_outputs(trained_run):
    workdir, _ = trained_run
    for name in ("samples.png", "captions.txt", "config.json", "tokenizer.model"):
        assert os.path.exists(os.path.join(workdir, name)), name
    grid = np.asarray(Image.open(os.path.join(workdir, "samples.png")))
    assert grid.ndim == 3
    with open(os.path.join(workdir, "captions.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "reference\tgenerated"
    assert len(lines) == 5


def test_checkpoint_reloads_identical_params(trained_run):
    workdir, state = trained_run
    _, _, _, params = inference.load_run(workdir)
    saved = jax.tree.leaves(state.params)
    loaded = jax.tree.leaves(params)
    assert len(saved) == len(loaded)
    for a, b in zip(saved, loaded):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rerun_resumes_from_checkpoint(trained_run, data_dir):
    workdir, state = trained_run
    config = _config(data_dir)
    config.train.steps = STEPS + 5
    resumed = train.train_and_evaluate(config, workdir)
    assert int(resumed.step) == STEPS + 5
    manager = checkpointing.create_manager(workdir, asynchronous=False)
    assert manager.latest_step() == STEPS + 5
    manager.close()


def test_ema_encoder_gets_no_gradient(data_dir):
    config = _config(data_dir)
    tokenizer = pipeline.load_tokenizer(config.data)
    model_config = configs.model_config(config, tokenizer.vocab_size)
    trainer = trainer_lib.Trainer(config, model_config, partitioning.create_mesh(config.mesh), 10)
    state = trainer.init_state(0)
    batch = jax.tree.map(jnp.asarray, next(pipeline.make_train_iterator(config.data, tokenizer)))

    def loss_of_ema(ema):
        _, targets = trainer.rep_targets(ema, state.codebook, batch["gen_image"])
        return trainer.loss(state.params, batch, targets, jax.random.key(0))[0]

    ema_grads = jax.jit(jax.grad(loss_of_ema))(state.ema_encoder)
    for leaf in jax.tree.leaves(ema_grads):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)

    _, targets = trainer.rep_targets(state.ema_encoder, state.codebook, batch["gen_image"])
    param_grads = jax.grad(lambda p: trainer.loss(p, batch, targets, jax.random.key(0))[0])(
        state.params
    )
    encoder_norm = float(
        jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(param_grads["encoder"])))
    )
    assert encoder_norm > 0.0, "the online encoder learns through the understanding loss"


def test_sample_cli_writes_png(trained_run, tmp_path):
    workdir, _ = trained_run
    out = str(tmp_path / "apple.png")
    images = sample.generate_to_png(workdir, ["red apple", "sun"], out, num_steps=2)
    assert images.shape == (2, 16, 16, 3)
    # Two 16 px images with a 2 px border, enlarged 4 times.
    assert Image.open(out).size == ((2 * (16 + 2) + 2) * 4, (16 + 2 + 2) * 4)


def test_sample_cli_rejects_empty_prompt_list(trained_run, tmp_path):
    workdir, _ = trained_run
    with pytest.raises(ValueError, match="at least one --prompt"):
        sample.generate_to_png(workdir, [], str(tmp_path / "x.png"))


def test_overlong_prompt_is_truncated(trained_run):
    workdir, _ = trained_run
    _, model_config, tokenizer, _ = inference.load_run(workdir)
    long_prompt = " ".join(["red apple"] * 20)
    rows = inference.encode_prompts(tokenizer, [long_prompt], model_config.text_len)
    expected = [1] + tokenizer.encode(long_prompt)[: model_config.text_len - 1]
    np.testing.assert_array_equal(rows[0], expected)


def test_caption_cli_reads_png(trained_run, tmp_path):
    workdir, _ = trained_run
    path = str(tmp_path / "red.png")
    Image.new("RGBA", (40, 40), (255, 0, 0, 255)).save(path)
    answers = caption.caption_files(workdir, [path], max_tokens=3)
    assert len(answers) == 1
    assert isinstance(answers[0], str)


@pytest.mark.parametrize(
    "content,message", [(b"", "is empty"), (b"not an image", "could not be decoded")]
)
def test_caption_cli_rejects_bad_image(trained_run, tmp_path, content, message):
    workdir, _ = trained_run
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        caption.caption_files(workdir, [str(path)])


def test_missing_workdir_has_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="rf_jax.train"):
        inference.load_run(str(tmp_path / "nothing"))


def _restore_error(workdir, config):
    """The message of the error raised by restoring `workdir`'s checkpoint under `config`."""
    tokenizer = pipeline.load_tokenizer(config.data)
    model_config = configs.model_config(config, tokenizer.vocab_size)
    trainer = trainer_lib.Trainer(
        config, model_config, partitioning.create_mesh(config.mesh), STEPS
    )
    abstract, _ = trainer.abstract_state()
    manager = checkpointing.create_manager(workdir, asynchronous=False)
    try:
        with pytest.raises(ValueError) as error:
            checkpointing.restore(manager, abstract)
    finally:
        manager.close()
    return str(error.value)


def test_restore_into_other_codebook_size_lists_mismatch(trained_run, data_dir):
    workdir, _ = trained_run
    config = _config(data_dir)
    config.model.codebook.size = 20
    message = _restore_error(workdir, config)
    assert "codebook/prototypes: checkpoint (12, 16), config (20, 16)" in message


def test_restore_into_scanned_layout_lists_the_layer_arrays(trained_run, data_dir):
    workdir, _ = trained_run
    config = _config(data_dir)
    config.model.scan_layers = True
    message = _restore_error(workdir, config)
    assert "the checkpoint has one entry per layer (layers_0, ...) but the config" in message
    assert "set model.scan_layers=false" in message


def test_refused_restart_leaves_the_saved_config(trained_run, data_dir):
    workdir, _ = trained_run
    path = os.path.join(workdir, "config.json")
    with open(path, encoding="utf-8") as saved:
        before = saved.read()
    config = _config(data_dir)
    config.model.scan_layers = True
    with pytest.raises(ValueError, match="model.scan_layers"):
        train.train_and_evaluate(config, workdir)
    with open(path, encoding="utf-8") as saved:
        assert saved.read() == before


def test_unknown_config_field_is_rejected(tmp_path):
    command = [
        sys.executable,
        "-m",
        "rf_jax.train",
        "--config",
        QUICKSTART,
        "--config.train.no_such_field=1",
        "--workdir",
        str(tmp_path / "run"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "no_such_field" in result.stderr
    assert not os.path.exists(tmp_path / "run"), "nothing is written for a bad config"


def _nonfinite_trainer(data_dir, policy):
    config = _config(data_dir)
    config.loss.fm_weight = float("nan")
    config.train.nonfinite = policy
    tokenizer = pipeline.load_tokenizer(config.data)
    model_config = configs.model_config(config, tokenizer.vocab_size)
    mesh = partitioning.create_mesh(config.mesh)
    trainer = trainer_lib.Trainer(config, model_config, mesh, STEPS)
    batch = partitioning.global_batch(
        next(pipeline.make_train_iterator(config.data, tokenizer)), mesh
    )
    return config, trainer, batch


def test_nonfinite_loss_skips_update(data_dir):
    _, trainer, batch = _nonfinite_trainer(data_dir, "skip")
    _, shardings = trainer.abstract_state()
    state = trainer.init_state(0)
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = trainer.jit_train_step(shardings)(state, batch)
    assert int(state.skipped_steps) == 1
    assert int(state.step) == 1
    assert not np.isfinite(float(metrics["loss"]))
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(old, np.asarray(new))


def test_nonfinite_loss_stops_run_naming_step(data_dir, tmp_path):
    config, _, _ = _nonfinite_trainer(data_dir, "error")
    with pytest.raises(FloatingPointError, match="at step 1:"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_unknown_nonfinite_policy_rejected(data_dir):
    with pytest.raises(ValueError, match="train.nonfinite='ignore'"):
        _nonfinite_trainer(data_dir, "ignore")
