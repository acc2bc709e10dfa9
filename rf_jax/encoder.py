"""Understanding encoder: a ViT in the DINOv3 style, and the connector MLP.

The encoder reads images and returns one feature per patch. Its online copy is
trained through the understanding loss; an EMA copy of its parameters alone
produces the representation-token targets. Features are the final-normed
patch tokens; the class and register tokens are dropped from the output.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from rf_jax import layer_stack
from rf_jax.layers import Dense, GeluMLP, LayerNorm, SwiGLU, apply_rope, constrain
from rf_jax.layers import dot_product_attention

# Encoder inputs are normalised with the ImageNet statistics, as DINOv3 is.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MLP_TYPES = {"swiglu": SwiGLU, "gelu": GeluMLP}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Static shape of the encoder (a hashable mirror of `config.model.encoder`)."""

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_registers: int = 4
    layerscale_init: float = 1e-5
    rope_base: float = 100.0
    norm_eps: float = 1e-6
    # "swiglu" (gated, SiLU) or "gelu" (plain, exact GELU), as DINOv3's ViT-S/B/L use.
    mlp_type: str = "swiglu"
    mlp_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # One of `layer_stack.REMAT_POLICIES`.
    scan_layers: bool = False  # Stack the layers' parameters and run them with `nn.scan`.
    attention_query_block: int = 0  # Queries per attention block; 0 for all at once.

    def __post_init__(self):
        if self.mlp_type not in MLP_TYPES:
            raise ValueError(
                f"model.encoder.mlp_type={self.mlp_type!r} is not one of {sorted(MLP_TYPES)}."
            )


def patchify(images, patch_size):
    """Cut [batch, height, width, channels] into [batch, patches, patch*patch*channels].

    Patches are in row-major grid order; each patch is flattened as (row, column, channel).
    """
    batch, height, width, channels = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"Image size {height}x{width} is not a multiple of the patch size {patch_size}."
        )
    rows, cols = height // patch_size, width // patch_size
    x = images.reshape(batch, rows, patch_size, cols, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, rows * cols, patch_size * patch_size * channels)


def unpatchify(patches, patch_size, channels=3):
    """Invert `patchify` for a square grid: [batch, patches, p*p*c] -> [batch, h, w, c]."""
    batch, num_patches, _ = patches.shape
    side = int(math.isqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid.")
    x = patches.reshape(batch, side, side, patch_size, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, side * patch_size, side * patch_size, channels)


def rope_2d_tables(grid_size, head_dim, base):
    """Return (cos, sin) [grid**2, head_dim] of 2-D RoPE over patch centres in [-1, 1].

    A quarter of the head dimension's frequencies encodes the row, another
    quarter the column; the half is repeated for the rotate-half layout.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}.")
    quarter = head_dim // 4
    periods = base ** (2.0 * jnp.arange(quarter, dtype=jnp.float32) / (head_dim // 2))
    centres = (jnp.arange(grid_size, dtype=jnp.float32) + 0.5) / grid_size * 2.0 - 1.0
    yy, xx = jnp.meshgrid(centres, centres, indexing="ij")
    coords = jnp.stack([yy.reshape(-1), xx.reshape(-1)], axis=-1)  # [grid**2, 2]
    angles = 2 * math.pi * coords[:, :, None] / periods  # [grid**2, 2, quarter]
    angles = angles.reshape(grid_size * grid_size, 2 * quarter)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


class EncoderBlock(nn.Module):
    """Pre-norm ViT block with LayerScale on both residual branches."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x, cos, sin):
        """Return (x [batch, seq, width], None); the None is the per-layer output `nn.scan` stacks."""
        cfg = self.config
        batch, seq, width = x.shape
        head_dim = width // cfg.num_heads
        dense = lambda axes, name, bias=True: Dense(  # noqa: E731
            width, axes, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
        )
        layer_scale = lambda name: self.param(  # noqa: E731
            name,
            nn.with_logical_partitioning(
                nn.initializers.constant(cfg.layerscale_init), ("enc_embed",)
            ),
            (width,),
            cfg.param_dtype,
        )

        h = LayerNorm(cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm1")(x)
        heads = lambda t: t.reshape(batch, seq, cfg.num_heads, head_dim)  # noqa: E731
        q = heads(dense(("enc_embed", "enc_heads"), "q_proj")(h))
        k = heads(dense(("enc_embed", "enc_heads"), "k_proj")(h))
        v = heads(dense(("enc_embed", "enc_heads"), "v_proj")(h))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        full = jnp.ones((batch, seq, seq), bool)
        attn = dot_product_attention(q, k, v, full, head_dim**-0.5, cfg.attention_query_block)
        attn = attn.reshape(batch, seq, width)
        attn_out = dense(("enc_heads", "enc_embed"), "o_proj")(attn)
        # The scale is cast so the residual stream keeps its dtype (a scan carry must).
        x = x + layer_scale("ls1").astype(x.dtype) * checkpoint_name(
            attn_out, layer_stack.ATTENTION_OUT
        )

        h = LayerNorm(cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm2")(x)
        mlp = MLP_TYPES[cfg.mlp_type](
            cfg.mlp_dim,
            embed_axis="enc_embed",
            mlp_axis="enc_mlp",
            use_bias=cfg.mlp_bias,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="mlp",
        )
        x = x + layer_scale("ls2").astype(x.dtype) * checkpoint_name(mlp(h), layer_stack.MLP_OUT)
        x = constrain(x, ("activation_batch", "activation_length", "activation_enc_embed"))
        return x, None


class Encoder(nn.Module):
    """ViT encoder: images uint8 [batch, h, w, 3] -> patch features [batch, patches, width]."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        x = images.astype(jnp.float32) / 255.0
        x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        patches = patchify(x, cfg.patch_size)
        batch, num_patches, _ = patches.shape
        grid = int(math.isqrt(num_patches))

        x = Dense(
            cfg.width,
            ("enc_patch", "enc_embed"),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="patch_embed",
        )(patches)
        num_prefix = 1 + cfg.num_registers
        prefix = self.param(
            "prefix_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "enc_embed")),
            (num_prefix, cfg.width),
            cfg.param_dtype,
        )
        x = jnp.concatenate(
            [jnp.broadcast_to(prefix.astype(x.dtype), (batch, num_prefix, cfg.width)), x], axis=1
        )

        # The class and register tokens get no rotation (cos 1, sin 0).
        head_dim = cfg.width // cfg.num_heads
        cos, sin = rope_2d_tables(grid, head_dim, cfg.rope_base)
        cos = jnp.concatenate([jnp.ones((num_prefix, head_dim)), cos])
        sin = jnp.concatenate([jnp.zeros((num_prefix, head_dim)), sin])
        cos = jnp.broadcast_to(cos, (batch,) + cos.shape)
        sin = jnp.broadcast_to(sin, (batch,) + sin.shape)

        block = layer_stack.repeat_block(
            EncoderBlock,
            remat=cfg.remat,
            scan_layers=cfg.scan_layers,
            depth=cfg.depth,
            in_axes=(nn.broadcast, nn.broadcast),
        )
        if cfg.scan_layers:
            x, _ = block(cfg, name=layer_stack.STACKED_NAME)(x, cos, sin)
        else:
            for layer in range(cfg.depth):
                x, _ = block(cfg, name=f"layers_{layer}")(x, cos, sin)
        x = LayerNorm(
            cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="final_norm"
        )(x)
        return x[:, num_prefix:]


class Connector(nn.Module):
    """Two-layer GELU MLP from the encoder width into the backbone width."""

    width: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features):
        h = Dense(
            self.width,
            ("enc_embed", "embed"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="fc1",
        )(features)
        h = jax.nn.gelu(h)
        return Dense(
            self.width,
            ("embed", "embed_out"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="fc2",
        )(h)
