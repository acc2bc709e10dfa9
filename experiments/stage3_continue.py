"""Stage 3, continued training up to 1024 px, from the stage-2 parameters.

    python -m rf_jax.train --config experiments/stage3_continue.py \\
        --workdir gs://BUCKET/stage3 --config.train.init_from=gs://BUCKET/stage2

The image size grows from 256 to 1024 px. No parameter shape depends on it:
the 2-D position tables of rep tokens and pixel patches and the encoder's 2-D
RoPE are computed for the new grid (64 x 64 patches), so the stage-2
checkpoint loads as it is. Sequences are long here (4,096 rep tokens and
4,096 pixel patches per image), so the batch is smaller.

`:small` continues `workdirs/stage2_pretrain_small` at 64 px (about three minutes):
    python -m rf_jax.train --config experiments/stage3_continue.py:small \\
        --workdir workdirs/stage3_continue_small
"""

from rf_jax import configs


def get_config(arg=None):
    config = configs.default_config()
    config.data.name = "openmoji"
    if arg == "small":
        configs.small_scale(config, image_size=64)
        config.train.init_from = "workdirs/stage2_pretrain_small"
    elif arg is None:
        configs.full_scale(config, image_size=1024)
        config.data.batch_size = 256
        config.train.steps = 50_000
        config.optim.warmup_steps = 1000
        config.train.init_from = "gs://BUCKET/stage2"
    else:
        raise ValueError(f"Unknown argument {arg!r}: use no argument or 'small'.")
    config.optim.learning_rate = 1e-4
    config.data.mixture.update(generation=0.9, understanding=0.1)
    return config
