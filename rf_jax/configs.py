"""Default configuration and its translation into static model and sampler configs.

Experiments under `experiments/` start from `default_config()` and change
fields. Fields shared between sections (image size, text length) are
`FieldReference`s, so one command-line override updates every use.
"""

import ml_collections
import jax.numpy as jnp

from rf_jax import layer_stack
from rf_jax.backbone import BackboneConfig
from rf_jax.encoder import EncoderConfig
from rf_jax.model import ModelConfig
from rf_jax.sampler import SamplerConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def default_config():
    """Return the full default configuration (a small model; experiments resize it)."""
    config = ml_collections.ConfigDict()
    image_size = ml_collections.FieldReference(32)
    text_len = ml_collections.FieldReference(16)

    config.model = ml_collections.ConfigDict(
        dict(
            image_size=image_size,
            text_len=text_len,
            pixel_patch=4,
            pixel_bottleneck=32,
            use_rep_tokens=True,
            tie_embeddings=False,
            dtype="float32",
            param_dtype="float32",
            ema_decay=0.999,
            # What the backward pass keeps of each block: "none" (everything), "full"
            # (recompute the block), "save_dots" (matrix-multiply outputs) or "save_attn_mlp"
            # (the attention and feed-forward outputs). Applies to backbone and encoder blocks.
            remat="none",
            # Run the blocks with nn.scan: parameters stacked under `layers` with a leading
            # [depth] axis instead of one `layers_{i}` entry per layer.
            scan_layers=False,
        )
    )
    config.model.backbone = ml_collections.ConfigDict(
        dict(
            width=256,
            depth=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            mlp_dim=768,
            rope_theta=10_000.0,
            norm_eps=1e-6,
        )
    )
    config.model.encoder = ml_collections.ConfigDict(
        dict(
            patch_size=8,
            width=128,
            depth=2,
            num_heads=2,
            mlp_dim=384,
            num_registers=4,
            layerscale_init=1e-5,
            rope_base=100.0,
        )
    )
    config.model.codebook = ml_collections.ConfigDict(
        dict(size=256, sinkhorn_eps=0.05, sinkhorn_iters=3, momentum=0.99, usage_decay=0.99)
    )

    config.data = ml_collections.ConfigDict(
        dict(
            name="openmoji",
            dir="",
            image_size=image_size,
            vocab_size=1024,
            text_len=text_len,
            und_text_len=24,
            batch_size=32,
            seed=0,
            num_workers=0,
            allow_download=False,
        )
    )
    config.data.mixture = ml_collections.ConfigDict(dict(generation=0.75, understanding=0.25))

    config.loss = ml_collections.ConfigDict(
        dict(
            text_weight=1.0,
            rep_weight=1.0,
            fm_weight=1.0,
            noise_scale=1.0,
            t_mu=-0.8,
            t_sigma=0.8,
            t_clip=0.05,
            text_dropout=0.1,
            rep_dropout=0.1,
        )
    )

    config.optim = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-3,
            warmup_steps=100,
            min_lr_ratio=0.1,
            weight_decay=0.01,
            b1=0.9,
            b2=0.95,
            grad_clip=1.0,
        )
    )

    config.train = ml_collections.ConfigDict(
        dict(
            steps=1000,
            seed=0,
            log_every=50,
            checkpoint_every=500,
            keep_checkpoints=3,
            sample_every=0,
            num_caption_images=32,
            caption_max_tokens=12,
            # "error" stops the run naming the step of a non-finite loss or gradient;
            # "skip" keeps the previous state for that step and counts it.
            nonfinite="error",
        )
    )

    config.sample = ml_collections.ConfigDict(
        dict(
            num_steps=50,
            temperature=1.0,
            top_k=0,
            rep_logits_scale=1.0,
            text_scale=4.0,
            rep_scale=1.0,
            guidance_low=0.1,
            guidance_high=1.0,
            seed=0,
            prompts=(
                "red apple",
                "teapot",
                "grinning face",
                "sun",
                "green heart",
                "rocket",
                "dog face",
                "pizza",
            ),
        )
    )

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return config


def _dtype(name, field):
    if name not in _DTYPES:
        raise ValueError(f"{field}={name!r} is not a known dtype; use one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def model_config(config, vocab_size):
    """Build the static `ModelConfig` from `config.model` and the tokenizer's vocabulary."""
    m = config.model
    dtype = _dtype(m.dtype, "model.dtype")
    param_dtype = _dtype(m.param_dtype, "model.param_dtype")
    # Configs saved before these fields existed get the defaults.
    remat = m.get("remat", "none")
    layer_stack.check_remat(remat)
    stacking = dict(remat=remat, scan_layers=bool(m.get("scan_layers", False)))
    backbone = BackboneConfig(
        **m.backbone.to_dict(), dtype=dtype, param_dtype=param_dtype, **stacking
    )
    encoder = EncoderConfig(**m.encoder.to_dict(), dtype=dtype, param_dtype=param_dtype, **stacking)
    for name, patch in (
        ("model.pixel_patch", m.pixel_patch),
        ("model.encoder.patch_size", m.encoder.patch_size),
    ):
        if m.image_size % patch:
            raise ValueError(
                f"model.image_size={m.image_size} is not a multiple of {name}={patch}; "
                "choose sizes that divide evenly."
            )
    if m.backbone.num_heads % m.backbone.num_kv_heads:
        raise ValueError(
            f"model.backbone.num_heads={m.backbone.num_heads} is not a multiple of "
            f"num_kv_heads={m.backbone.num_kv_heads}."
        )
    if m.encoder.width % m.encoder.num_heads or (m.encoder.width // m.encoder.num_heads) % 4:
        raise ValueError(
            f"model.encoder.width={m.encoder.width} must split into num_heads="
            f"{m.encoder.num_heads} heads whose size is a multiple of 4 (for 2-D RoPE)."
        )
    return ModelConfig(
        image_size=m.image_size,
        pixel_patch=m.pixel_patch,
        pixel_bottleneck=m.pixel_bottleneck,
        vocab_size=vocab_size,
        text_len=m.text_len,
        codebook_size=m.codebook.size,
        backbone=backbone,
        encoder=encoder,
        use_rep_tokens=m.use_rep_tokens,
        tie_embeddings=m.tie_embeddings,
    )


def sampler_config(config, **overrides):
    """Build the static `SamplerConfig` from `config.sample` and `config.loss.noise_scale`."""
    s = config.sample
    fields = dict(
        num_steps=s.num_steps,
        temperature=s.temperature,
        top_k=s.top_k,
        rep_logits_scale=s.rep_logits_scale,
        text_scale=s.text_scale,
        rep_scale=s.rep_scale,
        guidance_low=s.guidance_low,
        guidance_high=s.guidance_high,
        noise_scale=config.loss.noise_scale,
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return SamplerConfig(**fields)
