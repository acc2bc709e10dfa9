"""Config of the tiny training runs that the resume and multi-process tests launch.

    python -m rf_jax.train --config tests/scripts/tiny_train_config.py \
        --config.data.dir=DATA_DIR --workdir WORKDIR

The learning rate is constant, so a run stopped after any number of steps
and continued with a larger `train.steps` trains exactly like one longer run.
Each global batch has 2 generation and 2 understanding rows, which split
evenly over 1 or 2 processes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_config  # noqa: E402


def get_config(arg=None):
    del arg
    config = tiny_config()
    config.data.vocab_size = 200
    config.data.mixture.generation = 0.5
    config.data.mixture.understanding = 0.5
    config.train.steps = 15
    config.train.log_every = 1
    config.train.checkpoint_every = 3
    config.train.keep_checkpoints = 2
    config.train.num_caption_images = 2
    config.train.caption_max_tokens = 2
    config.sample.num_steps = 2
    config.sample.prompts = ("sun",)
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 0
    config.optim.min_lr_ratio = 1.0
    return config
