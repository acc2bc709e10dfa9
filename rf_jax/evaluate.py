"""Evaluate a trained run offline: GenEval-format generation and understanding.

    python -m rf_jax.evaluate --workdir workdirs/quickstart

The suites follow the run's data set:

    shapes         GenEval scores of the held-out prompts of the build (N images
                   per prompt, read by the shape detector), and question
                   answering on test scenes (exact match, by kind of question).
    fashion_mnist  class accuracy of images generated for each class prompt and
                   their Frechet distance to real test images, both measured
                   by an independent classifier. Understanding is scored by
                   the answer to "what is this?" (exact match).
    openmoji       captions of test emoji (exact match and token F1).

Results go to `{workdir}/eval.json`, and a grid of the first image of each
GenEval prompt to `{workdir}/eval_samples.png`.
"""

import json
import os
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from rf_jax import images as images_lib
from rf_jax import sampler as sampler_lib
from rf_jax.data import fashion_mnist
from rf_jax.data import pipeline
from rf_jax.data import shapes
from rf_jax.data import shapes_prompts
from rf_jax.eval import geneval
from rf_jax.eval import metrics
from rf_jax.eval.detector import ShapeDetector
from rf_jax.inference import Generator, encode_prompts, load_run
from rf_jax.logs import quiet_library_logs

EVAL_FILE = "eval.json"
# Rows per sampler call; the last call is padded, so every call has one shape.
_BATCH = 64


def _padded_chunks(rows, batch):
    """Yield (chunk padded to `batch` rows, number of real rows) over a [n, ...] array."""
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
        yield chunk, real


def generate_images(generator, params, prompts, images_per_prompt, seed=0, batch=_BATCH):
    """Sample `images_per_prompt` images of each prompt: uint8 [prompts, N, H, W, 3]."""
    flat = [prompt for prompt in prompts for _ in range(images_per_prompt)]
    ids = encode_prompts(generator.tokenizer, flat, generator.model_config.text_len)
    out = []
    for index, (chunk, real) in enumerate(_padded_chunks(ids, batch)):
        sample = generator.sample_fn(params, jnp.asarray(chunk), jax.random.key(seed + index))
        out.append(np.asarray(sample["images"])[:real])
    images = np.concatenate(out)
    return images.reshape((len(prompts), images_per_prompt) + images.shape[1:])


def answer_questions(model_config, tokenizer, params, images, questions, max_tokens=6):
    """Greedy answers to one question per image; images uint8 [n, H, W, 3]."""
    prompts = encode_prompts(
        tokenizer, questions, 1 + max(len(tokenizer.encode(q)) for q in questions)
    )
    answer = sampler_lib.make_image_to_text(model_config, max_tokens)
    out = []
    for (image_chunk, real), (prompt_chunk, _) in zip(
        _padded_chunks(np.asarray(images), _BATCH), _padded_chunks(prompts, _BATCH)
    ):
        tokens = answer(
            params, jnp.asarray(image_chunk), jnp.asarray(prompt_chunk), jax.random.key(0)
        )
        out.extend(np.asarray(tokens)[:real].tolist())
    return [tokenizer.decode([t for t in row if t != tokenizer.pad_id]) for row in out]


def evaluate_geneval(generator, params, metadata_path, images_per_prompt, grid_path=None):
    """GenEval task accuracies and overall score of generated images."""
    specs = geneval.load_metadata(metadata_path)
    images = generate_images(generator, params, [s.prompt for s in specs], images_per_prompt)
    result = geneval.evaluate(specs, list(images), ShapeDetector())
    if grid_path:
        grid = images_lib.make_grid(images[:, 0], columns=16)
        images_lib.save_png(grid, grid_path, scale=2)
    result.pop("correct_per_prompt")
    return result


def _question_kind(question):
    words = question.split()
    return {"what": "color", "how": "count", "where": "position"}.get(words[0], "other")


def evaluate_questions(model_config, tokenizer, params, examples, max_tokens=6):
    """Exact match of the answers to every (question, answer) pair of `examples`."""
    images, questions, answers = [], [], []
    for example in examples:
        for question, reference in example.qa:
            images.append(example.image)
            questions.append(question)
            answers.append(reference)
    predictions = answer_questions(
        model_config, tokenizer, params, np.stack(images), questions, max_tokens
    )
    result = {"exact_match": metrics.exact_match(predictions, answers), "questions": len(answers)}
    for kind in sorted({_question_kind(q) for q in questions}):
        chosen = [i for i, q in enumerate(questions) if _question_kind(q) == kind]
        result[f"exact_match_{kind}"] = metrics.exact_match(
            [predictions[i] for i in chosen], [answers[i] for i in chosen]
        )
    result["examples"] = [
        {"question": q, "answer": a, "predicted": p}
        for q, a, p in list(zip(questions, answers, predictions))[:12]
    ]
    return result


def evaluate_captions(model_config, tokenizer, params, examples, max_tokens=12):
    """Exact match and token F1 of generated captions against the references."""
    references = [example.caption for example in examples]
    predictions = answer_questions(
        model_config,
        tokenizer,
        params,
        np.stack([e.image for e in examples]),
        [""] * len(examples),
        max_tokens,
    )
    return {
        "exact_match": metrics.exact_match(predictions, references),
        "token_f1": metrics.mean_token_f1(predictions, references),
        "captions": len(references),
    }


def evaluate_fashion_generation(generator, params, examples, classifier, per_class):
    """Class accuracy and Frechet distance of images generated for each class prompt."""
    prompts = [fashion_mnist.CAPTION_TEMPLATES[0].format(p) for p in fashion_mnist.CLASS_PHRASES]
    images = generate_images(generator, params, prompts, per_class)
    labels = np.repeat(np.arange(len(prompts)), per_class)
    flat = images.reshape((-1,) + images.shape[2:])
    real = np.stack([e.image for e in examples])
    return {
        "class_accuracy": metrics.classification_accuracy(classifier.predict(flat), labels),
        "frechet_distance": metrics.frechet_distance(
            classifier.features(flat), classifier.features(real)
        ),
        "generated": len(flat),
        "real": len(real),
        "classifier_test_accuracy": classifier.test_accuracy,
    }


def evaluate_run(
    workdir,
    images_per_prompt=4,
    num_examples=300,
    classifier_dir=None,
    output_name=EVAL_FILE,
    **sampler_overrides,
):
    """Run the suites of the run's data set and write `{workdir}/{output_name}`.

    `sampler_overrides` (e.g. `text_scale=1.0`) replace fields of the run's sampler config.
    """
    config, model_config, tokenizer, params = load_run(workdir)
    start = time.perf_counter()
    generator = Generator(config, model_config, tokenizer, **sampler_overrides)
    examples = pipeline.load_examples(config.data, tokenizer, "test", num_examples)
    name = config.data.name
    result = {"dataset": name, "variant": model_config.variant, "sampler": sampler_overrides}
    if name == shapes.NAME:
        metadata = shapes_prompts.geneval_prompts_path(pipeline.dataset_dir(config.data))
        grid = os.path.join(workdir, "eval_samples.png")
        result["geneval"] = evaluate_geneval(
            generator, params, metadata, images_per_prompt, grid_path=grid
        )
        result["questions"] = evaluate_questions(model_config, tokenizer, params, examples)
    elif name == fashion_mnist.NAME:
        from rf_jax.eval import classifier as classifier_lib

        classifier = classifier_lib.load_or_train(
            os.path.expanduser(classifier_dir or classifier_lib.DEFAULT_CACHE_DIR)
        )
        result["generation"] = evaluate_fashion_generation(
            generator, params, examples, classifier, per_class=max(images_per_prompt, 20)
        )
        for example in examples:
            example.qa = [("what is this?", fashion_mnist.CLASS_NAMES[example.label])]
        result["questions"] = evaluate_questions(model_config, tokenizer, params, examples)
    else:
        result["captions"] = evaluate_captions(model_config, tokenizer, params, examples)
    result["seconds"] = time.perf_counter() - start
    with open(os.path.join(workdir, output_name), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    logging.info("Evaluation of %s: %s", workdir, _summary(result))
    return result


def _summary(result):
    parts = []
    if "geneval" in result:
        parts.append(f"GenEval overall {result['geneval']['overall']:.3f}")
    if "generation" in result:
        parts.append(f"class accuracy {result['generation']['class_accuracy']:.3f}")
        parts.append(f"FD {result['generation']['frechet_distance']:.2f}")
    for key in ("questions", "captions"):
        if key in result:
            parts.append(f"{key} exact match {result[key]['exact_match']:.3f}")
    return ", ".join(parts)


def main(argv: Sequence[str]):
    quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    overrides = {
        name: getattr(values, name)
        for name in ("text_scale", "rep_scale", "rep_logits_scale", "num_steps")
        if getattr(values, name) is not None
    }
    try:
        result = evaluate_run(
            values.workdir,
            values.images_per_prompt,
            values.num_examples,
            values.classifier_dir,
            values.output_name,
            **overrides,
        )
    except FileNotFoundError as error:
        sys.exit(f"Evaluation failed: {error}")
    print(_summary(result))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "The --workdir of a finished rf_jax.train run.")
    flags.DEFINE_integer("images_per_prompt", 4, "Images generated per GenEval prompt.")
    flags.DEFINE_integer("num_examples", 300, "Test examples for the understanding suites.")
    flags.DEFINE_string("classifier_dir", None, "Cache of the Fashion-MNIST classifier.")
    flags.DEFINE_string("output_name", EVAL_FILE, "File name of the results in the workdir.")
    flags.DEFINE_float("text_scale", None, "Text guidance scale (default: the run's).")
    flags.DEFINE_float("rep_scale", None, "Rep-condition guidance scale (default: the run's).")
    flags.DEFINE_float("rep_logits_scale", None, "Guidance on rep logits (default: the run's).")
    flags.DEFINE_integer("num_steps", None, "ODE steps (default: the run's).")
    flags.mark_flag_as_required("workdir")
    app.run(main)
