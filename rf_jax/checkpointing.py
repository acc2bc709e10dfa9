"""Orbax checkpoints of the train state together with the Grain iterator state.

Saves are asynchronous and atomic: Orbax writes each step into a temporary
directory (`<step>.orbax-checkpoint-tmp` on a local or network file system)
and renames it when complete. A run killed during a save therefore leaves
the previous checkpoint as the latest one, which `latest_step()` and
`restore` use, because Orbax ignores uncommitted directories. The training
manager (`remove_uncommitted=True`) logs and deletes such leftovers when it
starts. The last `keep` steps are kept. Restores go straight into the
target shardings.
"""

import os

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

from rf_jax import layer_stack

STATE = "state"
DATA = "data"


def _absolute(path):
    """Return `path` made absolute, or unchanged for a bucket path (gs://...)."""
    path = str(path)
    return path if "://" in path else os.path.abspath(path)


def checkpoint_dir(workdir):
    return os.path.join(_absolute(workdir), "checkpoints")


def create_manager(workdir, keep=3, save_every=None, asynchronous=True, remove_uncommitted=False):
    """Create a CheckpointManager over `workdir/checkpoints` for the train state and data state.

    With `remove_uncommitted`, directories of saves that never completed (a run
    killed while saving) are logged and deleted. Only the training run may set
    it, because a reader would delete the save in progress of a run that is
    still training.
    """
    directory = checkpoint_dir(workdir)
    if remove_uncommitted:
        _log_uncommitted(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=save_every or 1,
        create=True,
        enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=remove_uncommitted,
    )
    # Registering the handlers up front lets a fresh manager read metadata before a restore.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE, ocp.args.StandardSave)
    registry.add(STATE, ocp.args.StandardRestore)
    registry.add(DATA, grain.checkpoint.CheckpointSave)
    registry.add(DATA, grain.checkpoint.CheckpointRestore)
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


def _log_uncommitted(directory):
    """Log the uncommitted save directories under `directory` that the manager will delete."""
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    leftovers = sorted(ocp.path.step.tmp_checkpoints(directory))
    if leftovers:
        logging.warning(
            "Deleting %d uncommitted checkpoint directories under %s that an interrupted "
            "save left: %s. Restores use committed steps only.",
            len(leftovers),
            directory,
            leftovers,
        )


def save(manager, step, state, data_iterator=None, force=False):
    """Start saving `state` (and the iterator state) at `step`; returns whether a save started."""
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager, abstract_state, data_iterator=None, step=None):
    """Restore the latest (or given) step into `abstract_state`'s shapes and shardings.

    Returns (step, state), or (None, None) when the directory contains no checkpoint.
    Raises ValueError listing the mismatched arrays when the checkpoint does not
    fit the configured model.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None, None
    mismatches = describe_mismatch(manager, step, abstract_state)
    if mismatches:
        raise ValueError(
            f"Checkpoint step {step} under {manager.directory} does not fit this config: "
            f"{mismatches}. Use the config the run was trained with, or a new --workdir."
        )
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f"Checkpoint step {step} under {manager.directory} could not be restored into this "
            f"config ({error}). Use the config the run was trained with, or a new --workdir."
        ) from error
    logging.info("Restored checkpoint step %d from %s.", step, manager.directory)
    return step, restored[STATE]


def describe_mismatch(manager, step, abstract_state, only_wanted=False):
    """List the arrays whose shapes differ between a checkpoint and the target state.

    With `only_wanted`, arrays of the checkpoint outside `abstract_state` are ignored.
    """
    try:
        metadata = manager.item_metadata(step)[STATE]
    except Exception as error:  # Metadata is best effort; the caller still raises.  # noqa: BLE001
        logging.warning("Could not read checkpoint metadata: %s", error)
        return ""
    saved = {
        jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(metadata)[0]
        if hasattr(leaf, "shape")
    }
    wanted = {
        jax.tree_util.keystr(path, simple=True, separator="/"): _stored_shape(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    }
    lines = _layout_hint(saved, wanted)
    names = set(wanted) if only_wanted else set(saved) | set(wanted)
    for name in sorted(names):
        if saved.get(name) != wanted.get(name):
            lines.append(
                f"{name}: checkpoint {saved.get(name, 'missing')}, "
                f"config {wanted.get(name, 'missing')}"
            )
    return "; ".join(lines[:20]) + (f"; and {len(lines) - 20} more" if len(lines) > 20 else "")


def _layout_hint(saved, wanted):
    """Return a line naming the `model.scan_layers` difference of checkpoint and config."""

    def stacked(names):
        return any(f"/{layer_stack.STACKED_NAME}/" in name for name in names)

    def per_layer(names):
        return any("/layers_0/" in name for name in names)

    if per_layer(saved) and stacked(wanted) and not stacked(saved):
        layouts = "one entry per layer (layers_0, ...)", "stacks them (model.scan_layers=true)"
        fix = "set model.scan_layers=false"
    elif stacked(saved) and per_layer(wanted) and not per_layer(saved):
        layouts = "stacked layers (model.scan_layers=true)", "has one entry per layer"
        fix = "set model.scan_layers=true"
    else:
        return []
    return [
        f"the checkpoint has {layouts[0]} but the config {layouts[1]}; {fix}, or convert the "
        "checkpoint's trees with rf_jax.layer_stack.stack_layers or unstack_layers"
    ]


def _stored_shape(leaf):
    """Shape of an array as Orbax stores it (a PRNG key array as its raw key data)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(leaf.shape)


def restore_parts(workdir, abstract_parts, step=None):
    """Restore some top-level entries of another run's train state, e.g. a previous stage's.

    Args:
        workdir: the --workdir of the earlier run (or its `checkpoints/` directory).
        abstract_parts: {name: abstract subtree} with shapes, dtypes and shardings,
            for names of `TrainState` fields such as `params` or `codebook`.
        step: the step to read; the latest one if None.

    Returns:
        (step, {name: restored subtree}).

    Raises:
        FileNotFoundError: the directory contains no checkpoint.
        ValueError: the checkpoint's arrays do not fit `abstract_parts` (listed).
    """
    directory = _absolute(workdir)
    if os.path.basename(directory.rstrip("/")) != "checkpoints":
        directory = checkpoint_dir(directory)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE, ocp.args.PyTreeRestore)
    options = ocp.CheckpointManagerOptions(read_only=True)
    manager = ocp.CheckpointManager(directory, options=options, handler_registry=registry)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"No checkpoint under {directory}: train the earlier stage first, or fix "
                "train.init_from."
            )
        mismatches = describe_mismatch(manager, step, abstract_parts, only_wanted=True)
        if mismatches:
            raise ValueError(
                f"Checkpoint step {step} under {directory} does not fit this config: "
                f"{mismatches}. The stages must share the model shape, vocabulary and "
                "codebook size."
            )
        restore_args = jax.tree.map(
            lambda leaf: ocp.ArrayRestoreArgs(
                sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype
            ),
            abstract_parts,
        )
        args = ocp.args.PyTreeRestore(
            item=abstract_parts, restore_args=restore_args, partial_restore=True
        )
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE: args}))
    finally:
        manager.close()
    logging.info("Restored %s of step %d from %s.", sorted(abstract_parts), step, directory)
    return step, restored[STATE]
