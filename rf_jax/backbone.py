"""Mixture-of-Transformers (MoT) backbone with a KV cache.

Every token shares the self-attention of each layer (Qwen2 style: RMSNorm,
grouped-query attention with q/k/v biases, 1-D RoPE). Each token's
feed-forward expert is fixed by its modality: understanding (text and encoder
tokens), representation prediction (rep tokens) or pixel generation (pixel
patches). Routing is static, so an expert runs on its own tokens only. The
caller names contiguous spans of the row for each expert (`expert_spans`).
For packed rows without a fixed layout, every expert runs on all tokens and
the result is selected by modality.

The KV cache is an explicit pytree threaded through the calls, so prefill,
token-by-token decoding and the pixel ODE are pure functions of
(params, inputs, cache).
"""

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from rf_jax import layer_stack
from rf_jax import mask as mask_lib
from rf_jax.layers import Dense, RMSNorm, SwiGLU, apply_rope, constrain, dot_product_attention
from rf_jax.layers import rope_frequencies

# Static routing: ((start, stop, expert), ...) covering the row in order.
ExpertSpans = Optional[Sequence[tuple[int, int, int]]]

# Cache modes of `Backbone.__call__`.
NO_CACHE = "none"
APPEND = "append"  # Write the new keys and values into the cache, attend over it.
READ = "read"  # Attend over the cache plus the new tokens, leave the cache as it is.


@flax.struct.dataclass
class KVCache:
    """Keys and values of earlier tokens, with what the attention mask needs of them.

    Attributes:
        keys, values: [depth, batch, size, kv_heads, head_dim], RoPE applied.
        segment_ids, modality: int32 [batch, size]; unwritten slots have segment 0.
        length: int32 scalar, the number of slots written (equal for every row).
        next_position: int32 [batch], the RoPE position of the next text or rep token.
    """

    keys: jax.Array
    values: jax.Array
    segment_ids: jax.Array
    modality: jax.Array
    length: jax.Array
    next_position: jax.Array

    @classmethod
    def empty(cls, depth, batch, size, kv_heads, head_dim, dtype):
        shape = (depth, batch, size, kv_heads, head_dim)
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            segment_ids=jnp.zeros((batch, size), jnp.int32),
            modality=jnp.zeros((batch, size), jnp.int32),
            length=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def size(self):
        return self.keys.shape[2]


class Attention(nn.Module):
    """Grouped-query self-attention with q/k/v biases and rotary positions."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    query_block: int = 0  # See `dot_product_attention`.

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, mode, write_index):
        """Attend and return ([batch, seq, embed], (keys, values) to cache or None).

        Args:
            x: [batch, seq, embed] normalised inputs.
            cos, sin: [batch, seq, head_dim] rotary tables of the tokens.
            mask: bool [batch, seq, keys] over the keys this mode attends to.
            layer_cache: (keys, values) [batch, size, kv_heads, head_dim] or None.
            mode: NO_CACHE, APPEND or READ.
            write_index: int32 scalar slot of the first new token (APPEND).
        """
        batch, seq, _ = x.shape
        proj = lambda heads, name, bias=True: Dense(  # noqa: E731
            heads * self.head_dim,
            ("embed", "heads" if heads == self.num_heads else "kv_heads"),
            use_bias=bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        q = proj(self.num_heads, "q_proj")(x).reshape(batch, seq, self.num_heads, self.head_dim)
        k = proj(self.num_kv_heads, "k_proj")(x).reshape(
            batch, seq, self.num_kv_heads, self.head_dim
        )
        v = proj(self.num_kv_heads, "v_proj")(x).reshape(
            batch, seq, self.num_kv_heads, self.head_dim
        )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        k = constrain(k, ("activation_batch", "activation_length", "activation_kv", None))

        new_entry = None
        if mode == APPEND:
            cached_k, cached_v = layer_cache
            k = jax.lax.dynamic_update_slice_in_dim(
                cached_k, k.astype(cached_k.dtype), write_index, 1
            )
            v = jax.lax.dynamic_update_slice_in_dim(
                cached_v, v.astype(cached_v.dtype), write_index, 1
            )
            new_entry = (k, v)
        elif mode == READ:
            cached_k, cached_v = layer_cache
            k = jnp.concatenate([cached_k, k.astype(cached_k.dtype)], axis=1)
            v = jnp.concatenate([cached_v, v.astype(cached_v.dtype)], axis=1)

        out = dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask, self.head_dim**-0.5, self.query_block
        )
        out = out.reshape(batch, seq, self.num_heads * self.head_dim)
        o_proj = Dense(
            x.shape[-1],
            ("heads", "embed"),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="o_proj",
        )
        return o_proj(out), new_entry


class Expert(nn.Module):
    """One modality's FFN: pre-norm and SwiGLU."""

    mlp_dim: int
    norm_eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = RMSNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        return SwiGLU(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(h)


def route(x, modality, spans, experts):
    """Apply experts[e] to the tokens routed to expert e; x is [batch, seq, embed]."""
    if spans is not None:
        parts = [experts[expert](x[:, start:stop]) for start, stop, expert in spans]
        return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    expert_ids = jnp.asarray(mask_lib.EXPERT_OF_MODALITY, jnp.int32)[modality]
    out = jnp.zeros(x.shape, x.dtype)
    for index, expert in enumerate(experts):
        out = jnp.where((expert_ids == index)[..., None], expert(x).astype(x.dtype), out)
    return out


class Block(nn.Module):
    """One MoT layer: shared attention, then the modality's FFN expert.

    The static routing `spans` and the cache `mode` are attributes, so that
    `nn.remat` and `nn.scan` see only arrays (or None) as call arguments.

    With `capture=True` (used under scan, which has no Python loop to pick a
    layer from), the carry is (x, captured) and the per-layer argument is
    (layer_cache, take): the block's output replaces `captured` where `take`
    is true.
    """

    config: "BackboneConfig"
    spans: ExpertSpans = None
    mode: str = NO_CACHE
    capture: bool = False

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, modality, write_index):
        """Return (x [batch, seq, embed], this layer's (keys, values) in APPEND mode, else None).

        `layer_cache` is (keys, values) [batch, size, kv_heads, head_dim], or None without a cache.
        """
        if self.capture:
            (x, captured), (layer_cache, take) = x, layer_cache
            x, new_entry = self._layer(x, layer_cache, cos, sin, mask, modality, write_index)
            return (x, jnp.where(take, x, captured)), new_entry
        return self._layer(x, layer_cache, cos, sin, mask, modality, write_index)

    def _layer(self, x, layer_cache, cos, sin, mask, modality, write_index):
        cfg = self.config
        h = RMSNorm(cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="input_norm")(
            x
        )
        attn_out, new_entry = Attention(
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            query_block=cfg.attention_query_block,
            name="attn",
        )(h, cos, sin, mask, layer_cache, self.mode, write_index)
        x = x + checkpoint_name(attn_out, layer_stack.ATTENTION_OUT)
        experts = [
            Expert(cfg.mlp_dim, cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=f"expert_{e}")
            for e in range(mask_lib.NUM_EXPERTS)
        ]
        x = x + checkpoint_name(route(x, modality, self.spans, experts), layer_stack.MLP_OUT)
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, new_entry


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Static shape of the backbone (a hashable mirror of `config.model.backbone`)."""

    width: int
    depth: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # One of `layer_stack.REMAT_POLICIES`.
    scan_layers: bool = False  # Stack the layers' parameters and run them with `nn.scan`.
    attention_query_block: int = 0  # Queries per attention block; 0 for all at once.


class Backbone(nn.Module):
    """The shared transformer: embedded tokens in, final-normed hidden states out."""

    config: BackboneConfig

    @nn.compact
    def __call__(
        self,
        x,
        positions,
        segment_ids,
        modality,
        *,
        rep_visible=None,
        expert_spans: ExpertSpans = None,
        cache: Optional[KVCache] = None,
        mode: str = NO_CACHE,
        capture_layer: Optional[int] = None,
    ):
        """Run all layers.

        Args:
            x: [batch, seq, embed] token embeddings.
            positions: int32 [batch, seq] RoPE positions.
            segment_ids, modality: int32 [batch, seq] (see `rf_jax.mask`).
            rep_visible: optional bool [batch] (rep-condition dropout).
            expert_spans: static routing spans, or None to route by `modality`.
            cache: the KV cache for APPEND and READ modes.
            mode: NO_CACHE, APPEND or READ.
            capture_layer: if set, also return the hidden states [batch, seq, embed]
                after this many layers (before any final norm).

        Returns:
            (hidden [batch, seq, embed], cache), and the captured hidden states
            as a third element when `capture_layer` is set. The cache is updated
            in APPEND mode and returned unchanged otherwise.
        """
        cfg = self.config
        batch, seq, _ = x.shape
        q_index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        write_index = None
        if mode == NO_CACHE:
            mask = mask_lib.attention_mask(
                segment_ids, modality, q_index, segment_ids, modality, q_index, rep_visible
            )
        else:
            write_index = cache.length
            q_index = q_index + cache.length
            cache_index = jnp.broadcast_to(
                jnp.arange(cache.size, dtype=jnp.int32), (batch, cache.size)
            )
            if mode == APPEND:
                k_segment = jax.lax.dynamic_update_slice_in_dim(
                    cache.segment_ids, segment_ids, write_index, 1
                )
                k_modality = jax.lax.dynamic_update_slice_in_dim(
                    cache.modality, modality, write_index, 1
                )
                k_index = cache_index
            else:
                k_segment = jnp.concatenate([cache.segment_ids, segment_ids], axis=1)
                k_modality = jnp.concatenate([cache.modality, modality], axis=1)
                k_index = jnp.concatenate([cache_index, q_index], axis=1)
            mask = mask_lib.attention_mask(
                segment_ids, modality, q_index, k_segment, k_modality, k_index, rep_visible
            )

        cos, sin = rope_frequencies(cfg.head_dim, positions, cfg.rope_theta)
        layer_caches = None if mode == NO_CACHE else (cache.keys, cache.values)
        x, new_entries, captured = self._run_layers(
            x,
            layer_caches,
            (cos, sin, mask, modality, write_index),
            expert_spans,
            mode,
            capture_layer,
        )

        final_norms = [
            RMSNorm(
                cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=f"final_norm_{e}"
            )
            for e in range(mask_lib.NUM_EXPERTS)
        ]
        hidden = route(x, modality, expert_spans, final_norms)

        if mode == APPEND:
            cache = cache.replace(
                keys=new_entries[0],
                values=new_entries[1],
                segment_ids=k_segment,
                modality=k_modality,
                length=cache.length + seq,
            )
        if capture_layer is not None:
            return hidden, cache, captured
        return hidden, cache

    def _run_layers(self, x, layer_caches, shared, spans, mode, capture_layer):
        """Run the blocks in order and return (x, new cache entries or None, captured or None).

        The new entries are (keys, values) [depth, batch, size, kv_heads, head_dim]
        in APPEND mode and None in the other modes. `captured` is x after
        `capture_layer` layers when that is set.

        Args:
            layer_caches: (keys, values) [depth, batch, size, kv_heads, head_dim], or None.
            shared: (cos, sin, mask, modality, write_index), the same for every layer.
        """
        cfg = self.config
        if capture_layer is not None and not 1 <= capture_layer <= cfg.depth:
            raise ValueError(
                f"capture_layer={capture_layer} is outside the backbone's layers 1..{cfg.depth}."
            )
        block = layer_stack.repeat_block(
            Block,
            remat=cfg.remat,
            scan_layers=cfg.scan_layers,
            depth=cfg.depth,
            in_axes=(0,) + (nn.broadcast,) * len(shared),
        )
        if cfg.scan_layers:
            if capture_layer is None:
                body = block(cfg, spans, mode, name=layer_stack.STACKED_NAME)
                x, entries = body(x, layer_caches, *shared)
                return x, entries, None
            # The scan carries the captured states next to x; layer `capture_layer`
            # writes them (`take` is true for that layer only).
            take = jnp.arange(cfg.depth) == capture_layer - 1
            body = block(cfg, spans, mode, capture=True, name=layer_stack.STACKED_NAME)
            (x, captured), entries = body((x, jnp.zeros_like(x)), (layer_caches, take), *shared)
            return x, entries, captured

        entries, captured = [], None
        for layer in range(cfg.depth):
            layer_cache = None
            if layer_caches is not None:
                layer_cache = (layer_caches[0][layer], layer_caches[1][layer])
            x, entry = block(cfg, spans, mode, name=f"layers_{layer}")(x, layer_cache, *shared)
            entries.append(entry)
            if capture_layer == layer + 1:
                captured = x
        if mode != APPEND:
            return x, None, captured
        stacked = (jnp.stack([e[0] for e in entries]), jnp.stack([e[1] for e in entries]))
        return x, stacked, captured
