"""Generate images from text prompts with a trained run.

    python -m rf_jax.sample --workdir workdirs/quickstart --prompt "red apple" --out apple.png

Several --prompt flags give several images, written side by side into one
PNG. An empty prompt ("") samples without a text condition. Sampler settings default to the run's config and can be overridden.
"""

from absl import app
from absl import flags
from absl import logging

from rf_jax import images as images_lib
from rf_jax import inference
from rf_jax.logs import quiet_library_logs


def generate_to_png(workdir, prompts, out, seed=0, scale=4, **sampler_overrides):
    """Sample one image per prompt from the latest checkpoint of `workdir` into one PNG."""
    prompts = list(prompts or [])
    if not prompts:
        raise ValueError("No prompt given; pass at least one --prompt.")
    config, model_config, tokenizer, params = inference.load_run(workdir)
    generator = inference.Generator(config, model_config, tokenizer, **sampler_overrides)
    images = generator.generate(params, prompts, seed)
    images_lib.save_png(images_lib.make_grid(images, columns=len(images)), out, scale=scale)
    logging.info("Wrote %d images for %s to %s.", len(images), prompts, out)
    return images


def _define_flags():
    """Define the command-line flags (only when run as a program, so imports never clash)."""
    flags.DEFINE_string("workdir", None, "Workdir of a run of rf_jax.train.")
    flags.DEFINE_multi_string("prompt", None, "Text prompt; repeat for several images.")
    flags.DEFINE_string("out", "samples.png", "Output PNG path.")
    flags.DEFINE_integer("seed", 0, "PRNG seed of the sampler.")
    flags.DEFINE_integer("num_steps", None, "ODE steps (default: the run's config).")
    flags.DEFINE_float("text_scale", None, "Text guidance scale; 1 turns it off.")
    flags.DEFINE_float("rep_scale", None, "Rep guidance scale; 1 turns it off.")
    flags.DEFINE_float("temperature", None, "Rep-token temperature; 0 is greedy.")
    flags.DEFINE_integer("scale", 4, "Enlarge the PNG this many times (nearest neighbour).")


def main(argv):
    quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    if not values.workdir:
        raise app.UsageError("--workdir is required.")
    generate_to_png(
        values.workdir,
        values.prompt,
        values.out,
        values.seed,
        values.scale,
        num_steps=values.num_steps,
        text_scale=values.text_scale,
        rep_scale=values.rep_scale,
        temperature=values.temperature,
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
