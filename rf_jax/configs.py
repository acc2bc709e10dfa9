"""Default configuration and its translation into static model and sampler configs.

Experiments under `experiments/` start from `default_config()` and change
fields. Fields shared between sections (image size, text length) are
`FieldReference`s, so one command-line override updates every use.
"""

import ml_collections
import jax.numpy as jnp

from rf_jax import layer_stack
from rf_jax.backbone import BackboneConfig
from rf_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
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
            # "pixel_rf" (the method), or an ablation: "pixel", "repa", "continuous".
            variant="pixel_rf",
            repa_depth=1,
            repa_mlp_dim=512,
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
            # Attend over this many queries at a time (0: all at once). Rows whose length it
            # divides are processed in blocks, which on CPUs is several times faster at rows
            # of a few hundred tokens; leave 0 on TPU and GPU.
            attention_query_block=0,
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
            norm_eps=1e-6,
            mlp_type="swiglu",
            mlp_bias=False,
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
            repa_weight=0.5,  # Used by the "repa" variant only.
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
            # Regular expressions over parameter paths kept frozen: "backbone/layers_0/..."
            # per layer, "backbone/layers/..." with model.scan_layers.
            frozen=(),
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
            # The --workdir of the previous stage: a run without a checkpoint of its own starts
            # from that stage's parameters, EMA encoder and codebook, with a fresh optimiser.
            init_from="",
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

    # Pretrained weights loaded at fresh initialisation (`rf_jax.pretrained`); "" for none.
    config.init = ml_collections.ConfigDict(dict(llm_path="", encoder_path=""))

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return config


# Stage 1 aligns the new modules to the pretrained language model and encoder:
# the understanding path (shared attention, understanding expert, text embedding
# and head) and the encoder stay frozen.
ALIGNMENT_FROZEN = (
    r"^encoder/",
    r"^(text_embed|lm_head)/",
    r"^backbone/layers(_\d+)?/(attn|input_norm|expert_0)/",  # Per-layer or scanned layout.
    r"^backbone/final_norm_0/",
)


def full_scale(config, image_size):
    """Paper-scale shapes: a Qwen2.5-1.5B-shaped backbone and a ViT-L/16 encoder.

    Stages change `image_size` only; no parameter shape depends on it, so a stage
    loads the previous one's parameters at any resolution.
    """
    config.model.image_size = image_size
    config.model.text_len = 128
    config.model.pixel_patch = 16
    config.model.pixel_bottleneck = 128
    config.model.dtype = "bfloat16"
    config.model.ema_decay = 0.999
    config.model.backbone.update(
        width=1536,
        depth=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        mlp_dim=8960,
        rope_theta=1_000_000.0,
    )
    config.model.encoder.update(
        patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096, num_registers=4
    )
    config.model.codebook.size = 16384
    config.data.und_text_len = 256
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.train.log_every = 100
    config.train.checkpoint_every = 1000
    config.train.sample_every = 5000
    return config


def small_scale(config, image_size):
    """Shapes that train in minutes on a CPU, for trying the stages locally."""
    config.model.image_size = image_size
    config.model.text_len = 16
    config.model.pixel_patch = 4
    config.model.backbone.update(
        width=128, depth=2, num_heads=2, num_kv_heads=1, head_dim=64, mlp_dim=256
    )
    config.model.encoder.update(patch_size=8, width=128, depth=2, num_heads=2, mlp_dim=256)
    config.model.codebook.size = 256
    config.model.ema_decay = 0.995
    config.data.batch_size = 16
    config.train.steps = 100
    config.train.log_every = 20
    config.train.checkpoint_every = 50
    config.sample.num_steps = 10
    config.optim.warmup_steps = 20
    return config


def _dtype(name, field):
    if name not in _DTYPES:
        raise ValueError(f"{field}={name!r} is not a known dtype; use one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def model_config(config, vocab_size, *, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID):
    """Build the static `ModelConfig` from `config.model`, the vocabulary and special text ids.

    The default ids are those of the sentencepiece models that rf_jax trains.
    """
    m = config.model
    _check_special_ids(vocab_size, pad_id, bos_id, eos_id)
    dtype = _dtype(m.dtype, "model.dtype")
    param_dtype = _dtype(m.param_dtype, "model.param_dtype")
    # Configs saved before these fields existed get the defaults.
    remat = m.get("remat", "none")
    layer_stack.check_remat(remat)
    query_block = int(m.get("attention_query_block", 0))
    if query_block < 0:
        raise ValueError(
            f"model.attention_query_block={query_block} must be 0 (all queries at once) or a "
            "positive number of queries per block."
        )
    stacking = dict(
        remat=remat,
        scan_layers=bool(m.get("scan_layers", False)),
        attention_query_block=query_block,
    )
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
        variant=m.variant,
        tie_embeddings=m.tie_embeddings,
        repa_depth=m.repa_depth,
        repa_mlp_dim=m.repa_mlp_dim,
        pad_id=pad_id,
        bos_id=bos_id,
        eos_id=eos_id,
    )


def model_config_for_tokenizer(config, tokenizer):
    """Build the `ModelConfig` for `tokenizer`: its vocabulary size and special ids."""
    return model_config(
        config,
        tokenizer.vocab_size,
        pad_id=tokenizer.pad_id,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
    )


def _check_special_ids(vocab_size, pad_id, bos_id, eos_id):
    ids = dict(pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
    outside = {name: value for name, value in ids.items() if not 0 <= value < vocab_size}
    if outside:
        raise ValueError(
            f"Special text ids {outside} are outside the vocabulary [0, {vocab_size}); "
            "build the model config from the tokenizer that produced them."
        )
    if pad_id in (bos_id, eos_id):
        raise ValueError(
            f"pad_id={pad_id} equals bos_id={bos_id} or eos_id={eos_id}, but every PAD token is "
            "treated as padding. Give the tokenizer a distinct pad token."
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
