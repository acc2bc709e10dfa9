"""DINOv3 ViT checkpoints (Hugging Face `dinov3_vit` layout) into the understanding encoder.

The rf_jax encoder computes what `DINOv3ViTModel` computes in eval mode: a
patch convolution, the class and register tokens without rotation, 2-D RoPE
over patch centres in [-1, 1], pre-norm blocks with LayerScale, and a final
LayerNorm. Attention biases that the checkpoint lacks (DINOv3 has no key bias)
are set to zero, which gives the same outputs. The EMA encoder starts as a
copy (`rf_jax.pretrained.loader`).

NOTE: DINOv3 jitters and rescales the RoPE coordinates while it trains. The
rf_jax encoder always uses the plain coordinates, as the Hugging Face model
does in eval mode.
"""

import functools

import numpy as np

from rf_jax.pretrained.plan import Assignment, Plan, transpose

MODEL_TYPES = ("dinov3_vit",)


def _patch_size(hf_config, directory):
    patch = hf_config.get("patch_size", 16)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ValueError(f"{directory} has non-square patches {patch}; rf_jax needs square.")
        patch = patch[0]
    return int(patch)


def mlp_type(hf_config, directory):
    """Return the rf_jax `mlp_type` of the checkpoint's feed-forward blocks."""
    gated, act = bool(hf_config.get("use_gated_mlp", False)), hf_config.get("hidden_act", "gelu")
    if gated and act == "silu":
        return "swiglu"
    if not gated and act == "gelu":
        return "gelu"
    raise ValueError(
        f"{directory} has use_gated_mlp={gated} with hidden_act={act!r}; rf_jax supports a "
        "gated SiLU MLP or a plain GELU MLP."
    )


def encoder_fields(hf_config, directory="the checkpoint"):
    """Return the `config.model.encoder` fields that the checkpoint fixes."""
    return dict(
        patch_size=_patch_size(hf_config, directory),
        width=hf_config["hidden_size"],
        depth=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        mlp_dim=hf_config["intermediate_size"],
        num_registers=hf_config.get("num_register_tokens", 0),
        rope_base=float(hf_config.get("rope_theta", 100.0)),
        norm_eps=float(hf_config.get("layer_norm_eps", 1e-5)),
        mlp_type=mlp_type(hf_config, directory),
        mlp_bias=bool(hf_config.get("mlp_bias", True)),
    )


def check_config(hf_config, encoder_config, directory):
    """Raise ValueError naming every field where the checkpoint and the rf_jax encoder differ."""
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{directory}/config.json has model_type={model_type!r}; the encoder converter "
            f"reads {MODEL_TYPES} checkpoints (DINOv3 ViT)."
        )
    if hf_config.get("num_channels", 3) != 3:
        raise ValueError(
            f"{directory} expects {hf_config['num_channels']} channels; rf_jax uses 3."
        )
    fields = encoder_fields(hf_config, directory)
    wrong = {
        name: value for name, value in fields.items() if getattr(encoder_config, name) != value
    }
    if wrong:
        found = ", ".join(f"{name}={getattr(encoder_config, name)!r}" for name in wrong)
        fix = " ".join(f"--config.model.encoder.{name}={value}" for name, value in wrong.items())
        raise ValueError(
            f"config.model.encoder does not match the checkpoint in {directory}: the config "
            f"has {found}. Set {fix}."
        )


def _conv_to_dense(weight):
    """Patch convolution [width, 3, p, p] as a kernel [p*p*3, width] over (row, column, channel)."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(-1, weight.shape[0]))


def _prefix_tokens(cls_token, registers=None):
    """Class token [1, 1, width] and register tokens [1, R, width] as prefix tokens [1 + R, width]."""
    parts = [cls_token[0]] + ([] if registers is None else [registers[0]])
    return np.concatenate(parts, axis=0)


def _same(value):
    return value


def _layer_prefix(keys):
    """Key prefix of the blocks: "layer." as saved, "model.layer." as held in memory."""
    return "model.layer." if any(key.startswith("model.layer.") for key in keys) else "layer."


def make_plan(checkpoint, encoder_config):
    """Return the `Plan` that writes the checkpoint into `params["encoder"]`."""
    hf_config, cfg = checkpoint.config, encoder_config
    check_config(hf_config, cfg, checkpoint.directory)
    width, patch = cfg.width, cfg.patch_size
    plan = Plan(name=f"DINOv3 checkpoint {checkpoint.directory}", assignments=[])
    plan.ignored["embeddings.mask_token"] = "used only by masked-image pretraining"

    def add(sources, shapes, *targets):
        plan.assignments.append(Assignment(tuple(sources), tuple(shapes), tuple(targets)))

    add(
        ["embeddings.patch_embeddings.weight"],
        [(width, 3, patch, patch)],
        (("encoder", "patch_embed", "kernel"), _conv_to_dense),
    )
    add(
        ["embeddings.patch_embeddings.bias"],
        [(width,)],
        (("encoder", "patch_embed", "bias"), _same),
    )
    prefix_sources, prefix_shapes = ["embeddings.cls_token"], [(1, 1, width)]
    if cfg.num_registers:
        prefix_sources.append("embeddings.register_tokens")
        prefix_shapes.append((1, cfg.num_registers, width))
    else:
        plan.ignored["embeddings.register_tokens"] = "empty, the model has no registers"
    add(prefix_sources, prefix_shapes, (("encoder", "prefix_tokens"), _prefix_tokens))

    layer_prefix = _layer_prefix(checkpoint.keys())
    biases = dict(
        q_proj=hf_config.get("query_bias", True),
        k_proj=hf_config.get("key_bias", False),
        v_proj=hf_config.get("value_bias", True),
        o_proj=hf_config.get("proj_bias", True),
    )
    mlp_names = (
        ("gate_proj", "up_proj", "down_proj")
        if cfg.mlp_type == "swiglu"
        else ("up_proj", "down_proj")
    )
    for layer in range(cfg.depth):
        source, target = f"{layer_prefix}{layer}.", (f"layers_{layer}",)
        for norm in ("norm1", "norm2"):
            for hf_name, name in (("weight", "scale"), ("bias", "bias")):
                add(
                    [f"{source}{norm}.{hf_name}"],
                    [(width,)],
                    (("encoder",) + target + (norm, name), _same),
                )
        for name, has_bias in biases.items():
            path = ("encoder",) + target + (name,)
            add(
                [f"{source}attention.{name}.weight"],
                [(width, width)],
                (path + ("kernel",), transpose),
            )
            if has_bias:
                add([f"{source}attention.{name}.bias"], [(width,)], (path + ("bias",), _same))
            else:
                add((), (), (path + ("bias",), functools.partial(np.zeros, (width,), np.float32)))
        for index in (1, 2):
            add(
                [f"{source}layer_scale{index}.lambda1"],
                [(width,)],
                (("encoder",) + target + (f"ls{index}",), _same),
            )
        for name in mlp_names:
            shape = (width, cfg.mlp_dim) if name == "down_proj" else (cfg.mlp_dim, width)
            path = ("encoder",) + target + ("mlp", name)
            add([f"{source}mlp.{name}.weight"], [shape], (path + ("kernel",), transpose))
            if cfg.mlp_bias:
                add([f"{source}mlp.{name}.bias"], [shape[:1]], (path + ("bias",), _same))
    for hf_name, name in (("weight", "scale"), ("bias", "bias")):
        add([f"norm.{hf_name}"], [(width,)], (("encoder", "final_norm", name), _same))
    zeroed = [name for name, has_bias in biases.items() if not has_bias]
    if zeroed:
        plan.notes.append(f"Attention biases of {zeroed} set to zero: the checkpoint has none.")
    return plan
