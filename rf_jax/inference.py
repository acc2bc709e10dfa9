"""Inference helpers around the jitted samplers: prompts, grids, captions, trained runs."""

import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from rf_jax import checkpointing
from rf_jax import configs
from rf_jax import images as images_lib
from rf_jax import partitioning
from rf_jax import sampler as sampler_lib
from rf_jax import trainer as trainer_lib
from rf_jax.data import pipeline
from rf_jax.data import tokenizer as tokenizer_lib


def encode_prompts(tokenizer, prompts, text_len):
    """Tokenize prompts into left-padded `[PAD.., BOS, tokens]`, int32 [n, text_len].

    A prompt longer than text_len - 1 tokens keeps its first text_len - 1
    tokens, as in training, and a warning names it. An empty string is the
    unconditional prompt.

    Raises:
        ValueError: the prompt list is empty or a prompt is not a string.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("The prompt list is empty; pass at least one prompt.")
    rows = np.full((len(prompts), text_len), tokenizer.pad_id, np.int32)
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"Prompt {index} is {prompt!r}, not a string.")
        tokens = tokenizer.encode(prompt)
        if len(tokens) > text_len - 1:
            logging.warning(
                "Prompt %d (%r) has %d tokens; keeping the first %d (text_len=%d).",
                index,
                prompt if len(prompt) <= 60 else prompt[:57] + "...",
                len(tokens),
                text_len - 1,
                text_len,
            )
            tokens = tokens[: text_len - 1]
        ids = [tokenizer.bos_id] + tokens
        rows[index, text_len - len(ids) :] = ids
    return rows


class Generator:
    """Text-to-image sampling with the run's sampler settings."""

    def __init__(self, config, model_config, tokenizer, **sampler_overrides):
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.sample_fn = sampler_lib.make_text_to_image(
            model_config, configs.sampler_config(config, **sampler_overrides)
        )

    def generate(self, params, prompts, seed=0):
        """Return uint8 images [len(prompts), H, W, 3] for a list of prompts."""
        prompt_ids = encode_prompts(self.tokenizer, prompts, self.model_config.text_len)
        out = self.sample_fn(params, jnp.asarray(prompt_ids), jax.random.key(seed))
        return np.asarray(out["images"])

    def write_grid(self, params, path, writer=None, step=0):
        """Sample the config's fixed prompts and write them as one PNG grid (and to TensorBoard)."""
        images = self.generate(params, list(self.config.sample.prompts), self.config.sample.seed)
        grid = images_lib.make_grid(images, columns=min(len(images), 8))
        images_lib.save_png(grid, path, scale=4)
        if writer is not None:
            writer.write_images(step, {"samples": grid[None]})
        logging.info("Wrote samples of %s to %s.", list(self.config.sample.prompts), path)
        return images


def caption_images(model_config, tokenizer, params, images, question="", max_tokens=12):
    """Answer `question` ("" for a caption) about uint8 images [n, H, W, 3]; returns strings."""
    prompt = encode_prompts(
        tokenizer, [question] * len(images), len(tokenizer.encode(question)) + 1
    )
    answer = sampler_lib.make_image_to_text(model_config, max_tokens)
    tokens = np.asarray(answer(params, jnp.asarray(images), jnp.asarray(prompt), jax.random.key(0)))
    return [tokenizer.decode(row.tolist()) for row in tokens]


def write_captions(config, model_config, tokenizer, params, path):
    """Caption held-out test images and write `reference<TAB>generated` lines."""
    examples = pipeline.make_eval_examples(
        config.data, tokenizer, split="test", count=config.train.num_caption_images
    )
    captions = caption_images(
        model_config,
        tokenizer,
        params,
        examples["image"],
        max_tokens=config.train.caption_max_tokens,
    )
    lines = ["reference\tgenerated"] + [
        f"{reference}\t{generated}" for reference, generated in zip(examples["caption"], captions)
    ]
    epath.Path(path).write_text("\n".join(lines) + "\n")
    exact = np.mean([r == g for r, g in zip(examples["caption"], captions)])
    logging.info("Wrote %d captions to %s (exact match %.3f).", len(captions), path, exact)
    return captions


def load_run(workdir, step=None):
    """Load a trained run: (config, model_config, tokenizer, params) of the latest checkpoint.

    Raises:
        FileNotFoundError: the workdir has no config, tokenizer or checkpoint.
    """
    config_path = os.path.join(workdir, "config.json")
    tokenizer_path = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(os.path.join(workdir, "tokenizer.json")):
        tokenizer_path = workdir  # A pretrained tokenizer, saved by `rf_jax.pretrained`.
    for path in (config_path, tokenizer_path):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found; is {workdir} the --workdir of a run of rf_jax.train?"
            )
    with open(config_path, encoding="utf-8") as f:
        config = ml_collections.ConfigDict(json.load(f))
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
    model_config = configs.model_config_for_tokenizer(config, tokenizer)
    with config.unlocked():
        config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    mesh = partitioning.create_mesh(config.mesh)
    trainer = trainer_lib.Trainer(config, model_config, mesh, config.train.steps)
    abstract_state, _ = trainer.abstract_state()
    manager = checkpointing.create_manager(workdir, asynchronous=False)
    found, state = checkpointing.restore(manager, abstract_state, step=step)
    manager.close()
    if state is None:
        raise FileNotFoundError(
            f"No checkpoint under {checkpointing.checkpoint_dir(workdir)}; train first."
        )
    logging.info("Loaded step %d of %s.", found, workdir)
    return config, model_config, tokenizer, state.params
