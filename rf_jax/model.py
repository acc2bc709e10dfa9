"""The Representation Forcing model: embeddings, encoder, MoT backbone and heads.

A generation row has a fixed layout of `text_len + num_rep + 1 + num_pixels` tokens:

    [text, left-padded] [BOR, rep_1 .. rep_R] [pixel patches]
     causal              causal                bidirectional among themselves

BOR (begin of representation) is the extra rep-embedding id `codebook_size`.
The hidden state at BOR predicts rep_1, the one at rep_i predicts rep_{i+1};
pixel hidden states predict the clean patches (x-prediction). Flow time t = 1
is the clean image and t = 0 is pure noise.

`ModelConfig.variant` selects the method or one of its ablations:

    pixel_rf    the method: discrete rep tokens from the EMA encoder's codebook.
    pixel       no rep region; the pixels follow the text directly.
    repa        no rep region; an MLP projector on the pixel hidden states after
                backbone layer `repa_depth` is aligned to the EMA encoder's patch
                features (REPA-style auxiliary loss).
    continuous  the rep region carries the continuous EMA features: the rep
                positions embed a feature and regress the next one.

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
from rf_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from rf_jax.encoder import Connector, Encoder, EncoderConfig
from rf_jax.layers import Dense, sincos_2d, timestep_embedding
from rf_jax.partitioning import gather_for_compute

VARIANTS = ("pixel_rf", "pixel", "repa", "continuous")


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
    variant: str = "pixel_rf"
    tie_embeddings: bool = False
    repa_depth: int = 1  # REPA: backbone layers before the aligned hidden state.
    repa_mlp_dim: int = 512  # REPA: hidden width of the projector.

    # Special text ids of the tokenizer; every pad_id token is treated as padding.
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(
                f"model.variant={self.variant!r} is not one of {VARIANTS}; see rf_jax.model."
            )
        if self.variant == "repa":
            if not 1 <= self.repa_depth <= self.backbone.depth:
                raise ValueError(
                    f"model.repa_depth={self.repa_depth} must lie in [1, backbone depth "
                    f"{self.backbone.depth}]."
                )
            if self.pixel_grid % self.rep_grid:
                raise ValueError(
                    f"REPA pools the {self.pixel_grid}x{self.pixel_grid} pixel grid onto the "
                    f"{self.rep_grid}x{self.rep_grid} encoder grid, so the first must be a "
                    "multiple of the second; change model.pixel_patch or model.encoder.patch_size."
                )

    @property
    def use_rep_tokens(self):
        """Whether generation rows have a rep region (BOR and rep positions)."""
        return self.variant in ("pixel_rf", "continuous")

    @property
    def continuous_rep(self):
        """Whether the rep positions carry continuous EMA features instead of codes."""
        return self.variant == "continuous"

    @property
    def uses_codebook(self):
        return self.variant == "pixel_rf"

    @property
    def uses_ema_features(self):
        """Whether the generation loss needs the EMA encoder's features of the images."""
        return self.variant != "pixel"

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


def text_positions(text_ids, offset=0, pad_id=PAD_ID):
    """Return (positions [batch, len], segment ids [batch, len], count [batch]) of text.

    Padding tokens (`pad_id`) get segment 0 and the position of the previous real token.
    """
    valid = text_ids != pad_id
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
        if cfg.continuous_rep:
            # Only the BOR row of rep_embed is used; features enter through rep_in.
            self.rep_in = dense(b.width, ("enc_embed", "embed"), "rep_in")
            self.rep_out = dense(cfg.encoder.width, ("embed", "enc_embed"), "rep_out")
        else:
            self.rep_head = dense(cfg.codebook_size, ("embed", "codebook"), "rep_head", bias=False)
        if cfg.variant == "repa":
            self.repa_fc1 = dense(cfg.repa_mlp_dim, ("embed", "mlp"), "repa_fc1")
            self.repa_fc2 = dense(cfg.encoder.width, ("mlp", "enc_embed"), "repa_fc2")
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

    def embed_bor(self, batch):
        """Return the BOR embedding [batch, 1, width], which gets no grid embedding."""
        return self.rep_embed(jnp.full((batch, 1), self.config.bor_id, jnp.int32))

    def embed_rep(self, rep, cells):
        """Embed rep inputs of grid cells `cells` int32 [n].

        `rep` is ids int32 [batch, n], or EMA features [batch, n, enc_width]
        for the continuous variant.
        """
        cfg = self.config
        x = self.rep_in(rep) if cfg.continuous_rep else self.rep_embed(rep)
        grid = sincos_2d(cfg.rep_grid, cfg.backbone.width)[cells]
        return x + grid.astype(cfg.backbone.dtype)

    def rep_output(self, hidden):
        """Rep prediction from hidden states: logits over the codebook, or the next feature."""
        return self.rep_out(hidden) if self.config.continuous_rep else self.rep_head(hidden)

    def repa_projection(self, hidden):
        """Project pixel hidden states [batch, pixels, width] onto the encoder grid.

        The pixel grid is average-pooled onto the coarser encoder grid, then an
        MLP maps each cell to the encoder width: [batch, rep_grid**2, enc_width].
        """
        cfg = self.config
        batch, _, width = hidden.shape
        factor = cfg.pixel_grid // cfg.rep_grid
        grid = hidden.reshape(batch, cfg.rep_grid, factor, cfg.rep_grid, factor, width)
        pooled = jnp.mean(grid, axis=(2, 4)).reshape(batch, cfg.rep_grid**2, width)
        return self.repa_fc2(nn.silu(self.repa_fc1(pooled)))

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

    def _prefix(self, text_ids, rep):
        """Embed `[text] [BOR, rep]` (just the text without a rep region).

        `rep` is rep ids [batch, n] or, for the continuous variant, features
        [batch, n, enc_width]; n may be 0.

        Returns:
            (x [batch, len, width], positions, segment ids, modality [batch, len],
            count [batch] of real text tokens).
        """
        cfg = self.config
        batch, text_len = text_ids.shape
        positions, segments, count = text_positions(text_ids, pad_id=cfg.pad_id)
        x = self.text_embed(text_ids)
        modality = _full(batch, text_len, mask_lib.TEXT)
        if not cfg.use_rep_tokens:
            return x, positions, segments, modality, count

        region = rep.shape[1] + 1
        cells = jnp.arange(region - 1, dtype=jnp.int32)
        x = jnp.concatenate([x, self.embed_bor(batch), self.embed_rep(rep, cells)], axis=1)
        positions = _append(positions, count[:, None] + jnp.arange(region, dtype=jnp.int32)[None])
        segments = _append(segments, _full(batch, region, 1))
        modality = _append(modality, _full(batch, region, mask_lib.REP))
        return x, positions, segments, modality, count

    def __call__(self, text_ids, rep, z, t, rep_visible):
        """Run one generation batch.

        Args:
            text_ids: int32 [batch, text_len], left-padded, starting with BOS.
            rep: teacher-forced rep inputs: ids int32 [batch, num_rep], or EMA
                features [batch, num_rep, enc_width] for the continuous variant
                (ignored without a rep region).
            z: [batch, num_pixels, pixel_dim] noisy patches at time t.
            t: float32 [batch] flow time (1 = clean).
            rep_visible: bool [batch]; False drops the rep condition of the pixels.

        Returns:
            (rep prediction or None, x_hat [batch, num_pixels, pixel_dim]). The rep
            prediction is logits [batch, num_rep, codebook_size], or next features
            [batch, num_rep, enc_width] for the continuous variant. The REPA variant
            also sows its projection [batch, rep_grid**2, enc_width] as
            `intermediates/repa_projection`.
        """
        cfg = self.config
        batch = text_ids.shape[0]
        x, positions, segments, modality, count = self._prefix(text_ids, rep)

        pixel_position = count + cfg.rep_region
        x = jnp.concatenate([x, self.embed_pixels(z, t)], axis=1)
        positions = _append(
            positions, jnp.broadcast_to(pixel_position[:, None], (batch, cfg.num_pixels))
        )
        segments = _append(segments, _full(batch, cfg.num_pixels, 1))
        modality = _append(modality, _full(batch, cfg.num_pixels, mask_lib.PIXEL))

        repa = cfg.variant == "repa"
        outputs = self.backbone(
            x,
            positions,
            segments,
            modality,
            rep_visible=rep_visible,
            expert_spans=cfg.generation_spans(),
            capture_layer=cfg.repa_depth if repa else None,
        )
        hidden = outputs[0]
        start = cfg.text_len
        pixel_start = start + cfg.rep_region
        if repa:
            captured = outputs[2][:, pixel_start:]
            self.sow("intermediates", "repa_projection", self.repa_projection(captured))
        rep_prediction = None
        if cfg.use_rep_tokens:
            rep_prediction = self.rep_output(hidden[:, start : start + cfg.num_rep])
        return rep_prediction, self.pixel_head(hidden[:, pixel_start:])

    def _understanding_inputs(self, images, text_ids):
        """Embed `[image tokens] [text]`; encoder tokens share RoPE position 0.

        Returns:
            (x [batch, len, width], positions, segment ids, modality [batch, len],
            count [batch] of real text tokens).
        """
        image = self.image_tokens(images)
        batch, num_image, _ = image.shape
        positions, segments, count = text_positions(text_ids, 1, self.config.pad_id)
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

    def text_forward(self, text_ids):
        """Run text alone through the understanding expert, as a plain causal language model.

        Args:
            text_ids: int32 [batch, len]; PAD tokens are padding.

        Returns:
            (hidden [batch, len, width] after the final norm, logits [batch, len, vocab]);
            the logits at i predict token i + 1.
        """
        x, positions, segments, modality, _ = self._text_inputs(text_ids)
        spans = ((0, x.shape[1], mask_lib.UNDERSTANDING_EXPERT),)
        hidden, _ = self.backbone(x, positions, segments, modality, expert_spans=spans)
        return hidden, self._text_logits(hidden)

    def _text_inputs(self, text_ids):
        """Embed text alone.

        Returns:
            (x [batch, len, width], positions, segment ids, modality [batch, len],
            count [batch] of real text tokens).
        """
        positions, segments, count = text_positions(text_ids, pad_id=self.config.pad_id)
        modality = _full(text_ids.shape[0], text_ids.shape[1], mask_lib.TEXT)
        return self.text_embed(text_ids), positions, segments, modality, count

    def initialize(self, text_ids, rep, z, t, rep_visible, und_images, und_text):
        """Touch every parameter (used only by `init`)."""
        self(text_ids, rep, z, t, rep_visible)
        self.encode(und_images)
        return self.understand(und_images, und_text)

    # Cached inference.

    def prefill_generation(self, text_ids, cache):
        """Prefill `[text] [BOR]`; return (the first rep prediction [batch, ...] or None, cache)."""
        cfg = self.config
        empty = jnp.zeros((text_ids.shape[0], 0, cfg.encoder.width), jnp.float32)
        if not cfg.continuous_rep:
            empty = jnp.zeros((text_ids.shape[0], 0), jnp.int32)
        x, positions, segments, modality, count = self._prefix(text_ids, empty)
        spans = cfg.generation_spans()[:2] if cfg.use_rep_tokens else cfg.generation_spans()[:1]
        spans = tuple((start, min(stop, x.shape[1]), expert) for start, stop, expert in spans)
        hidden, cache = self.backbone(
            x, positions, segments, modality, expert_spans=spans, cache=cache, mode=APPEND
        )
        cache = cache.replace(next_position=count + (1 if cfg.use_rep_tokens else 0))
        prediction = self.rep_output(hidden[:, -1]) if cfg.use_rep_tokens else None
        return prediction, cache

    def decode_rep(self, rep, cell, cache):
        """Append the rep inputs of grid cell `cell` and predict the next one.

        `rep` is ids int32 [batch] (or features [batch, enc_width] for the
        continuous variant). Returns (logits [batch, K] or features, cache).
        """
        batch = rep.shape[0]
        x = self.embed_rep(rep[:, None], jnp.reshape(cell, (1,)))
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
        return self.rep_output(hidden[:, 0]), cache

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

    def prefill_text(self, prompt_ids, cache):
        """Prefill left-padded text int32 [batch, len]; return (next-token logits, cache)."""
        x, positions, segments, modality, count = self._text_inputs(prompt_ids)
        spans = ((0, x.shape[1], mask_lib.UNDERSTANDING_EXPERT),)
        hidden, cache = self.backbone(
            x, positions, segments, modality, expert_spans=spans, cache=cache, mode=APPEND
        )
        cache = cache.replace(next_position=count)
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
