"""Sampler speed with and without the KV cache, and greedy decoding against transformers.

    python -m benchmarks.sampler [--size bench|tiny]

Figures (batch `size.batch`, no guidance, random weights):

- rep-token decode time per token: with the cache, one new token attends
  to the cached prefix; without it, every token reruns the whole prefix
  `[text] [BOR, rep]` (fixed length, causal, so later cells do not matter);
- pixel ODE time per velocity evaluation: with the cached prefix (the
  pixels attend to it, read only); without a cache (the whole generation
  row); and a forward pass over the pixel patches alone, the floor;
- end-to-end time per image for `size.ode_steps` ODE steps, with and
  without the cache;
- greedy text decoding per token, rf_jax's jitted decoder against
  transformers `generate` with the same Qwen2 shape (prefill excluded: the
  time for one new token is subtracted).
"""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.train_step import qwen2_config
from rf_jax import flow
from rf_jax import mask as mask_lib
from rf_jax import partitioning
from rf_jax import sampler as sampler_lib
from rf_jax import trainer as trainer_lib
from rf_jax.encoder import unpatchify
from rf_jax.model import RFModel

GREEDY_REP = sampler_lib.SamplerConfig(
    temperature=0.0, text_scale=1.0, rep_scale=1.0, rep_logits_scale=1.0
)


def _prefix_rep_predictions(module, text_ids, rep):
    """Rep predictions of a whole prefix `[text] [BOR, rep]` without a cache: [batch, R + 1, K]."""
    cfg = module.config
    x, positions, segments, modality, _ = module._prefix(text_ids, rep)
    spans = tuple((a, min(b, x.shape[1]), e) for a, b, e in cfg.generation_spans()[:2])
    hidden, _ = module.backbone(x, positions, segments, modality, expert_spans=spans)
    return module.rep_output(hidden[:, cfg.text_len :])


def _pixels_alone(module, z, t):
    """Run the denoiser on the pixel patches alone, without any prefix."""
    cfg = module.config
    batch, patches = z.shape[0], cfg.num_pixels
    full = lambda value: jnp.full((batch, patches), value, jnp.int32)  # noqa: E731
    hidden, _ = module.backbone(
        module.embed_pixels(z, t),
        full(0),
        full(1),
        full(mask_lib.PIXEL),
        expert_spans=((0, patches, mask_lib.PIXEL_EXPERT),),
    )
    return module.pixel_head(hidden)


def uncached_rep_tokens(model, params, prompts, rng):
    """Greedy rep tokens, each from a full pass over the prefix: [batch, R]."""
    num_rep = model.config.num_rep
    batch = prompts.shape[0]

    def step(rep, cell):
        logits = model.apply({"params": params}, prompts, rep, method=_prefix_rep_predictions)
        token = jnp.argmax(logits[:, cell], axis=-1).astype(jnp.int32)
        return rep.at[:, cell].set(token), None

    rep, _ = jax.lax.scan(step, jnp.zeros((batch, num_rep), jnp.int32), jnp.arange(num_rep))
    return rep


def uncached_text_to_image(model, params, prompts, rng, num_steps):
    """Text to image with every network call over the whole row: uint8 images."""
    cfg = model.config
    batch = prompts.shape[0]
    rep = uncached_rep_tokens(model, params, prompts, rng)
    visible = jnp.ones((batch,), bool)

    def denoise(z, t):
        return model.apply({"params": params}, prompts, rep, z, t, visible)[1]

    noise = jax.random.normal(rng, (batch, cfg.num_pixels, cfg.pixel_dim), jnp.float32)
    patches = flow.integrate(denoise, noise, num_steps)
    return sampler_lib.to_uint8(unpatchify(patches, cfg.pixel_patch))


def _prompts(size, batch, length, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, size.vocab_size, (batch, length), dtype=np.int32)
    ids[:, 0] = 1  # BOS
    return jnp.asarray(ids)


def _timed(size, function, *args, slow=False):
    """(median seconds, compile seconds) of a jitted function on `args`.

    `slow` figures (the uncached samplers, seconds to minutes a call) are
    timed once, without a warm-up call: compilation is already done, and a
    first call costs the same as later ones to within a percent at that length.
    """
    compiled, compile_s = common.compile_seconds(jax.jit(function), *args)
    if slow:
        return common.median_seconds(lambda: common.block(compiled(*args)), 1), compile_s
    common.block(compiled(*args))
    return common.median_seconds(lambda: common.block(compiled(*args)), size.repeats), compile_s


def random_model(size):
    """(ModelConfig, randomly initialised parameters) of a benchmark size."""
    config = common.experiment_config(size)
    model_config = common.model_config(config)
    trainer = trainer_lib.Trainer(
        config, model_config, partitioning.create_mesh(config.mesh), config.train.steps
    )
    return model_config, trainer.init_state(0).params


def prefill_generation(model, params, prompts):
    """Prefill `[text] [BOR]` into a new cache; return (the first rep prediction, cache)."""
    cfg = model.config
    cache = sampler_lib.empty_cache(cfg, prompts.shape[0], cfg.text_len + cfg.rep_region)
    return model.apply({"params": params}, prompts, cache, method=RFModel.prefill_generation)


def generation_prefix(model, params, prompts):
    """Return greedy rep tokens and the cache of the whole prefix `[text] [BOR, rep]`."""
    first, cache = prefill_generation(model, params, prompts)
    return sampler_lib._generate_rep_tokens(
        model, params, cache, first, jax.random.key(0), GREEDY_REP, prompts.shape[0], False
    )


def decode_step(model_config, params, size, calls):
    """Build a jitted greedy `decode_text` step that runs as the decoding loop runs it.

    Returns (step, state), where `step(params, *state)` returns the next
    state: the next tokens and the cache. The cache is donated, so it is
    updated in place, as in the loop of `make_text_to_text`. It has room for
    `calls` steps after a prompt of `size.prompt_len` tokens.
    """
    model = RFModel(model_config)
    prompts = _prompts(size, size.batch, size.prompt_len)
    cache = sampler_lib.empty_cache(model_config, size.batch, size.prompt_len + calls)
    prefill = jax.jit(lambda p, x, c: model.apply({"params": p}, x, c, method=RFModel.prefill_text))
    logits, cache = prefill(params, prompts, cache)

    def step(params, tokens, cache):
        logits, cache = model.apply({"params": params}, tokens, cache, method=RFModel.decode_text)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache

    tokens = jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.jit(step, donate_argnums=2), (tokens, cache)


def rf_sampler(size):
    """Rep decode, ODE evaluation and end-to-end figures of the RF sampler."""
    model_config, params = random_model(size)
    model = RFModel(model_config)
    batch = size.batch
    prompts = _prompts(size, batch, model_config.text_len)
    rng = jax.random.key(0)
    num_rep = model_config.num_rep

    first, prefix_cache = jax.jit(lambda p, x: prefill_generation(model, p, x))(params, prompts)

    def cached_rep(params, cache, first, rng):
        return sampler_lib._generate_rep_tokens(
            model, params, cache, first, rng, GREEDY_REP, batch, False
        )

    rep_cached_s, _ = _timed(size, cached_rep, params, prefix_cache, first, rng)
    rep_uncached_s, _ = _timed(
        size, lambda p, x: uncached_rep_tokens(model, p, x, rng), params, prompts, slow=True
    )
    rep, full_cache = jax.jit(cached_rep)(params, prefix_cache, first, rng)

    z = jax.random.normal(rng, (batch, model_config.num_pixels, model_config.pixel_dim))
    t = jnp.full((batch,), 0.5, jnp.float32)
    visible = jnp.ones((batch,), bool)

    def ode_cached(params, z, t, cache):
        return model.apply({"params": params}, z, t, cache, visible, method=RFModel.denoise)

    def ode_uncached(params, z, t):
        return model.apply({"params": params}, prompts, rep, z, t, visible)[1]

    def pixels_alone(params, z, t):
        return model.apply({"params": params}, z, t, method=_pixels_alone)

    ode_cached_s, _ = _timed(size, ode_cached, params, z, t, full_cache)
    ode_uncached_s, _ = _timed(size, ode_uncached, params, z, t)
    pixels_alone_s, _ = _timed(size, pixels_alone, params, z, t)

    sampler_config = sampler_lib.SamplerConfig(
        num_steps=size.ode_steps, text_scale=1.0, rep_scale=1.0, rep_logits_scale=1.0
    )
    end_cached_s, _ = _timed(
        size,
        lambda p, x, r: sampler_lib.text_to_image(model, p, x, r, sampler_config)["images"],
        params,
        prompts,
        rng,
    )
    end_uncached_s, _ = _timed(
        size,
        lambda p, x, r: uncached_text_to_image(model, p, x, r, size.ode_steps),
        params,
        prompts,
        rng,
        slow=True,
    )
    return dict(
        batch=batch,
        rep_tokens=num_rep,
        ode_steps=size.ode_steps,
        rep_decode_per_token_cached=rep_cached_s / num_rep,
        rep_decode_per_token_uncached=rep_uncached_s / num_rep,
        ode_evaluation_cached=ode_cached_s,
        ode_evaluation_uncached=ode_uncached_s,
        ode_evaluation_pixels_alone=pixels_alone_s,
        per_image_cached=end_cached_s / batch,
        per_image_uncached=end_uncached_s / batch,
    )


def rf_greedy_decode(size):
    """Per-token time of rf_jax's jitted greedy text decoder (prefill excluded)."""
    model_config, params = random_model(size)
    prompts = _prompts(size, size.batch, size.prompt_len)
    rng = jax.random.key(0)
    times = {}
    for new in (1, size.new_tokens):
        decode = sampler_lib.make_text_to_text(model_config, new, temperature=0.0)
        common.block(decode(params, prompts, rng))
        times[new] = common.median_seconds(
            lambda d=decode: common.block(d(params, prompts, rng)), size.repeats
        )
    return (times[size.new_tokens] - times[1]) / (size.new_tokens - 1)


def transformers_greedy_decode(size):
    """Per-token time of transformers `generate` with the same shape (prefill excluded)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(qwen2_config(size)).float().eval()
    prompts = torch.tensor(
        np.asarray(_prompts(size, size.batch, size.prompt_len)), dtype=torch.long
    )
    mask = torch.ones_like(prompts)
    times = {}
    with torch.inference_mode():
        for new in (1, size.new_tokens):

            def generate(new=new):
                model.generate(
                    prompts,
                    attention_mask=mask,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                )

            generate()
            times[new] = common.median_seconds(generate, size.repeats)
    return (times[size.new_tokens] - times[1]) / (size.new_tokens - 1)


def run(size):
    figures = rf_sampler(size)
    ours = rf_greedy_decode(size)
    theirs = transformers_greedy_decode(size)
    figures.update(
        greedy_decode_per_token=ours,
        transformers_decode_per_token=theirs,
        decode_speedup_over_transformers=theirs / ours,
        ode_cached_over_pixels_alone=(
            figures["ode_evaluation_cached"] / figures["ode_evaluation_pixels_alone"]
        ),
        prompt_len=size.prompt_len,
        new_tokens=size.new_tokens,
    )
    return figures


if __name__ == "__main__":
    common.main(run, __doc__)
