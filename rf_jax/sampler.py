"""Jitted text-to-image and image-to-text sampling, importable without any CLI.

Text to image, for a batch of prompts at once:

1. Prefill `[prompt] [BOR]` into a KV cache (and the empty prompt as the
   unconditional branch when guidance needs it).
2. Sample the rep tokens one by one with `jax.lax.scan` (temperature, top-k,
   optional classifier-free guidance on the logits).
3. Integrate the pixel flow from t = 0 (noise) to t = 1 (clean) with Heun
   steps and a final Euler step; pixel patches attend to the cached prefix,
   which is never recomputed. Guidance on the clean estimate, inside the time
   interval [guidance_low, guidance_high] only:

       x_text = x(empty prompt, rep) + text_scale * (x(prompt, rep) - x(empty prompt, rep))
       x      = x(prompt, no rep) + rep_scale * (x_text - x(prompt, no rep))

   A scale of 1 turns its branch off, so it costs nothing.

Example:

    sample = make_text_to_image(model_config, SamplerConfig(num_steps=50))
    out = sample(params, prompt_ids, jax.random.key(0))
    out["images"]  # uint8 [batch, height, width, 3]
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from rf_jax import flow
from rf_jax.backbone import KVCache
from rf_jax.data.tokenizer import BOS_ID, PAD_ID
from rf_jax.encoder import unpatchify
from rf_jax.model import ModelConfig, RFModel


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Sampling settings (static: a change recompiles the sampler)."""

    num_steps: int = 50
    temperature: float = 1.0
    top_k: int = 0  # 0 keeps every code.
    rep_logits_scale: float = 1.0  # CFG on the rep-token logits; 1 is off.
    text_scale: float = 4.0
    rep_scale: float = 1.0
    guidance_low: float = 0.1
    guidance_high: float = 1.0
    noise_scale: float = 1.0

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {self.num_steps}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every code), got {self.top_k}.")
        if not 0.0 <= self.guidance_low <= self.guidance_high <= 1.0:
            raise ValueError(
                "The guidance interval must satisfy 0 <= guidance_low <= guidance_high <= 1, got "
                f"[{self.guidance_low}, {self.guidance_high}]."
            )


def sample_from_logits(rng, logits, temperature, top_k):
    """Sample ids [batch] from logits [batch, classes]; temperature 0 is greedy."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


def empty_prompt(batch, text_len, pad_id=PAD_ID, bos_id=BOS_ID):
    """Return the unconditional prompt `[PAD ... PAD, BOS]`, int32 [batch, text_len]."""
    prompt = jnp.full((batch, text_len), pad_id, jnp.int32)
    return prompt.at[:, -1].set(bos_id)


def _take_rows(cache, rows):
    """Select batch rows of a KV cache (keys and values carry depth first)."""
    return cache.replace(
        keys=cache.keys[:, rows],
        values=cache.values[:, rows],
        segment_ids=cache.segment_ids[rows],
        modality=cache.modality[rows],
        next_position=cache.next_position[rows],
    )


def empty_cache(model_config, batch, size):
    """Create an empty KV cache of `size` slots for `batch` rows."""
    b = model_config.backbone
    return KVCache.empty(b.depth, batch, size, b.num_kv_heads, b.head_dim, b.dtype)


def to_uint8(images):
    """Map float images in [-1, 1] to uint8 [0, 255]."""
    return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def _generate_rep_tokens(model, params, cache, first_prediction, rng, cfg, batch, guided):
    """Sample the rep region with the cache; return (rep [batch, R] or [batch, R, D], cache).

    Discrete rep tokens are sampled from the logits (guided by `rep_logits_scale`);
    the continuous variant feeds back its (guided) feature predictions.
    """
    num_rep = model.config.num_rep
    continuous = model.config.continuous_rep

    def step(carry, cell):
        cache, prediction, rng = carry
        rng, key = jax.random.split(rng)
        if guided:
            cond, uncond = prediction[:batch], prediction[batch:]
            prediction = uncond + cfg.rep_logits_scale * (cond - uncond)
        if continuous:
            rep = prediction.astype(jnp.float32)
        else:
            rep = sample_from_logits(key, prediction, cfg.temperature, cfg.top_k)
        feed = jnp.concatenate([rep, rep]) if guided else rep
        prediction, cache = model.apply(
            {"params": params}, feed, cell, cache, method=RFModel.decode_rep
        )
        return (cache, prediction, rng), rep

    cells = jnp.arange(num_rep, dtype=jnp.int32)
    (cache, _, _), rep = jax.lax.scan(step, (cache, first_prediction, rng), cells)
    return jnp.moveaxis(rep, 0, 1), cache


def _guided_denoiser(model, params, cache, cfg, batch, use_text, use_rep):
    """Return denoise(z, t) -> x_hat with the guidance branches of `cfg` applied."""
    rows = [jnp.arange(batch)]  # Prompt, rep visible.
    visible = [jnp.ones((batch,), bool)]
    if use_text:
        rows.append(jnp.arange(batch, 2 * batch))  # Empty prompt, rep visible.
        visible.append(jnp.ones((batch,), bool))
    if use_rep:
        rows.append(jnp.arange(batch))  # Prompt, rep hidden.
        visible.append(jnp.zeros((batch,), bool))
    branch_cache = _take_rows(cache, jnp.concatenate(rows))
    rep_visible = jnp.concatenate(visible)
    num_branches = len(rows)

    def denoise(z, t):
        z_all = jnp.concatenate([z] * num_branches)
        t_all = jnp.concatenate([t] * num_branches)
        x_all = model.apply(
            {"params": params}, z_all, t_all, branch_cache, rep_visible, method=RFModel.denoise
        )
        branches = jnp.split(x_all.astype(jnp.float32), num_branches)
        conditional = branches[0]
        guided = conditional
        if use_text:
            guided = branches[1] + cfg.text_scale * (conditional - branches[1])
        if use_rep:
            guided = branches[-1] + cfg.rep_scale * (guided - branches[-1])
        inside = (t >= cfg.guidance_low) & (t <= cfg.guidance_high)
        return jnp.where(inside[:, None, None], guided, conditional)

    return denoise


def text_to_image(model, params, prompt_ids, rng, cfg: SamplerConfig):
    """Generate images for left-padded prompts int32 [batch, text_len].

    Returns:
        {"images": uint8 [batch, H, W, 3], "rep_tokens": int32 [batch, R]}; for the
        continuous variant `rep_tokens` holds the fed-back features [batch, R, enc_width].
    """
    mcfg = model.config
    batch = prompt_ids.shape[0]
    use_rep = mcfg.use_rep_tokens and cfg.rep_scale != 1.0
    use_text = cfg.text_scale != 1.0
    logits_guided = mcfg.use_rep_tokens and cfg.rep_logits_scale != 1.0
    two_prompts = use_text or logits_guided

    prompts = prompt_ids
    if two_prompts:
        empty = empty_prompt(batch, mcfg.text_len, mcfg.pad_id, mcfg.bos_id)
        prompts = jnp.concatenate([prompt_ids, empty])
    cache = empty_cache(mcfg, prompts.shape[0], mcfg.text_len + mcfg.rep_region)
    first_logits, cache = model.apply(
        {"params": params}, prompts, cache, method=RFModel.prefill_generation
    )

    rep_key, noise_key = jax.random.split(rng)
    rep_tokens = jnp.zeros((batch, 0), jnp.int32)
    if mcfg.use_rep_tokens:
        rep_tokens, cache = _generate_rep_tokens(
            model, params, cache, first_logits, rep_key, cfg, batch, two_prompts
        )

    denoise = _guided_denoiser(model, params, cache, cfg, batch, use_text, use_rep)
    noise = cfg.noise_scale * jax.random.normal(
        noise_key, (batch, mcfg.num_pixels, mcfg.pixel_dim), jnp.float32
    )
    patches = flow.integrate(denoise, noise, cfg.num_steps)
    images = unpatchify(patches, mcfg.pixel_patch)
    return {"images": to_uint8(images), "rep_tokens": rep_tokens}


def make_text_to_image(model_config: ModelConfig, sampler_config: SamplerConfig):
    """Return jitted `sample(params, prompt_ids, rng) -> {"images", "rep_tokens"}`."""
    model = RFModel(model_config)

    @jax.jit
    def sample(params, prompt_ids, rng):
        return text_to_image(model, params, prompt_ids, rng, sampler_config)

    return sample


def decode_tokens(model, params, cache, logits, rng, max_new_tokens, temperature=0.0):
    """Sample text tokens one by one from `logits` [batch, vocab] and a prefilled cache.

    Returns:
        int32 [batch, max_new_tokens]: the generated tokens, PAD after the first EOS.
    """
    mcfg = model.config

    def step(carry, _):
        cache, logits, done, rng = carry
        rng, key = jax.random.split(rng)
        tokens = sample_from_logits(key, logits, temperature, 0)
        tokens = jnp.where(done, mcfg.pad_id, tokens)
        done = done | (tokens == mcfg.eos_id)
        logits, cache = model.apply({"params": params}, tokens, cache, method=RFModel.decode_text)
        return (cache, logits, done, rng), tokens

    init = (cache, logits, jnp.zeros((logits.shape[0],), bool), rng)
    _, tokens = jax.lax.scan(step, init, None, length=max_new_tokens)
    return tokens.T


def image_to_text(model, params, images, prompt_ids, rng, max_new_tokens, temperature=0.0):
    """Decode answers for images uint8 [batch, H, W, 3] and left-padded prompts.

    Returns:
        int32 [batch, max_new_tokens]: the generated tokens, PAD after the first EOS.
    """
    batch = images.shape[0]
    size = model.config.num_image_tokens + prompt_ids.shape[1] + max_new_tokens
    cache = empty_cache(model.config, batch, size)
    logits, cache = model.apply(
        {"params": params}, images, prompt_ids, cache, method=RFModel.prefill_understanding
    )
    return decode_tokens(model, params, cache, logits, rng, max_new_tokens, temperature)


def text_to_text(model, params, prompt_ids, rng, max_new_tokens, temperature=0.0):
    """Continue left-padded prompts int32 [batch, len] with the language path alone.

    Returns:
        int32 [batch, max_new_tokens]: the generated tokens, PAD after the first EOS.
    """
    size = prompt_ids.shape[1] + max_new_tokens
    cache = empty_cache(model.config, prompt_ids.shape[0], size)
    logits, cache = model.apply({"params": params}, prompt_ids, cache, method=RFModel.prefill_text)
    return decode_tokens(model, params, cache, logits, rng, max_new_tokens, temperature)


def make_image_to_text(
    model_config: ModelConfig, max_new_tokens: int, temperature: Optional[float] = 0.0
):
    """Return jitted `answer(params, images, prompt_ids, rng) -> tokens [batch, max_new_tokens]`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    model = RFModel(model_config)

    @jax.jit
    def answer(params, images, prompt_ids, rng):
        return image_to_text(model, params, images, prompt_ids, rng, max_new_tokens, temperature)

    return answer


def make_text_to_text(model_config: ModelConfig, max_new_tokens: int, temperature: float = 0.0):
    """Return jitted `continue_text(params, prompt_ids, rng) -> tokens [batch, max_new_tokens]`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    model = RFModel(model_config)

    @jax.jit
    def continue_text(params, prompt_ids, rng):
        return text_to_text(model, params, prompt_ids, rng, max_new_tokens, temperature)

    return continue_text
