"""Building blocks shared by the encoder and the backbone.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`)
so that the rules in the config decide how it is sharded over the mesh.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from rf_jax.partitioning import gather_for_compute

Dtype = jnp.dtype


def _init(initializer, names):
    return nn.with_logical_partitioning(initializer, names)


def constrain(x, names):
    """Constrain an activation's sharding by logical axis names (no-op without rules)."""
    return nn.with_logical_constraint(x, names)


class Dense(nn.Module):
    """A dense layer whose kernel [in, out] and bias [out] carry logical names."""

    features: int
    kernel_axes: tuple[str, str]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            _init(self.kernel_init, self.kernel_axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        kernel = gather_for_compute(kernel, self.kernel_axes)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                _init(nn.initializers.zeros, self.kernel_axes[1:]),
                (self.features,),
                self.param_dtype,
            )
            bias = gather_for_compute(bias, self.kernel_axes[1:])
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale, computed in float32."""

    eps: float = 1e-6
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            _init(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """Layer norm with learned scale and bias, computed in float32."""

    eps: float = 1e-6
    axis_name: str = "enc_embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        scale = self.param(
            "scale", _init(nn.initializers.ones, (self.axis_name,)), (dim,), self.param_dtype
        )
        bias = self.param(
            "bias", _init(nn.initializers.zeros, (self.axis_name,)), (dim,), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * scale + bias).astype(self.dtype)


class SwiGLU(nn.Module):
    """Gated feed-forward block: down(silu(gate(x)) * up(x))."""

    hidden_dim: int
    embed_axis: str = "embed"
    mlp_axis: str = "mlp"
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda features, axes, name: Dense(  # noqa: E731
            features,
            axes,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        gate = dense(self.hidden_dim, (self.embed_axis, self.mlp_axis), "gate_proj")(x)
        up = dense(self.hidden_dim, (self.embed_axis, self.mlp_axis), "up_proj")(x)
        hidden = nn.silu(gate) * up
        hidden = constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(x.shape[-1], (self.mlp_axis, self.embed_axis), "down_proj")(hidden)


class GeluMLP(nn.Module):
    """Plain feed-forward block with the exact (erf) GELU: down(gelu(up(x)))."""

    hidden_dim: int
    embed_axis: str = "embed"
    mlp_axis: str = "mlp"
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda features, axes, name: Dense(  # noqa: E731
            features,
            axes,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        hidden = dense(self.hidden_dim, (self.embed_axis, self.mlp_axis), "up_proj")(x)
        hidden = jax.nn.gelu(hidden, approximate=False)
        hidden = constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(x.shape[-1], (self.mlp_axis, self.embed_axis), "down_proj")(hidden)


def rope_frequencies(head_dim, positions, theta):
    """Return (cos, sin), each [..., head_dim], for 1-D rotary embeddings.

    The layout rotates the two halves of the head dimension against each other,
    as Qwen2 and most Hugging Face models do, so converted weights match.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate x [batch, seq, heads, head_dim] by (cos, sin) [batch, seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)


def grid_coordinates(grid_size):
    """Return the centres of a grid_size x grid_size grid in [0, 1], [grid**2, 2] as (y, x)."""
    centres = (jnp.arange(grid_size, dtype=jnp.float32) + 0.5) / grid_size
    yy, xx = jnp.meshgrid(centres, centres, indexing="ij")
    return jnp.stack([yy.reshape(-1), xx.reshape(-1)], axis=-1)


def sincos_2d(grid_size, dim, max_frequency=64.0):
    """Return a fixed 2-D sine-cosine embedding [grid**2, dim] of patch centres.

    Coordinates are in image units ([0, 1]) and frequencies run geometrically
    from 1 to max_frequency cycles per image, so grids of different sizes over
    the same image agree where they overlap and a new resolution needs no new
    parameters.
    """
    if dim % 4:
        raise ValueError(f"2-D sine-cosine embedding needs dim divisible by 4, got {dim}.")
    quarter = dim // 4
    exponents = jnp.arange(quarter, dtype=jnp.float32) / max(quarter - 1, 1)
    frequencies = max_frequency**exponents
    coords = grid_coordinates(grid_size)
    parts = []
    for axis in range(2):
        angles = 2 * math.pi * coords[:, axis : axis + 1] * frequencies[None, :]
        parts += [jnp.sin(angles), jnp.cos(angles)]
    return jnp.concatenate(parts, axis=-1)


def timestep_embedding(t, dim, max_period=10_000.0):
    """Return sinusoidal features [batch, dim] of flow times t [batch] in [0, 1]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = (t.astype(jnp.float32) * 1000.0)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def dot_product_attention(q, k, v, mask, scale, query_block=0):
    """Grouped-query attention with a boolean mask, logits and softmax in float32.

    The heads are moved ahead of the positions first, so that both matrix
    multiplies read and write contiguous [positions, head_dim] slices.

    With `0 < query_block < q_len` (q_len a multiple of it), the queries are
    processed `query_block` at a time by a loop, and the backward pass
    recomputes each block's softmax. Only one block's logits
    [batch, heads, query_block, k_len] exist at a time, instead of all of
    them: on CPUs, whose memory bandwidth the full logits exceed, this is
    several times faster (see `docs/benchmarks.md`). Accelerators run the
    loop serially, so leave it at 0 there. The result is the same either
    way: every query row is computed alone.

    Args:
        q: [batch, q_len, heads, head_dim].
        k, v: [batch, k_len, kv_heads, head_dim]; heads must be a multiple of kv_heads.
        mask: bool [batch, q_len, k_len].
        scale: multiplier of the logits.
        query_block: queries per block, or 0 for all at once.

    Returns:
        [batch, q_len, heads, head_dim]. A query with no allowed key (padding)
        gets a finite average of the values, which callers ignore.
    """
    batch, q_len, heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    # [batch, kv_heads, groups, q_len, head_dim] and [batch, kv_heads, k_len, head_dim].
    q = jnp.transpose(q.reshape(batch, q_len, kv_heads, groups, head_dim), (0, 2, 3, 1, 4))
    k, v = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
    big_negative = jnp.float32(-0.7 * jnp.finfo(jnp.float32).max)

    def attend(q, mask):
        logits = jnp.einsum("BKGQD,BKSD->BKGQS", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(mask[:, None, None, :, :], logits * scale, big_negative)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("BKGQS,BKSD->BKGQD", weights, v)

    if 0 < query_block < q_len and q_len % query_block == 0:
        blocks = q_len // query_block
        q = jnp.moveaxis(q.reshape(batch, kv_heads, groups, blocks, query_block, head_dim), 3, 0)
        mask = jnp.moveaxis(mask.reshape(batch, blocks, query_block, k_len), 1, 0)
        out = jax.lax.map(lambda block: jax.checkpoint(attend)(*block), (q, mask))
        out = jnp.moveaxis(out, 0, 3).reshape(batch, kv_heads, groups, q_len, head_dim)
    else:
        out = attend(q, mask)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, q_len, heads, head_dim)
