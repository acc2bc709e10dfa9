"""Exponential moving average (EMA) of model parameters."""

import jax
import jax.numpy as jnp


def ema_update(ema_params, params, decay):
    """Blend params into the EMA: `ema = decay * ema + (1 - decay) * params`, per leaf.

    Pure and jit-compatible. Each floating leaf is computed in at least float32 and
    cast back to the dtype of its EMA leaf, so bf16 EMA leaves stay bf16. Non-floating
    leaves (integer counters, for example) are copied from `params`, because an
    average of them has no meaning.

    Args:
      ema_params: pytree of arrays, the current EMA.
      params: pytree with the same structure and leaf shapes as `ema_params`.
      decay: scalar in [0, 1], a Python float or a traced array. Decay 1 returns the
        EMA unchanged and decay 0 returns a copy of `params`.

    Returns:
      The new EMA pytree, with the structure and leaf dtypes of `ema_params`.
    """
    if isinstance(decay, (int, float)) and not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}.")
    ema_structure = jax.tree.structure(ema_params)
    params_structure = jax.tree.structure(params)
    if ema_structure != params_structure:
        raise ValueError(
            "ema_params and params must have the same pytree structure, got "
            f"{ema_structure} and {params_structure}."
        )

    def update_leaf(path, ema_leaf, param_leaf):
        ema_leaf = jnp.asarray(ema_leaf)
        param_leaf = jnp.asarray(param_leaf)
        if ema_leaf.shape != param_leaf.shape:
            raise ValueError(
                f"Leaf {jax.tree_util.keystr(path)} has shape {ema_leaf.shape} in "
                f"ema_params but {param_leaf.shape} in params."
            )
        if not jnp.issubdtype(ema_leaf.dtype, jnp.floating):
            return param_leaf.astype(ema_leaf.dtype)
        compute_dtype = jnp.promote_types(ema_leaf.dtype, jnp.float32)
        blended = decay * ema_leaf.astype(compute_dtype) + (1.0 - decay) * param_leaf.astype(
            compute_dtype
        )
        return blended.astype(ema_leaf.dtype)

    return jax.tree_util.tree_map_with_path(update_leaf, ema_params, params)
