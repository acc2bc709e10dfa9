"""Tests for rf_jax.ema."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rf_jax.ema import ema_update


def _trees(seed=0):
    rng = np.random.default_rng(seed)

    def tree():
        return {
            "dense": {
                "kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
            },
            "embed": [jnp.asarray(rng.normal(size=(2, 5)), jnp.bfloat16)],
            "step": jnp.asarray(rng.integers(0, 100), jnp.int32),
        }

    return tree(), tree()


def test_ema_matches_numpy():
    ema, params = _trees()
    decay = 0.9

    new_ema = ema_update(ema, params, decay)

    for path in [("dense", "kernel"), ("dense", "bias")]:
        old = np.asarray(ema[path[0]][path[1]], np.float64)
        new = np.asarray(params[path[0]][path[1]], np.float64)
        np.testing.assert_allclose(
            new_ema[path[0]][path[1]], decay * old + (1 - decay) * new, rtol=1e-6, atol=1e-7
        )
    # bf16 has an 8-bit significand, so rounding to it costs at most 2**-8 relative.
    old = np.asarray(ema["embed"][0], np.float64)
    new = np.asarray(params["embed"][0], np.float64)
    np.testing.assert_allclose(
        np.asarray(new_ema["embed"][0], np.float64),
        decay * old + (1 - decay) * new,
        rtol=2**-8,
        atol=1e-6,
    )
    # Integer leaves are copied from params.
    np.testing.assert_array_equal(new_ema["step"], params["step"])


def test_ema_decay_one_keeps_ema():
    ema, params = _trees(1)
    new_ema = ema_update(ema, params, 1.0)

    np.testing.assert_array_equal(new_ema["dense"]["kernel"], ema["dense"]["kernel"])
    np.testing.assert_array_equal(new_ema["dense"]["bias"], ema["dense"]["bias"])
    np.testing.assert_array_equal(new_ema["embed"][0], ema["embed"][0])
    # Integer leaves are copied from params whatever the decay.
    np.testing.assert_array_equal(new_ema["step"], params["step"])


def test_ema_decay_zero_copies_params():
    ema, params = _trees(2)
    new_ema = ema_update(ema, params, 0.0)
    for new_leaf, param_leaf in zip(jax.tree.leaves(new_ema), jax.tree.leaves(params)):
        np.testing.assert_array_equal(new_leaf, param_leaf)


def test_ema_preserves_dtypes_under_jit():
    ema, params = _trees(3)
    new_ema = jax.jit(ema_update)(ema, params, jnp.float32(0.99))

    assert jax.tree.structure(new_ema) == jax.tree.structure(ema)
    for new_leaf, old_leaf in zip(jax.tree.leaves(new_ema), jax.tree.leaves(ema)):
        assert new_leaf.dtype == old_leaf.dtype
        assert new_leaf.shape == old_leaf.shape


def test_ema_rejects_bad_input():
    ema, params = _trees(4)
    with pytest.raises(ValueError, match="decay"):
        ema_update(ema, params, 1.5)
    with pytest.raises(ValueError, match="structure"):
        ema_update(ema, {"dense": params["dense"]}, 0.9)
    params["dense"]["bias"] = jnp.zeros((5,))
    with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\].*\(4,\).*\(5,\)"):
        ema_update(ema, params, 0.9)
