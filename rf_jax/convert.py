"""Check pretrained Qwen2 / DINOv3 checkpoints against a config and print what converts.

    python -m rf_jax.convert --config experiments/stage1_pretrained.py \
        --llm /path/to/Qwen2.5-0.5B --encoder /path/to/dinov3-vits16

The conversion runs as `rf_jax.train` runs it at fresh initialisation (same
tokenizer, shapes and shardings), into a zero state instead of a trained-from-
scratch one, so it needs no model compilation. It prints the tokenizer's
special tokens, the tensors and parameters converted, the LM head tying and
any vocabulary resize. Training with `--config.init.llm_path` and
`--config.init.encoder_path` set loads the same weights.
"""

import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from rf_jax import configs
from rf_jax import partitioning
from rf_jax import pretrained
from rf_jax import trainer as trainer_lib
from rf_jax.logs import quiet_library_logs


def convert(config, llm_path=None, encoder_path=None):
    """Convert the checkpoints into a zero state of `config`; return (report lines, state)."""
    lines = []
    if llm_path:
        tokenizer = pretrained.load_tokenizer(llm_path)
        model_config = configs.model_config_for_tokenizer(config, tokenizer)
        added = ", ".join(tokenizer.added_tokens) or "none"
        lines.append(
            f"Tokenizer {llm_path}: {tokenizer.vocab_size} ids; pad {tokenizer.pad_token!r} = "
            f"{tokenizer.pad_id}, bos {tokenizer.bos_token!r} = {tokenizer.bos_id}, eos "
            f"{tokenizer.eos_token!r} = {tokenizer.eos_id}; added special tokens: {added}."
        )
    else:
        model_config = configs.model_config(config, config.data.vocab_size)
    mesh = partitioning.create_mesh(config.mesh)
    trainer = trainer_lib.Trainer(config, model_config, mesh, config.train.steps)
    abstract_state, _ = trainer.abstract_state()
    state = pretrained.zeros_state(abstract_state)
    state, report = pretrained.load_pretrained(state, model_config, llm_path, encoder_path)
    return lines + report.lines, state


def _define_flags():
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("llm", None, "Qwen2 / Qwen2.5 checkpoint directory (config.init.llm_path).")
    flags.DEFINE_string(
        "encoder", None, "DINOv3 ViT checkpoint directory (config.init.encoder_path)."
    )


def main(argv):
    quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    if values.config is None:
        raise app.UsageError("--config is required.")
    llm = values.llm or values.config.init.llm_path
    encoder = values.encoder or values.config.init.encoder_path
    if not (llm or encoder):
        raise app.UsageError("Pass --llm, --encoder or both (or set them in config.init).")
    try:
        lines, _ = convert(values.config, llm or None, encoder or None)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"Conversion failed: {error}")
    print(
        f"Devices: {len(jax.devices())}, mesh {dict(partitioning.create_mesh(values.config.mesh).shape)}."
    )
    print("\n".join(lines))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
