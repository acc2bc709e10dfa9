"""The Representation Forcing model: embeddings, encoder, MoT backbone and heads.

A generation row has a fixed layout of `text_len + num_rep + 1 + num_pixels` tokens:

    [text, left-padded] [BOR, rep_1 .. rep_R] [pixel patches]
     causal              causal                bidirectional among themselves

BOR (begin of representation) is the extra rep-embedding id `codebook_size`.
The hidden state at BOR predicts rep_1, the one at rep_i predicts rep_{i+1};
pixel hidden states predict the clean patches (x-prediction). Flow time t = 1
is the clean image and t = 0 is pure noise.

An understanding row is `[encoder tokens] [text, right-padded]`, where the
hidden state at text position i predicts text token i + 1.

RoPE positions count only real tokens (`cumsum` of the non-padding mask), so
left padding at sampling and right padding at training give the same
positions. All encoder tokens of an image share one position, and so do all
pixel patches. Rep tokens and pixel patches also get a fixed 2-D embedding
of their grid cell.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from rf_jax import mask as mask_lib
from rf_jax.backbone import APPEND, READ, Backbone, BackboneConfig
from rf_jax.data.tokenizer import PAD_ID
from rf_jax.encoder import Connector, Encoder, EncoderConfig
from rf_jax.layers import Dense, sincos_2d, timestep_embedding
from rf_jax.partitioning import gather_for_compute


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of the whole model, built from `config.model`."""

    image_size: int
    pixel_patch: int
    pixel_bottleneck: int
    vocab_size: int
    text_len: int
    codebook_size: int
    backbone: BackboneConfig
    encoder: EncoderConfig
    use_rep_tokens: bool = True
    tie_embeddings: bool = False

    @property
    def rep_grid(self):
        return self.image_size // self.encoder.patch_size

    @property
    def num_rep(self):
        """Rep tokens per image (0 when the model generates pixels directly)."""
        return self.rep_grid**2 if self.use_rep_tokens else 0

    @property
    def rep_region(self):
        """Length of the rep region of a generation row: BOR and the rep tokens."""
        return self.num_rep + 1 if self.use_rep_tokens else 0

    @property
    def pixel_grid(self):
        return self.image_size // self.pixel_patch

    @property
    def num_pixels(self):
        return self.pixel_grid**2

    @property
    def pixel_dim(self):
        return self.pixel_patch * self.pixel_patch * 3

    @property
    def num_image_tokens(self):
        """Encoder tokens of an understanding example."""
        return self.rep_grid**2

    @property
    def generation_len(self):
        return self.text_len + self.rep_region + self.num_pixels

    @property
    def bor_id(self):
        return self.codebook_size

    def generation_spans(self):
        """Static expert routing of a generation row."""
        t, r = self.text_len, self.rep_region
        spans = [(0, t, mask_lib.UNDERSTANDING_EXPERT)]
        if r:
            spans.append((t, t + r, mask_lib.REP_EXPERT))
        spans.append((t + r, t + r + self.num_pixels, mask_lib.PIXEL_EXPERT))
        return tuple(spans)


def text_positions(text_ids, offset=0):
    """Return (positions [batch, len], segment ids [batch, len], count [batch]) of text.

    Padding tokens get segment 0 and the position of the previous real token.
    """
    valid = text_ids != PAD_ID
    count = jnp.sum(valid, axis=-1).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0).astype(jnp.int32) + offset
    return positions, valid.astype(jnp.int32), count


def _full(batch, length, value):
    return jnp.full((batch, length), value, jnp.int32)


def _append(a, b):
    return jnp.concatenate([a, b], axis=1)


class RFModel(nn.Module):
    """Unified model; each public method is one pure function of the parameters."""

    config: ModelConfig

    def setup(self):
        cfg, b = self.config, self.config.backbone
        embed_init = lambda names: nn.with_logical_partitioning(  # noqa: E731
            nn.initializers.normal(0.02), names
        )
        dense = lambda features, axes, name, bias=True: Dense(  # noqa: E731
            features, axes, use_bias=bias, dtype=b.dtype, param_dtype=b.param_dtype, name=name
        )

        self.encoder = Encoder(cfg.encoder, name="encoder")
        self.connector = Connector(b.width, b.dtype, b.param_dtype, name="connector")
        self.text_embed = nn.Embed(
            cfg.vocab_size,
            b.width,
            embedding_init=embed_init(("vocab", "embed")),
            dtype=b.dtype,
            param_dtype=b.param_dtype,
            name="text_embed",
        )
        self.rep_embed = nn.Embed(
            cfg.codebook_size + 1,
            b.width,
            embedding_init=embed_init(("codebook", "embed")),
            dtype=b.dtype,
            param_dtype=b.param_dtype,
            name="rep_embed",
        )
        self.pixel_in = dense(cfg.pixel_bottleneck, ("pixel", "bottleneck"), "pixel_in", bias=False)
        self.pixel_proj = dense(b.width, ("bottleneck", "embed"), "pixel_proj")
        self.time_fc1 = dense(b.width, ("time", "embed"), "time_fc1")
        self.time_fc2 = dense(b.width, ("embed", "embed_out"), "time_fc2")
        self.backbone = Backbone(b, name="backbone")
        if not cfg.tie_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), "lm_head", bias=False)
        self.rep_head = dense(cfg.codebook_size, ("embed", "codebook"), "rep_head", bias=False)
        self.pixel_head = dense(cfg.pixel_dim, ("embed", "pixel"), "pixel_head")

    # Embeddings.

    def _text_logits(self, hidden):
        if self.config.tie_embeddings:
            table = gather_for_compute(self.text_embed.embedding, ("vocab", "embed"))
            dtype = self.config.backbone.dtype
            return jnp.dot(hidden.astype(dtype), table.T.astype(dtype))
        return self.lm_head(hidden)

    def embed_pixels(self, z, t):
        """Embed noisy patches z [batch, patches, p*p*3] at flow times t [batch]."""
        cfg = self.config
        x = self.pixel_proj(self.pixel_in(z))
        time = self.time_fc2(nn.silu(self.time_fc1(timestep_embedding(t, cfg.backbone.width))))
        return x + time[:, None, :] + sincos_2d(cfg.pixel_grid, cfg.backbone.width).astype(x.dtype)

    def embed_rep(self, rep_ids, cells):
        """Embed rep ids [batch, n] whose grid cells are `cells` [n] (-1 for BOR)."""
        cfg = self.config
        table = sincos_2d(cfg.rep_grid, cfg.backbone.width)
        grid = jnp.where((cells >= 0)[:, None], table[jnp.maximum(cells, 0)], 0.0)
        return self.rep_embed(rep_ids) + grid.astype(self.config.backbone.dtype)

    def image_tokens(self, images):
        """Encoder tokens of understanding images, [batch, patches, width]."""
        features = self.encoder(images)
        tokens = self.connector(features)
        return tokens + sincos_2d(self.config.rep_grid, self.config.backbone.width).astype(
            tokens.dtype
        )

    def encode(self, images):
        """Patch features [batch, patches, enc_width] of the encoder (for EMA targets)."""
        return self.encoder(images)

    # Training forward passes.

    def _prefix(self, text_ids, rep_ids):
        """Embed `[text] [BOR, rep_ids]` (just the text without rep tokens).

        Returns:
            (x [batch, len, width], positions, segment ids, modality [batch, len],
            count [batch] of real text tokens).
        """
        cfg = self.config
        batch, text_len = text_ids.shape
        positions, segments, count = text_positions(text_ids)
        x = self.text_embed(text_ids)
        modality = _full(batch, text_len, mask_lib.TEXT)
        if not cfg.use_rep_tokens:
            return x, positions, segments, modality, count

        region = rep_ids.shape[1] + 1
        bor = jnp.full((batch, 1), cfg.bor_id, jnp.int32)
        cells = jnp.arange(-1, region - 1, dtype=jnp.int32)
        x = jnp.concatenate([x, self.embed_rep(jnp.concatenate([bor, rep_ids], axis=1), cells)], 1)
        positions = _append(positions, count[:, None] + jnp.arange(region, dtype=jnp.int32)[None])
        segments = _append(segments, _full(batch, region, 1))
        modality = _append(modality, _full(batch, region, mask_lib.REP))
        return x, positions, segments, modality, count

    def __call__(self, text_ids, rep_ids, z, t, rep_visible):
        """Run one generation batch.

        Args:
            text_ids: int32 [batch, text_len], left-padded, starting with BOS.
            rep_ids: int32 [batch, num_rep] target rep tokens (ignored without rep tokens).
            z: [batch, num_pixels, pixel_dim] noisy patches at time t.
            t: float32 [batch] flow time (1 = clean).
            rep_visible: bool [batch]; False drops the rep condition of the pixels.

        Returns:
            (rep_logits [batch, num_rep, codebook_size] or None, x_hat [batch, num_pixels, pixel_dim]).
        """
        cfg = self.config
        batch = text_ids.shape[0]
        x, positions, segments, modality, count = self._prefix(text_ids, rep_ids)

        pixel_position = count + cfg.rep_region
        x = jnp.concatenate([x, self.embed_pixels(z, t)], axis=1)
        positions = _append(
            positions, jnp.broadcast_to(pixel_position[:, None], (batch, cfg.num_pixels))
        )
        segments = _append(segments, _full(batch, cfg.num_pixels, 1))
        modality = _append(modality, _full(batch, cfg.num_pixels, mask_lib.PIXEL))

        hidden, _ = self.backbone(
            x,
            positions,
            segments,
            modality,
            rep_visible=rep_visible,
            expert_spans=cfg.generation_spans(),
        )
        start = cfg.text_len
        rep_logits = None
        if cfg.use_rep_tokens:
            rep_logits = self.rep_head(hidden[:, start : start + cfg.num_rep])
        x_hat = self.pixel_head(hidden[:, start + cfg.rep_region :])
        return rep_logits, x_hat

    def _understanding_inputs(self, images, text_ids):
        """Embed `[image tokens] [text]`; encoder tokens share RoPE position 0.

        Returns:
            (x [batch, len, width], positions, segment ids, modality [batch, len],
            count [batch] of real text tokens).
        """
        image = self.image_tokens(images)
        batch, num_image, _ = image.shape
        positions, segments, count = text_positions(text_ids, offset=1)
        x = jnp.concatenate([image, self.text_embed(text_ids)], axis=1)
        positions = _append(_full(batch, num_image, 0), positions)
        segments = _append(_full(batch, num_image, 1), segments)
        modality = _append(
            _full(batch, num_image, mask_lib.IMAGE), _full(batch, text_ids.shape[1], mask_lib.TEXT)
        )
        return x, positions, segments, modality, count

    def understand(self, images, text_ids):
        """Return text logits [batch, text, vocab] for `[image tokens] [text]` rows.

        `text_ids` is right-padded `[BOS, question, answer, EOS]`; logits at i predict i + 1.
        """
        x, positions, segments, modality, _ = self._understanding_inputs(images, text_ids)
        spans = ((0, x.shape[1], mask_lib.UNDERSTANDING_EXPERT),)
        hidden, _ = self.backbone(x, positions, segments, modality, expert_spans=spans)
        num_image = self.config.num_image_tokens
        return self._text_logits(hidden[:, num_image:])

    def initialize(self, text_ids, rep_ids, z, t, rep_visible, und_images, und_text):
        """Touch every parameter (used only by `init`)."""
        self(text_ids, rep_ids, z, t, rep_visible)
        self.encode(und_images)
        return self.understand(und_images, und_text)

    # Cached inference.

    def prefill_generation(self, text_ids, cache):
        """Prefill `[text] [BOR]`; return (logits of rep_1 [batch, K] or None, cache)."""
        cfg = self.config
        rep_ids = jnp.zeros((text_ids.shape[0], 0), jnp.int32)
        x, positions, segments, modality, count = self._prefix(text_ids, rep_ids)
        spans = cfg.generation_spans()[:2] if cfg.use_rep_tokens else cfg.generation_spans()[:1]
        spans = tuple((start, min(stop, x.shape[1]), expert) for start, stop, expert in spans)
        hidden, cache = self.backbone(
            x, positions, segments, modality, expert_spans=spans, cache=cache, mode=APPEND
        )
        cache = cache.replace(next_position=count + (1 if cfg.use_rep_tokens else 0))
        logits = self.rep_head(hidden[:, -1]) if cfg.use_rep_tokens else None
        return logits, cache

    def decode_rep(self, rep_ids, cell, cache):
        """Append rep tokens [batch] for grid cell `cell`; return (next logits [batch, K], cache)."""
        batch = rep_ids.shape[0]
        x = self.embed_rep(rep_ids[:, None], jnp.reshape(cell, (1,)))
        hidden, cache = self.backbone(
            x,
            cache.next_position[:, None],
            _full(batch, 1, 1),
            _full(batch, 1, mask_lib.REP),
            expert_spans=((0, 1, mask_lib.REP_EXPERT),),
            cache=cache,
            mode=APPEND,
        )
        cache = cache.replace(next_position=cache.next_position + 1)
        return self.rep_head(hidden[:, 0]), cache

    def denoise(self, z, t, cache, rep_visible):
        """Predict clean patches x_hat from z [batch, patches, p*p*3] at times t [batch].

        The pixel patches attend to the cached prefix, which is read, not changed.
        """
        cfg = self.config
        batch = z.shape[0]
        positions = jnp.broadcast_to(cache.next_position[:, None], (batch, cfg.num_pixels))
        hidden, _ = self.backbone(
            self.embed_pixels(z, t),
            positions,
            _full(batch, cfg.num_pixels, 1),
            _full(batch, cfg.num_pixels, mask_lib.PIXEL),
            rep_visible=rep_visible,
            expert_spans=((0, cfg.num_pixels, mask_lib.PIXEL_EXPERT),),
            cache=cache,
            mode=READ,
        )
        return self.pixel_head(hidden)

    def prefill_understanding(self, images, prompt_ids, cache):
        """Prefill `[image tokens] [prompt, left-padded]`; return (next-token logits, cache)."""
        x, positions, segments, modality, count = self._understanding_inputs(images, prompt_ids)
        spans = ((0, x.shape[1], mask_lib.UNDERSTANDING_EXPERT),)
        hidden, cache = self.backbone(
            x, positions, segments, modality, expert_spans=spans, cache=cache, mode=APPEND
        )
        cache = cache.replace(next_position=count + 1)
        return self._text_logits(hidden[:, -1]), cache

    def decode_text(self, token_ids, cache):
        """Append text tokens [batch]; return (next-token logits [batch, vocab], cache)."""
        batch = token_ids.shape[0]
        hidden, cache = self.backbone(
            self.text_embed(token_ids[:, None]),
            cache.next_position[:, None],
            _full(batch, 1, 1),
            _full(batch, 1, mask_lib.TEXT),
            expert_spans=((0, 1, mask_lib.UNDERSTANDING_EXPERT),),
            cache=cache,
            mode=APPEND,
        )
        cache = cache.replace(next_position=cache.next_position + 1)
        return self._text_logits(hidden[:, 0]), cache
