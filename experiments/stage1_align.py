"""Stage 1, alignment: train the new modules against a frozen language model and encoder.

    python -m rf_jax.train --config experiments/stage1_align.py --workdir gs://BUCKET/stage1

At full scale (a Qwen2.5-1.5B-shaped backbone, a ViT-L/16 encoder, 256 px)
this is a TPU-pod run: see launch/tpu_pod.sh. Only the connector, the rep and
pixel experts, their embeddings, heads and norms, and the time embedding
learn (`optim.frozen`); understanding rows dominate the mixture. Start it from
pretrained weights with the converters, or from scratch for a smoke test.

`:small` runs here in about two minutes on a 2-core CPU (32 px OpenMoji):
    python -m rf_jax.train --config experiments/stage1_align.py:small \\
        --workdir workdirs/stage1_align_small
"""

from rf_jax import configs


def get_config(arg=None):
    config = configs.default_config()
    config.data.name = "openmoji"
    if arg == "small":
        configs.small_scale(config, image_size=32)
    elif arg is None:
        configs.full_scale(config, image_size=256)
        config.data.batch_size = 512
        config.train.steps = 20_000
        config.optim.warmup_steps = 1000
    else:
        raise ValueError(f"Unknown argument {arg!r}: use no argument or 'small'.")
    config.optim.frozen = configs.ALIGNMENT_FROZEN
    config.optim.learning_rate = 1e-3
    config.data.mixture.update(generation=0.5, understanding=0.5)
    return config
