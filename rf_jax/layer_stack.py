"""Remat policies, scan over layers, and conversion between the two parameter layouts.

A transformer block class is wrapped by `repeat_block`:

- `remat` picks what the backward pass keeps from the forward pass of each
  block (`REMAT_POLICIES`); the rest is recomputed.
- `scan_layers=True` runs the blocks with `nn.scan`: the parameters of all
  layers are stacked under one `layers` entry with a leading [depth] axis (the
  `layers` logical axis), and the block is traced and compiled once.

Unscanned models keep one entry per layer (`layers_0`, `layers_1`, ...), the
layout checkpoints and converters use. `stack_layers` and `unstack_layers`
convert parameter trees (and optimiser states, whose moments mirror the
parameters) between the two layouts.
"""

from collections.abc import Mapping
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

# Names of the block outputs that the "save_attn_mlp" policy keeps (`checkpoint_name` tags).
ATTENTION_OUT = "attention_out"
MLP_OUT = "mlp_out"

REMAT_POLICIES = ("none", "full", "save_dots", "save_attn_mlp")

# Logical axis of the stacked layer dimension; the rules map it to no mesh axis.
LAYERS_AXIS = "layers"
STACKED_NAME = "layers"
_LAYER_NAME = re.compile(r"^layers_(\d+)$")


def check_remat(policy):
    """Raise ValueError unless `policy` is one of `REMAT_POLICIES`."""
    if policy not in REMAT_POLICIES:
        raise ValueError(
            f"model.remat={policy!r} is not a remat policy; use one of {REMAT_POLICIES}: "
            "none keeps every activation, full recomputes each block in the backward pass, "
            "save_dots keeps the matrix-multiply outputs, save_attn_mlp keeps the attention "
            "and feed-forward outputs of each block."
        )


def remat_policy(policy):
    """Return the `jax.checkpoint` policy of a `REMAT_POLICIES` name (None for full)."""
    check_remat(policy)
    if policy == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if policy == "save_attn_mlp":
        return jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, MLP_OUT)
    return None


def repeat_block(block_class, *, remat, scan_layers, depth, in_axes):
    """Wrap a block class for `depth` layers: with remat, and with `nn.scan` if requested.

    Args:
        block_class: a Linen module class called as `block(carry, *args)` that
            returns `(carry, output)`; with scan, the outputs are stacked along a
            new leading [depth] axis.
        remat: one of `REMAT_POLICIES`.
        scan_layers: run the layers with `nn.scan`, parameters stacked.
        depth: number of layers (the scan length).
        in_axes: for scan, the `nn.scan` in_axes of `args`: 0 to slice an
            argument per layer, `nn.broadcast` to pass it whole to every layer.

    Returns:
        The wrapped class. Unscanned, the caller instantiates it once per layer
        (`name=f"layers_{i}"`); scanned, once (`name="layers"`).
    """
    check_remat(remat)
    if remat != "none":
        # Scan already keeps the layers apart, so CSE across them is no risk there.
        block_class = nn.remat(block_class, policy=remat_policy(remat), prevent_cse=not scan_layers)
    if scan_layers:
        block_class = nn.scan(
            block_class,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=in_axes,
            length=depth,
            metadata_params={nn.PARTITION_NAME: LAYERS_AXIS},
        )
    return block_class


def stack_layers(tree):
    """Convert per-layer entries `layers_0 .. layers_{n-1}` into one stacked `layers` entry.

    Every mapping in `tree` (nested dicts of arrays, or an optimiser state
    holding such dicts) that has `layers_{i}` keys gets them replaced by
    `layers`, whose leaves are the per-layer leaves stacked along a new axis 0.

    Raises:
        ValueError: the layer indices are not 0 .. n-1, or the layers differ in structure.
    """
    return _map_mappings(tree, _stack_mapping)


def unstack_layers(tree):
    """Invert `stack_layers`: split every `layers` entry along axis 0 into `layers_{i}`."""
    return _map_mappings(tree, _unstack_mapping)


def _map_mappings(node, convert):
    """Apply `convert` to every mapping in `node`, bottom up, keeping containers' types."""
    if isinstance(node, Mapping):
        return convert({key: _map_mappings(value, convert) for key, value in node.items()})
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*(_map_mappings(value, convert) for value in node))
    if isinstance(node, (list, tuple)):
        return type(node)(_map_mappings(value, convert) for value in node)
    return node


def _stack_mapping(mapping):
    indices = sorted(int(m.group(1)) for m in map(_LAYER_NAME.match, mapping) if m)
    if not indices:
        return mapping
    if indices != list(range(len(indices))):
        raise ValueError(
            f"Layer entries must be layers_0 .. layers_{{n-1}}, got indices {indices}."
        )
    if STACKED_NAME in mapping:
        raise ValueError("The tree has both per-layer entries and a stacked 'layers' entry.")
    layers = [mapping[f"layers_{index}"] for index in indices]
    structure = jax.tree.structure(layers[0])
    for index, layer in enumerate(layers):
        if jax.tree.structure(layer) != structure:
            raise ValueError(
                f"layers_{index} has structure {jax.tree.structure(layer)}, but layers_0 has "
                f"{structure}; only identical layers can be stacked."
            )
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)
    rest = {key: value for key, value in mapping.items() if not _LAYER_NAME.match(key)}
    return {**rest, STACKED_NAME: stacked}


def _unstack_mapping(mapping):
    if STACKED_NAME not in mapping:
        return mapping
    stacked = mapping[STACKED_NAME]
    depths = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
    if len(depths) != 1:
        raise ValueError(f"Stacked layer leaves disagree on the depth: {sorted(depths)}.")
    depth = depths.pop()
    rest = {key: value for key, value in mapping.items() if key != STACKED_NAME}
    for index in range(depth):
        rest[f"layers_{index}"] = jax.tree.map(lambda leaf, i=index: leaf[i], stacked)
    return rest
