"""Stage 1 from pretrained weights: a Qwen2.5-0.5B backbone and a DINOv3 ViT-S/16 encoder.

    python -m rf_jax.train --config experiments/stage1_pretrained.py --workdir workdirs/stage1 \\
        --config.init.llm_path=/models/Qwen2.5-0.5B \\
        --config.init.encoder_path=/models/dinov3-vits16-pretrain-lvd1689m

Both paths are local Hugging Face checkpoint directories (config.json and
safetensors files; see the README for where to get them). Nothing is
downloaded at run time. At fresh initialisation the backbone, the text
embeddings and the tied LM head come from Qwen2.5-0.5B, with its FFN copied
into the representation and pixel experts, and the encoder and the EMA
encoder come from DINOv3; as in `stage1_align.py`, those stay frozen
(`optim.frozen`) while the new modules learn. The run uses the checkpoint's tokenizer
(`tokenizer.json`) with a PAD and a BOS token added. The architecture below
must match the checkpoints; a mismatch stops the run with the overrides that
fix it. Check a pair of checkpoints first, without training:

    python -m rf_jax.convert --config experiments/stage1_pretrained.py \\
        --llm /models/Qwen2.5-0.5B --encoder /models/dinov3-vits16-pretrain-lvd1689m

This is an accelerator run (about 0.5B parameters at 256 px); it has not
been trained to completion here.
"""

from rf_jax import configs


def get_config(arg=None):
    if arg is not None:
        raise ValueError(f"Unknown argument {arg!r}: this config takes none.")
    config = configs.default_config()
    config.data.name = "openmoji"
    config.model.image_size = 256
    config.model.text_len = 32
    config.data.und_text_len = 48
    config.model.pixel_patch = 16
    config.model.pixel_bottleneck = 128
    config.model.dtype = "bfloat16"

    # Qwen2.5-0.5B (its config.json): tied embeddings, 151,936 embedding rows.
    config.model.tie_embeddings = True
    config.model.backbone.update(
        width=896,
        depth=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        mlp_dim=4864,
        rope_theta=1_000_000.0,
        norm_eps=1e-6,
    )
    # DINOv3 ViT-S/16: 4 registers, a plain GELU MLP with biases, LayerNorm eps 1e-5.
    config.model.encoder.update(
        patch_size=16,
        width=384,
        depth=12,
        num_heads=6,
        mlp_dim=1536,
        num_registers=4,
        rope_base=100.0,
        norm_eps=1e-5,
        mlp_type="gelu",
        mlp_bias=True,
    )
    config.model.codebook.size = 4096

    config.data.batch_size = 256
    config.train.steps = 20_000
    config.train.log_every = 100
    config.train.checkpoint_every = 1000
    config.train.sample_every = 2000
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 1000
    # Align the new modules to the frozen pretrained language model and encoder.
    config.optim.frozen = configs.ALIGNMENT_FROZEN
    config.data.mixture.update(generation=0.5, understanding=0.5)
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    return config
