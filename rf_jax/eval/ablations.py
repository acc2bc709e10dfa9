"""Miniature reproduction of the Representation Forcing paper's ablations: train, evaluate, tabulate.

    python -m rf_jax.eval.ablations --root workdirs/ablations --out docs/results.md

Every run of `suite()` trains one variant on the shapes benchmark or on
Fashion-MNIST at a fixed budget (`--steps`), is evaluated by `rf_jax.evaluate`,
and leaves `run.json` and `eval.json` in its workdir. A run with both files is
not repeated, so an interrupted suite continues where it stopped; a run
stopped mid-training resumes from its checkpoint. The tables are then written
to `--out`; text between the `notes` markers of an existing file is kept.
"""

import dataclasses
import json
import os
import platform
import subprocess
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from rf_jax import codebook as codebook_lib
from rf_jax import configs
from rf_jax.data import build as data_build
from rf_jax.data import fashion_mnist
from rf_jax.data import shapes
from rf_jax.logs import quiet_library_logs

VARIANTS = ("pixel", "pixel_rf", "repa", "continuous")
DATASETS = (shapes.NAME, fashion_mnist.NAME)
RUN_FILE = "run.json"
DEFAULT_STEPS = 800


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the suite."""

    variant: str
    dataset: str
    seed: int = 0
    codebook_size: int = 256

    @property
    def name(self):
        suffix = "" if self.codebook_size == 256 else f"_k{self.codebook_size}"
        return f"{self.dataset}/{self.variant}{suffix}_seed{self.seed}"


def suite(seeds=3):
    """Return the runs behind the tables: Table 3 on shapes, Table 2 on shapes and Fashion-MNIST."""
    runs = [Run(v, shapes.NAME, s) for s in range(seeds) for v in ("pixel", "pixel_rf")]
    runs += [Run("repa", shapes.NAME), Run("continuous", shapes.NAME)]
    runs += [Run(v, fashion_mnist.NAME) for v in ("pixel", "pixel_rf")]
    runs += [Run("pixel_rf", shapes.NAME, codebook_size=64)]
    return runs


def variant_config(variant, dataset=shapes.NAME, seed=0, codebook_size=256, steps=DEFAULT_STEPS):
    """Return the miniature config: a 32 px model of about 2M parameters for a CPU."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; choose one of {VARIANTS}.")
    if dataset not in DATASETS:
        raise ValueError(f"Unknown data set {dataset!r}; choose one of {DATASETS}.")
    config = configs.default_config()
    config.model.variant = variant
    config.model.image_size = 32
    config.model.text_len = 16
    config.model.pixel_patch = 4
    config.model.codebook.size = codebook_size
    config.model.ema_decay = 0.995
    config.model.backbone.update(
        width=128, depth=3, num_heads=2, num_kv_heads=1, head_dim=64, mlp_dim=384
    )
    config.model.repa_depth = 1
    config.model.repa_mlp_dim = 256

    config.data.name = dataset
    config.data.seed = seed
    config.data.batch_size = 32
    config.data.und_text_len = 24

    config.train.seed = seed
    config.train.steps = steps
    config.train.log_every = 50
    config.train.checkpoint_every = 200
    config.train.keep_checkpoints = 1
    config.train.sample_every = 0
    config.train.num_caption_images = 16
    config.optim.warmup_steps = min(100, steps // 4)

    config.sample.num_steps = 25
    if dataset == shapes.NAME:
        config.sample.prompts = (
            "a photo of a red circle",
            "a photo of a blue square",
            "a photo of a yellow triangle",
            "a photo of a circle and a square",
            "a photo of two triangles",
            "a photo of a green circle left of a white square",
            "a photo of three circles",
            "a photo of a purple square above a red triangle",
        )
    else:
        config.sample.prompts = tuple(
            fashion_mnist.CAPTION_TEMPLATES[0].format(p) for p in fashion_mnist.CLASS_PHRASES[:8]
        )
    return config


def config_from_arg(variant, arg=None):
    """`variant_config` from a config-file argument `DATASET[,SEED[,K]]`."""
    parts = [part.strip() for part in (arg or shapes.NAME).split(",")]
    if len(parts) > 3:
        raise ValueError(f"Config argument {arg!r} has more than DATASET,SEED,K.")
    try:
        numbers = [int(part) for part in parts[1:]]
    except ValueError as error:
        raise ValueError(f"Config argument {arg!r}: SEED and K must be integers.") from error
    seed = numbers[0] if numbers else 0
    size = numbers[1] if len(numbers) > 1 else 256
    return variant_config(variant, parts[0], seed, size)


def codebook_usage(state, model_config, images):
    """Codes used and the perplexity of their distribution on uint8 images [n, H, W, 3]."""
    from rf_jax.encoder import Encoder

    features = Encoder(model_config.encoder).apply({"params": state.ema_encoder}, images)
    tokens = np.asarray(codebook_lib.assign_tokens(features, state.codebook.prototypes)).ravel()
    counts = np.bincount(tokens, minlength=model_config.codebook_size)
    p = counts[counts > 0] / counts.sum()
    return {
        "codes_used": int((counts > 0).sum()),
        "perplexity": float(np.exp(-(p * np.log(p)).sum())),
    }


def train_and_evaluate_run(run: Run, root: str, steps: int, images_per_prompt: int):
    """Train (or resume) and evaluate one run; return its run.json record."""
    from rf_jax import evaluate
    from rf_jax import train
    from rf_jax.data import pipeline

    workdir = os.path.join(root, run.name)
    record_path = os.path.join(workdir, RUN_FILE)
    eval_path = os.path.join(workdir, evaluate.EVAL_FILE)
    if os.path.exists(record_path):
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        if os.path.exists(eval_path) and record.get("images_per_prompt") == images_per_prompt:
            logging.info("Reusing the finished run %s.", workdir)
            return record
        # Trained before: evaluate again (another protocol, or evaluation was interrupted).
        return _evaluate(workdir, record, record_path, images_per_prompt)

    config = variant_config(run.variant, run.dataset, run.seed, run.codebook_size, steps)
    start = time.perf_counter()
    state = train.train_and_evaluate(config, workdir)
    train_seconds = time.perf_counter() - start

    tokenizer = pipeline.load_tokenizer(config.data)
    model_config = configs.model_config(config, tokenizer.vocab_size)
    record = dataclasses.asdict(run) | {"steps": steps, "train_seconds": train_seconds}
    if model_config.uses_codebook:
        examples = pipeline.load_examples(config.data, tokenizer, "test", 256)
        images = jnp.asarray(np.stack([e.image for e in examples]))
        record["codebook"] = codebook_usage(state, model_config, images)
    del state
    with open(record_path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return _evaluate(workdir, record, record_path, images_per_prompt)


def _evaluate(workdir, record, record_path, images_per_prompt):
    """Evaluate a trained run and write its record, with the evaluation time."""
    from rf_jax import evaluate

    start = time.perf_counter()
    evaluate.evaluate_run(workdir, images_per_prompt=images_per_prompt)
    record.update(eval_seconds=time.perf_counter() - start, images_per_prompt=images_per_prompt)
    with open(record_path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return record


def load_results(root, runs):
    """{run name: {"run": run.json, "eval": eval.json}} of the finished runs."""
    results = {}
    for run in runs:
        workdir = os.path.join(root, run.name)
        try:
            with open(os.path.join(workdir, RUN_FILE), encoding="utf-8") as f:
                record = json.load(f)
            with open(os.path.join(workdir, "eval.json"), encoding="utf-8") as f:
                results[run.name] = {"run": record, "eval": json.load(f)}
        except FileNotFoundError:
            continue
    return results


def _commit():
    """Return the git commit of the source tree, or "unknown" outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return result.stdout.strip()


def main(argv):
    quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    from rf_jax.eval import results_table

    runs = suite(values.seeds)
    if values.only:
        runs = [run for run in runs if any(part in run.name for part in values.only)]
    data_dir = data_build.default_data_dir()
    for dataset in sorted({run.dataset for run in runs}):
        data_build.build_dataset(dataset, data_dir, 32, 1024)
    start = time.perf_counter()
    for index, run in enumerate(runs, 1):
        logging.info("Run %d of %d: %s.", index, len(runs), run.name)
        train_and_evaluate_run(run, values.root, values.steps, values.images_per_prompt)
        elapsed = time.perf_counter() - start
        logging.info(
            "Finished %d of %d runs in %.1f min; about %.1f min left.",
            index,
            len(runs),
            elapsed / 60,
            elapsed / index * (len(runs) - index) / 60,
        )
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"rf_jax commit {_commit()}"
    )
    results = load_results(values.root, suite(values.seeds))
    results_table.write(values.out, results, values.steps, values.seeds, machine)
    logging.info("Wrote %s.", values.out)


if __name__ == "__main__":
    flags.DEFINE_string("root", "workdirs/ablations", "Directory of the runs' workdirs.")
    flags.DEFINE_string("out", "docs/results.md", "Markdown file for the tables.")
    flags.DEFINE_integer("steps", DEFAULT_STEPS, "Training steps of every run.")
    flags.DEFINE_integer("seeds", 3, "Seeds of the pixel and pixel_rf runs on shapes.")
    flags.DEFINE_integer("images_per_prompt", 8, "Images per GenEval prompt.")
    flags.DEFINE_multi_string("only", [], "Run only the runs whose name contains this.")
    app.run(main)
