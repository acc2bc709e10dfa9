"""Caption an image, or answer a question about it, with a trained run.

    python -m rf_jax.caption --workdir workdirs/quickstart --image teapot.png
    python -m rf_jax.caption --workdir workdirs/fmnist --image shoe.png --question "what is this?"

The image is resized to the run's resolution, and transparent areas become
white. Questions get answers only from a model trained on question-answer
pairs (Fashion-MNIST); an OpenMoji model only captions.
"""

from absl import app
from absl import flags
import numpy as np

from rf_jax import images as images_lib
from rf_jax import inference
from rf_jax.logs import quiet_library_logs


def caption_files(workdir, paths, question="", max_tokens=16):
    """Return the answer to `question` ("" for a caption) for each image file."""
    paths = list(paths or [])
    if not paths:
        raise ValueError("No image given; pass at least one --image.")
    if max_tokens < 1:
        raise ValueError(f"--max_tokens must be at least 1, got {max_tokens}.")
    config, model_config, tokenizer, params = inference.load_run(workdir)
    images = np.stack([images_lib.load_image(path, model_config.image_size) for path in paths])
    return inference.caption_images(model_config, tokenizer, params, images, question, max_tokens)


def _define_flags():
    """Define the command-line flags (only when run as a program, so imports never clash)."""
    flags.DEFINE_string("workdir", None, "Workdir of a run of rf_jax.train.")
    flags.DEFINE_multi_string("image", None, "Image file (PNG or JPEG); repeatable.")
    flags.DEFINE_string("question", "", "Question about the image; empty for a caption.")
    flags.DEFINE_integer("max_tokens", 16, "Maximum number of answer tokens.")


def main(argv):
    quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    if not values.workdir:
        raise app.UsageError("--workdir is required.")
    answers = caption_files(values.workdir, values.image, values.question, values.max_tokens)
    for path, answer in zip(values.image, answers):
        print(f"{path}\t{answer}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
