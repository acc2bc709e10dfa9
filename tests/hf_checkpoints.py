"""Tiny random Hugging Face checkpoints (Qwen2, DINOv3 ViT) and matching rf_jax configs.

The models are built by `transformers` from a config, with no download, and
saved as safetensors. Every weight gets random noise, so biases, norms and
layer scales that start at 0 or 1 take part in the comparisons. torch and
transformers load on first use, so scripts that only read the configs stay fast.
"""

import functools
import json
import os

import ml_collections

import numpy as np

from conftest import tiny_config

# Tiny Qwen2: vocabulary 300, width 64, 2 layers, 4 query heads sharing 2 KV heads.
QWEN_VOCAB = 300
QWEN_FIELDS = dict(
    width=64, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128, rope_theta=10_000.0
)
# Special ids of the rf_jax model in the parity tests: the last ids, never drawn as inputs.
PAD, BOS, EOS = QWEN_VOCAB - 1, QWEN_VOCAB - 2, QWEN_VOCAB - 3

# Tiny DINOv3 ViT: 16 px images, 8 px patches (a 2x2 grid), width 32, 2 heads of 16.
DINO_FIELDS = dict(
    patch_size=8,
    width=32,
    depth=2,
    num_heads=2,
    mlp_dim=64,
    num_registers=2,
    rope_base=100.0,
    norm_eps=1e-5,
)


def _perturb(model, seed):
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(0.05 * noise)
    return model.eval()


def qwen2_model(tied, seed=0):
    """Return a random `Qwen2ForCausalLM` in float32 and eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=QWEN_VOCAB,
        hidden_size=QWEN_FIELDS["width"],
        intermediate_size=QWEN_FIELDS["mlp_dim"],
        num_hidden_layers=QWEN_FIELDS["depth"],
        num_attention_heads=QWEN_FIELDS["num_heads"],
        num_key_value_heads=QWEN_FIELDS["num_kv_heads"],
        rope_theta=QWEN_FIELDS["rope_theta"],
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
    )
    return _perturb(transformers.Qwen2ForCausalLM(config), seed)


def dinov3_model(gated=False, seed=0):
    """Return a random `DINOv3ViTModel`; `gated` selects the SwiGLU MLP of the larger models."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.DINOv3ViTConfig(
        patch_size=DINO_FIELDS["patch_size"],
        hidden_size=DINO_FIELDS["width"],
        intermediate_size=DINO_FIELDS["mlp_dim"],
        num_hidden_layers=DINO_FIELDS["depth"],
        num_attention_heads=DINO_FIELDS["num_heads"],
        num_register_tokens=DINO_FIELDS["num_registers"],
        image_size=16,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
    )
    return _perturb(transformers.DINOv3ViTModel(config), seed)


def save(model, directory, max_shard_size=None):
    """Save as safetensors; a small `max_shard_size` writes several shards and an index."""
    kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return str(directory)


def rf_config(tied=False, gated=False):
    """The tiny test config with the backbone and encoder of the models above."""
    config = tiny_config(image_size=16)
    config.model.backbone.update(**QWEN_FIELDS, norm_eps=1e-6)
    config.model.encoder.update(
        **DINO_FIELDS,
        mlp_type="swiglu" if gated else "gelu",
        mlp_bias=True,
    )
    config.model.tie_embeddings = tied
    return config


def write_tokenizer(directory, words, eos="<|endoftext|>", pad=None):
    """Write a word-level `tokenizer.json` and `tokenizer_config.json` into `directory`.

    Ids: the EOS token first, then `words` in order.
    """
    import tokenizers

    vocab = {eos: 0}
    for word in words:
        vocab.setdefault(word, len(vocab))
    vocab.setdefault("[UNK]", len(vocab))
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.decoder = tokenizers.decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens([tokenizers.AddedToken(eos, special=True)])
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(eos_token=eos, pad_token=pad, bos_token=None), f)
    return vocab


def normalised_pixels(images):
    """uint8 images [batch, h, w, 3] -> the `pixel_values` [batch, 3, h, w] DINOv3 reads."""
    import torch

    mean = np.asarray([0.485, 0.456, 0.406], np.float32)
    std = np.asarray([0.229, 0.224, 0.225], np.float32)
    x = (images.astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def blank_state(config, model_config, mesh=None):
    """A zero train state in the shardings of `Trainer.abstract_state`, without compiling init."""
    from rf_jax import partitioning
    from rf_jax.pretrained import zeros_state

    mesh = partitioning.create_mesh(config.mesh) if mesh is None else mesh
    return zeros_state(_abstract_state(config.to_json(), model_config, mesh))


@functools.lru_cache(maxsize=None)
def _abstract_state(config_json, model_config, mesh):
    # Tracing the model init takes seconds, so each config is traced once per session.
    from rf_jax import trainer as trainer_lib

    config = ml_collections.ConfigDict(json.loads(config_json))
    trainer = trainer_lib.Trainer(config, model_config, mesh, total_steps=10)
    return trainer.abstract_state()[0]


def model_config(config, vocab_size=QWEN_VOCAB):
    from rf_jax import configs

    return configs.model_config(config, vocab_size, pad_id=PAD, bos_id=BOS, eos_id=EOS)
