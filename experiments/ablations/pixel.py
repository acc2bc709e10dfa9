"""Ablation: pixel-space generation without rep tokens.

This is "Pixel w/o RF" in the Representation Forcing paper.

    python -m rf_jax.train --config experiments/ablations/pixel.py:shapes --workdir workdirs/pixel

The argument is `DATASET[,SEED[,K]]`: `shapes` (the default) or `fashion_mnist`,
the seed of data order and initialisation (0), and the codebook size K (256).
On a 2-core CPU one run of 800 steps takes a few minutes. `rf_jax.eval.ablations`
trains and evaluates every variant and writes docs/results.md.
"""

from rf_jax.eval import ablations


def get_config(arg=None):
    return ablations.config_from_arg("pixel", arg)
