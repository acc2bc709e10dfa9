"""Write pretrained checkpoints into a sharded train state, one tensor at a time.

Each checkpoint tensor is read from its safetensors file into host memory,
transformed (transposed, reshaped, resized), and copied straight onto the
sharding of the parameter it replaces with `jax.make_array_from_callback`, so
each device receives only its own shard. Host memory keeps one tensor and its
transform at a time, never a whole model. Each replaced array is deleted at
once, so device memory needs room for only one extra parameter.
"""

import dataclasses
import functools
import re

from absl import logging
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from rf_jax import layer_stack
from rf_jax.data import hf_tokenizer
from rf_jax.pretrained import dinov3, qwen2
from rf_jax.pretrained.plan import check_plan
from rf_jax.pretrained.safetensors_reader import SafetensorsCheckpoint, read_config


@dataclasses.dataclass
class ConversionReport:
    """Summary lines and parameter counts of a conversion, for logs and `rf_jax.convert`."""

    lines: list[str] = dataclasses.field(default_factory=list)
    converted: dict[str, int] = dataclasses.field(default_factory=dict)  # Plan name -> parameters.

    def log(self):
        for line in self.lines:
            logging.info("%s", line)


def load_tokenizer(llm_path):
    """Load the checkpoint's tokenizer with the special tokens rf_jax needs.

    Its `vocab_size` covers both the checkpoint's embedding rows and every
    token id, added tokens included, so it sizes the model's vocabulary.
    """
    rows = read_config(llm_path).get("vocab_size", 0)
    return hf_tokenizer.HFTokenizer.from_pretrained(llm_path, min_vocab_size=rows)


def place(value, like):
    """Copy host array `value` onto the shape, dtype and sharding of the jax.Array `like`."""
    value = np.asarray(value, dtype=like.dtype)
    if value.shape != like.shape:
        raise ValueError(
            f"Converted value has shape {value.shape}, but the parameter has shape {like.shape}."
        )
    return jax.make_array_from_callback(like.shape, like.sharding, lambda index: value[index])


def write(flat, path, value):
    """Replace the leaf at `path` of the flat tree `flat` with host array `value`.

    Plans name per-layer paths (`layers_3`). In a scanned model (`scan_layers`)
    the layers are one stacked `layers` entry; then `value` goes into row 3 of
    the stacked leaf, on that leaf's sharding.
    """
    if path in flat:
        old = flat[path]
        flat[path] = place(value, old)
        old.delete()
        return
    for position, key in enumerate(path):
        match = re.fullmatch(r"layers_(\d+)", key)
        stacked_path = path[:position] + (layer_stack.STACKED_NAME,) + path[position + 1 :]
        if match and stacked_path in flat:
            old = flat[stacked_path]
            row = np.asarray(value, dtype=old.dtype)
            if row.shape != old.shape[1:]:
                raise ValueError(
                    f"Converted value for {'/'.join(path)} has shape {row.shape}, but the "
                    f"stacked parameter has rows of shape {old.shape[1:]}."
                )
            flat[stacked_path] = _set_row(old, row, int(match.group(1)))
            return
    raise KeyError(f"The model has no parameter {'/'.join(path)}.")


@functools.partial(jax.jit, donate_argnums=0)
def _set_row(stacked, row, index):
    return stacked.at[index].set(row)


def apply_plan(plan, checkpoint, trees):
    """Read each tensor of `plan` once and write its parameters into the flat trees.

    Args:
        plan: the `Plan` of `checkpoint`, already checked.
        checkpoint: a `SafetensorsCheckpoint`.
        trees: {name: flat dict path -> jax.Array}; "params" receives every
            target, and "ema_encoder" also receives the targets under "encoder".

    Returns:
        The number of parameters written into "params".
    """
    count = 0
    for assignment in plan.assignments:
        arrays = [checkpoint.read(name) for name in assignment.sources]
        values = {}  # One value per transform: the experts share theirs.
        for path, transform in assignment.targets:
            if transform not in values:
                values[transform] = transform(*arrays)
            value = values[transform]
            destinations = [("params", path)]
            if path[0] == "encoder" and "ema_encoder" in trees:
                destinations.append(("ema_encoder", path[1:]))
            for tree_name, leaf_path in destinations:
                write(trees[tree_name], leaf_path, value)
            count += int(np.prod(value.shape))
        del arrays, values
    return count


def load_pretrained(state, model_config, llm_path=None, encoder_path=None):
    """Replace the backbone and encoder parameters of a train state with pretrained ones.

    Args:
        state: a `TrainState` from `Trainer.init_state`; the arrays it replaces
            are deleted, so use only the returned state afterwards.
        model_config: the `ModelConfig` of the state.
        llm_path: a Qwen2 / Qwen2.5 checkpoint directory, or None.
        encoder_path: a DINOv3 ViT checkpoint directory, or None.

    Returns:
        (new state, `ConversionReport`). The EMA encoder equals the loaded encoder.

    Raises:
        ValueError: the checkpoint does not fit the config (the message lists
            the fields or tensors and the fix).
        FileNotFoundError: a directory, config.json or safetensors file is missing.
    """
    sources = []
    if llm_path:
        checkpoint = SafetensorsCheckpoint(llm_path)
        sources.append((checkpoint, qwen2.make_plan(checkpoint, model_config)))
    if encoder_path:
        checkpoint = SafetensorsCheckpoint(encoder_path)
        sources.append((checkpoint, dinov3.make_plan(checkpoint, model_config.encoder)))
    for checkpoint, plan in sources:
        check_plan(plan, checkpoint)

    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    trees = {
        "params": flax.traverse_util.flatten_dict(state.params),
        "ema_encoder": flax.traverse_util.flatten_dict(state.ema_encoder),
    }
    report = ConversionReport()
    for checkpoint, plan in sources:
        count = apply_plan(plan, checkpoint, trees)
        checkpoint.close()
        report.converted[plan.name] = count
        report.lines.append(
            f"{plan.name}: {len(checkpoint.keys())} tensors -> {count:,} parameters "
            f"({count / 1e6:.2f}M)."
        )
        report.lines += [f"  {note}" for note in plan.notes]
        report.lines += [f"  Ignored {name}: {why}." for name, why in plan.ignored.items()]
    report.lines.append(
        f"Converted {sum(report.converted.values()):,} of {total:,} model parameters; the "
        "rest (rep and pixel heads, embeddings, connector) keep their fresh initialisation."
    )
    new_state = state.replace(
        params=flax.traverse_util.unflatten_dict(trees["params"]),
        ema_encoder=flax.traverse_util.unflatten_dict(trees["ema_encoder"]),
    )
    return new_state, report


def zeros_state(abstract_state):
    """Return a state of zeros with the shapes, dtypes and shardings of `abstract_state`.

    It costs no model compilation, so `rf_jax.convert` and the tests use it to
    check a conversion; training starts from `Trainer.init_state` instead.
    PRNG keys become `jax.random.key(0)`.
    """

    def make(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(0), leaf.sharding)
        return jnp.zeros(leaf.shape, leaf.dtype, device=leaf.sharding)

    return jax.tree.map(make, abstract_state)


def load_for_training(config, model_config, state):
    """Apply `config.init.llm_path` and `config.init.encoder_path` to a freshly initialised state.

    Returns the state unchanged when neither path is set.
    """
    init = config.get("init")
    if init is None or not (init.llm_path or init.encoder_path):
        return state
    state, report = load_pretrained(
        state, model_config, init.llm_path or None, init.encoder_path or None
    )
    report.log()
    return state
