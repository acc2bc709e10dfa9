"""Stage 2, joint pre-training up to 256 px: every parameter learns.

    python -m rf_jax.train --config experiments/stage2_pretrain.py \\
        --workdir gs://BUCKET/stage2 --config.train.init_from=gs://BUCKET/stage1

A run with no checkpoint in its workdir starts from the parameters, EMA
encoder and codebook of the stage-1 run in `train.init_from`, with a fresh
optimiser and data iterator. The log records which start it took. Generation
rows dominate the mixture.

`:small` continues `workdirs/stage1_align_small` here (32 px, two minutes):
    python -m rf_jax.train --config experiments/stage2_pretrain.py:small \\
        --workdir workdirs/stage2_pretrain_small
"""

from rf_jax import configs


def get_config(arg=None):
    config = configs.default_config()
    config.data.name = "openmoji"
    if arg == "small":
        configs.small_scale(config, image_size=32)
        config.train.init_from = "workdirs/stage1_align_small"
    elif arg is None:
        configs.full_scale(config, image_size=256)
        config.data.batch_size = 1024
        config.train.steps = 200_000
        config.optim.warmup_steps = 2000
        config.train.init_from = "gs://BUCKET/stage1"
    else:
        raise ValueError(f"Unknown argument {arg!r}: use no argument or 'small'.")
    config.optim.learning_rate = 3e-4
    config.data.mixture.update(generation=0.75, understanding=0.25)
    return config
