"""`dot_product_attention` against a plain numpy version, whole and in query blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rf_jax.layers import dot_product_attention

BATCH, Q_LEN, K_LEN, HEADS, KV_HEADS, HEAD_DIM = 2, 8, 12, 4, 2, 8
# float32 sums of at most 12 products in another order: agreement within 1e-5.
ATOL = 1e-5


def numpy_attention(q, k, v, mask, scale):
    """Grouped-query attention one (batch, head) at a time, in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            logits = scale * q[b, :, h] @ k[b, :, h // groups].T
            logits = np.where(mask[b], logits, -1e30)
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            out[b, :, h] = weights @ v[b, :, h // groups]
    return out


@pytest.fixture(scope="module")
def inputs():
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (BATCH, Q_LEN, HEADS, HEAD_DIM))
    k = jax.random.normal(keys[1], (BATCH, K_LEN, KV_HEADS, HEAD_DIM))
    v = jax.random.normal(keys[2], (BATCH, K_LEN, KV_HEADS, HEAD_DIM))
    # Causal over the last Q_LEN keys, with the first 4 keys (a cached prefix) visible.
    causal = np.tril(np.ones((Q_LEN, Q_LEN), bool))
    mask = np.concatenate([np.ones((Q_LEN, K_LEN - Q_LEN), bool), causal], axis=1)
    mask = np.broadcast_to(mask, (BATCH, Q_LEN, K_LEN)).copy()
    mask[1, :, 0] = False  # Rows differ.
    return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("query_block", [0, 2, 4, 8, 3])
def test_attention_matches_numpy(inputs, query_block):
    # 3 does not divide 8, so the queries are processed at once.
    q, k, v, mask = inputs
    scale = HEAD_DIM**-0.5
    got = jax.jit(dot_product_attention, static_argnums=(4, 5))(q, k, v, mask, scale, query_block)
    np.testing.assert_allclose(got, numpy_attention(q, k, v, np.asarray(mask), scale), atol=ATOL)


def test_blocked_attention_gradients_match_whole(inputs):
    q, k, v, mask = inputs

    def loss(q, k, v, block):
        return jnp.sum(jnp.sin(dot_product_attention(q, k, v, mask, 0.3, block)))

    whole = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, 0)
    blocked = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, 2)
    for got, expected in zip(blocked, whole):
        np.testing.assert_allclose(got, expected, atol=ATOL)
