"""Analytic matrix-multiply FLOP counts of the model, for throughput and MFU figures.

Only matrix multiplies are counted (2 FLOPs per multiply-add): dense layers,
the attention scores and their weighted sums, the codebook's score and update
matmuls. Norms, activations, softmax and the optimiser add a few percent at
the widths where MFU matters; `rf_jax.aot` and the benchmarks print XLA's own
count beside this one.

Attention is counted over every (query, key) pair the kernel computes, which
is all of them: the masks select entries but skip no work.

Training counts 3 forward passes for the trained modules (the forward pass,
then the gradients of the activations and of the weights) and 1 for the EMA
encoder, which only produces targets.
"""

import dataclasses

from rf_jax.backbone import BackboneConfig
from rf_jax.encoder import EncoderConfig


def backbone_layer_flops(cfg: BackboneConfig, queries: int, keys: int) -> int:
    """Count one backbone layer on `queries` tokens of one row attending to `keys` keys.

    Each token goes through the feed-forward expert of its modality only.
    """
    heads = cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    projections = 2 * queries * cfg.width * (2 * heads + 2 * kv)  # q, o, then k, v
    attention = 2 * 2 * queries * keys * heads  # q.k scores, then the weighted sum of v
    mlp = 2 * queries * 3 * cfg.width * cfg.mlp_dim  # SwiGLU: gate, up, down
    return projections + attention + mlp


def backbone_flops(cfg: BackboneConfig, queries: int, keys: int | None = None) -> int:
    """Count all backbone layers on one row (keys defaults to the queries: no cache)."""
    keys = queries if keys is None else keys
    return cfg.depth * backbone_layer_flops(cfg, queries, keys)


def encoder_flops(cfg: EncoderConfig, image_size: int) -> int:
    """Count the ViT encoder on one image, patch embedding included."""
    patches = (image_size // cfg.patch_size) ** 2
    tokens = patches + 1 + cfg.num_registers
    patch_embed = 2 * patches * cfg.patch_size**2 * 3 * cfg.width
    matrices = 3 if cfg.mlp_type == "swiglu" else 2
    layer = (
        2 * tokens * 4 * cfg.width * cfg.width  # q, k, v, o
        + 2 * 2 * tokens * tokens * cfg.width  # scores and weighted sum
        + 2 * tokens * matrices * cfg.width * cfg.mlp_dim
    )
    return patch_embed + cfg.depth * layer


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one train step, by part; `total` is what MFU divides by the step time."""

    generation: int  # Generation rows through the backbone and their heads, trained.
    understanding: int  # Understanding rows: encoder, connector, backbone, text logits, trained.
    ema_targets: int  # EMA encoder on the generation images, forward only.
    codebook: int  # Token assignment and the codebook update.

    @property
    def total(self) -> int:
        return self.generation + self.understanding + self.ema_targets + self.codebook


def generation_row_forward(model_config) -> int:
    """Forward FLOPs of one generation row `[text] [BOR, rep] [pixels]`."""
    cfg = model_config
    b = cfg.backbone
    length = cfg.generation_len
    flops = backbone_flops(b, length)
    pixels = cfg.num_pixels
    flops += 2 * pixels * cfg.pixel_dim * cfg.pixel_bottleneck  # pixel_in
    flops += 2 * pixels * cfg.pixel_bottleneck * b.width  # pixel_proj
    flops += 2 * 2 * b.width * b.width  # The time MLP, once per row.
    flops += 2 * pixels * b.width * cfg.pixel_dim  # pixel_head
    if cfg.use_rep_tokens:
        out = cfg.encoder.width if cfg.continuous_rep else cfg.codebook_size
        flops += 2 * cfg.num_rep * b.width * out  # rep_head or rep_out
        if cfg.continuous_rep:
            flops += 2 * cfg.num_rep * cfg.encoder.width * b.width  # rep_in
    if cfg.variant == "repa":
        cells = cfg.rep_grid**2
        flops += 2 * cells * (b.width * cfg.repa_mlp_dim + cfg.repa_mlp_dim * cfg.encoder.width)
    return flops


def understanding_row_forward(model_config, text_len: int) -> int:
    """Forward FLOPs of one understanding row `[image tokens] [text]` with text logits."""
    cfg = model_config
    b = cfg.backbone
    image = cfg.num_image_tokens
    flops = encoder_flops(cfg.encoder, cfg.image_size)
    flops += 2 * image * (cfg.encoder.width * b.width + b.width * b.width)  # connector
    flops += backbone_flops(b, image + text_len)
    flops += 2 * text_len * b.width * cfg.vocab_size  # text logits
    return flops


def train_step_flops(model_config, generation_rows: int, understanding_rows: int, und_text_len):
    """Model FLOPs of one train step over a batch of the given composition."""
    cfg = model_config
    ema = codebook = 0
    if generation_rows and cfg.uses_ema_features:
        ema = generation_rows * encoder_flops(cfg.encoder, cfg.image_size)
    if generation_rows and cfg.uses_codebook:
        features = generation_rows * cfg.rep_grid**2
        # Scores for the assignment and for Sinkhorn, then the one-hot feature sums.
        codebook = 3 * 2 * features * cfg.encoder.width * cfg.codebook_size
    return StepFlops(
        generation=3 * generation_rows * generation_row_forward(cfg),
        understanding=3 * understanding_rows * understanding_row_forward(cfg, und_text_len),
        ema_targets=ema,
        codebook=codebook,
    )
