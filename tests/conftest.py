"""Shared fixtures: a tiny model that runs in milliseconds on one CPU core."""

import os
import sys

import flax.linen as nn
import jax
import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
)

from rf_jax import configs  # noqa: E402
from rf_jax import trainer as trainer_lib  # noqa: E402
from rf_jax.model import RFModel  # noqa: E402

TINY_VOCAB = 40


def tiny_config(image_size=16):
    """A config small enough for unit tests: 16 px images, width 32, 2 layers."""
    config = configs.default_config()
    config.model.image_size = image_size
    config.model.text_len = 6
    config.model.pixel_patch = 4
    config.model.pixel_bottleneck = 8
    config.model.backbone.update(
        width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48
    )
    config.model.encoder.update(
        patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32, num_registers=2
    )
    config.model.codebook.size = 12
    config.data.und_text_len = 8
    config.data.vocab_size = TINY_VOCAB
    config.data.batch_size = 4
    config.sample.num_steps = 3
    config.sample.prompts = ("red apple", "sun")
    return config


@pytest.fixture(scope="session")
def tiny():
    """(config, model_config, model, params) of a randomly initialised tiny model."""
    config = tiny_config()
    model_config = configs.model_config(config, TINY_VOCAB)
    model = RFModel(model_config)
    inputs = trainer_lib.dummy_inputs(model_config, config.data.und_text_len)
    params = nn.unbox(model.init(jax.random.key(0), **inputs, method=RFModel.initialize)["params"])
    # Layer-scale and zero biases start tiny; random values make every path visible.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        treedef,
        [
            leaf + 0.1 * jax.random.normal(key, leaf.shape, leaf.dtype)
            for leaf, key in zip(leaves, keys)
        ],
    )
    return config, model_config, model, params


@pytest.fixture(scope="session")
def cli_data_dir(tmp_path_factory):
    """Data root with OpenMoji built at 16 px for the launched training runs.

    It is the whole set, which takes about 5 s to build, because
    `rf_jax.train` builds without a limit and would replace a limited build.
    """
    from rf_jax.data import build

    root = str(tmp_path_factory.mktemp("cli_data"))
    build.build_dataset("openmoji", root, 16, 200)
    return root


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
    """Environment of launched runs, with a compile cache shared by all of them."""
    import train_cli

    return train_cli.cli_env(str(tmp_path_factory.mktemp("jax_cache")))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, cli_data_dir, cli_env):
    """Workdir of one uninterrupted single-process run of the tiny training config."""
    import train_cli

    workdir = str(tmp_path_factory.mktemp("reference_run"))
    train_cli.run(workdir, cli_data_dir, os.path.join(workdir, "train.log"), cli_env)
    return workdir
