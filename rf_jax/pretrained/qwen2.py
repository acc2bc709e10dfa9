"""Qwen2 / Qwen2.5 checkpoints (Hugging Face `Qwen2ForCausalLM` layout) into the backbone.

The understanding path of rf_jax is a Qwen2 decoder: RMSNorm, grouped-query
attention with q/k/v biases and no output bias, rotate-half RoPE, SwiGLU. The
checkpoint's FFN and post-attention norm are copied into all three experts
(understanding, representation, pixel) as their starting point, and its final
norm into the three final norms.
"""

from rf_jax.mask import NUM_EXPERTS
from rf_jax.pretrained.plan import Assignment, Plan, pad_rows, transpose

MODEL_TYPES = ("qwen2",)


def rope_theta(hf_config):
    """RoPE base of a Qwen2 `config.json` (top-level, or in `rope_parameters` since transformers 5)."""
    parameters = hf_config.get("rope_parameters") or {}
    return float(parameters.get("rope_theta", hf_config.get("rope_theta", 10_000.0)))


def backbone_fields(hf_config):
    """Return the `config.model.backbone` fields that the checkpoint fixes."""
    heads = hf_config["num_attention_heads"]
    return dict(
        width=hf_config["hidden_size"],
        depth=hf_config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        mlp_dim=hf_config["intermediate_size"],
        rope_theta=rope_theta(hf_config),
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
    )


def is_tied(hf_config):
    # Qwen2Config defaults to an untied head when the field is absent.
    return bool(hf_config.get("tie_word_embeddings", False))


def check_config(hf_config, model_config, directory):
    """Raise ValueError naming every field where the checkpoint and the rf_jax model differ."""
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{directory}/config.json has model_type={model_type!r}; the LLM converter reads "
            f"{MODEL_TYPES} checkpoints (Qwen2, Qwen2.5)."
        )
    unsupported = []
    if hf_config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf_config['hidden_act']!r} (rf_jax uses SiLU)")
    if hf_config.get("use_sliding_window"):
        unsupported.append("use_sliding_window=true (rf_jax attends over the whole row)")
    rope_type = (hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}).get(
        "rope_type", "default"
    )
    if rope_type != "default":
        unsupported.append(f"rope_type={rope_type!r} (rf_jax has plain RoPE only)")
    if unsupported:
        raise ValueError(f"{directory} uses features rf_jax lacks: {'; '.join(unsupported)}.")

    fields = backbone_fields(hf_config)
    backbone = model_config.backbone
    wrong = {name: value for name, value in fields.items() if getattr(backbone, name) != value}
    if wrong:
        found = ", ".join(f"{name}={getattr(backbone, name)}" for name in wrong)
        fix = " ".join(f"--config.model.backbone.{name}={value}" for name, value in wrong.items())
        raise ValueError(
            f"config.model.backbone does not match the checkpoint in {directory}: the config "
            f"has {found}. Set {fix}."
        )
    if model_config.tie_embeddings and not is_tied(hf_config):
        raise ValueError(
            f"config.model.tie_embeddings=True, but the checkpoint in {directory} has its own "
            "lm_head. Set --config.model.tie_embeddings=False."
        )
    checkpoint_vocab = hf_config["vocab_size"]
    if model_config.vocab_size < checkpoint_vocab:
        raise ValueError(
            f"The model's vocabulary ({model_config.vocab_size} ids) is smaller than the "
            f"checkpoint's ({checkpoint_vocab} rows). Build the model config from the "
            "checkpoint's tokenizer (rf_jax.pretrained.load_tokenizer), whose vocab_size "
            "covers every row."
        )


def _prefix(keys):
    """Key prefix of the decoder: "model." for Qwen2ForCausalLM, "" for a bare Qwen2Model."""
    return "model." if "model.embed_tokens.weight" in keys else ""


def make_plan(checkpoint, model_config):
    """Return the `Plan` that writes the checkpoint into the backbone, embeddings and LM head."""
    hf_config, b = checkpoint.config, model_config.backbone
    check_config(hf_config, model_config, checkpoint.directory)
    prefix = _prefix(checkpoint.keys())
    vocab, checkpoint_vocab = model_config.vocab_size, hf_config["vocab_size"]
    q_dim, kv_dim = b.num_heads * b.head_dim, b.num_kv_heads * b.head_dim
    embed_key = f"{prefix}embed_tokens.weight"
    plan = Plan(name=f"Qwen2 checkpoint {checkpoint.directory}", assignments=[])

    def add(source, shape, *targets):
        plan.assignments.append(Assignment((source,), (shape,), tuple(targets)))

    embed_targets = [(("text_embed", "embedding"), lambda w: pad_rows(w, vocab))]
    tied = is_tied(hf_config)
    if not model_config.tie_embeddings:
        head_from_embed = (("lm_head", "kernel"), lambda w: transpose(pad_rows(w, vocab)))
        if tied:
            embed_targets.append(head_from_embed)
        else:
            add("lm_head.weight", (checkpoint_vocab, b.width), head_from_embed)
    if tied and "lm_head.weight" in checkpoint.keys():
        plan.ignored["lm_head.weight"] = "a copy of the tied input embedding"
    add(embed_key, (checkpoint_vocab, b.width), *embed_targets)

    for layer in range(b.depth):
        source = f"{prefix}layers.{layer}."
        target = ("backbone", f"layers_{layer}")
        add(
            f"{source}input_layernorm.weight", (b.width,), (target + ("input_norm", "scale"), _same)
        )
        for name, dim in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            path = target + ("attn", name)
            add(f"{source}self_attn.{name}.weight", (dim, b.width), (path + ("kernel",), transpose))
            add(f"{source}self_attn.{name}.bias", (dim,), (path + ("bias",), _same))
        add(
            f"{source}self_attn.o_proj.weight",
            (b.width, q_dim),
            (target + ("attn", "o_proj", "kernel"), transpose),
        )
        experts = [target + (f"expert_{e}",) for e in range(NUM_EXPERTS)]
        add(
            f"{source}post_attention_layernorm.weight",
            (b.width,),
            *[(expert + ("norm", "scale"), _same) for expert in experts],
        )
        for name, shape in (
            ("gate_proj", (b.mlp_dim, b.width)),
            ("up_proj", (b.mlp_dim, b.width)),
            ("down_proj", (b.width, b.mlp_dim)),
        ):
            add(
                f"{source}mlp.{name}.weight",
                shape,
                *[(expert + ("mlp", name, "kernel"), transpose) for expert in experts],
            )
    add(
        f"{prefix}norm.weight",
        (b.width,),
        *[(("backbone", f"final_norm_{e}", "scale"), _same) for e in range(NUM_EXPERTS)],
    )

    head = "tied to the input embedding" if model_config.tie_embeddings else "separate lm_head"
    source_head = "tied" if tied else "untied"
    plan.notes.append(f"LM head: checkpoint {source_head}, rf_jax {head}.")
    if vocab != checkpoint_vocab:
        plan.notes.append(
            f"Vocabulary resized from {checkpoint_vocab} to {vocab} rows; the "
            f"{vocab - checkpoint_vocab} new rows start at the mean embedding."
        )
    else:
        plan.notes.append(f"Vocabulary: {vocab} rows, unchanged.")
    return plan


def _same(value):
    return value
