"""Device mesh, logical-axis rules and the shardings derived from them.

Every parameter and activation dimension has a logical name; `LOGICAL_RULES`
maps the names to the mesh axes `data`, `fsdp` and `tensor`. Changing the
mesh shape in the config moves a run between data, FSDP and tensor
parallelism without touching the model.
"""

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES = (
    # Activations.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_enc_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # Backbone parameters.
    ("embed", "fsdp"),
    ("embed_out", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("codebook", "tensor"),
    ("pixel", None),
    ("bottleneck", None),
    ("time", None),
    # Leading axis of parameters stacked over layers (scan over layers): never split.
    ("layers", None),
    # Encoder parameters.
    ("enc_embed", "fsdp"),
    ("enc_heads", "tensor"),
    ("enc_mlp", "tensor"),
    ("enc_patch", None),
)


def create_mesh(mesh_config, devices=None):
    """Build a mesh with axes (data, fsdp, tensor); one size may be -1 for "the rest"."""
    devices = jax.devices() if devices is None else devices
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"Mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices: "
                f"the sizes other than -1 multiply to {known}. Choose sizes whose product "
                f"divides {len(devices)}."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but "
            f"{len(devices)} are available; set mesh sizes whose product is the device count, "
            "or -1 for one axis."
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_shardings(abstract_tree, mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree whose leaves may be `nn.Partitioned` (unnamed -> replicated).

    A dimension whose size the mapped mesh axes do not divide (an odd vocabulary,
    say) is replicated instead, and a warning names it.
    """
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_tree))[0]
    flat_shardings, treedef = jax.tree.flatten(shardings)
    fitted = [
        _fit_sharding(sharding, leaf.shape, jax.tree_util.keystr(path))
        for (path, leaf), sharding in zip(leaves, flat_shardings)
    ]
    return jax.tree.unflatten(treedef, fitted)


def _fit_sharding(sharding, shape, name):
    spec = _fit_spec(sharding.spec, shape, sharding.mesh, name)
    return NamedSharding(sharding.mesh, spec)


def _fit_spec(spec, shape, mesh, name=None):
    """Replace the mesh axes of each dimension they do not divide by None (replicated)."""
    spec = list(spec) + [None] * (len(shape) - len(spec))
    for dim, axes in enumerate(spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        ways = int(np.prod([mesh.shape[axis] for axis in names]))
        if shape[dim] % ways:
            if name is not None:
                logging.warning(
                    "Replicating dimension %d of %s (size %d): mesh axes %s split it %d ways.",
                    dim,
                    name,
                    shape[dim],
                    names,
                    ways,
                )
            spec[dim] = None
    return PartitionSpec(*spec)


def gather_for_compute(param, names):
    """Constrain a parameter to the layout its layer computes with: no split over the batch axes.

    Under FSDP a parameter is split over `fsdp` at rest and all-gathered where it
    is used. The constraint makes that all-gather explicit, and in the backward
    pass its transpose reduce-scatters the gradient. Dimensions mapped to other
    axes (tensor parallelism) stay split. Without active rules and a mesh it
    returns `param` unchanged.

    NOTE: the explicit gather also works around an XLA SPMD partitioner bug seen
    with jaxlib 0.10.2, under both Shardy and GSPMD propagation. For a dot whose
    lhs batch dimension is split over (data, fsdp), whose contracting dimension
    is split over tensor and whose rhs is split over fsdp on its other dimension,
    the partitioner swaps lhs batch shards between devices and never swaps the
    result back. It shows only when all three mesh axes are above 1, e.g.
    (2, 2, 2), where it corrupted the input gradients of the first layer and of
    the embeddings while the loss stayed right. `tests/scripts/xla_dot_repro.py`
    reproduces it without rf_jax.

    Args:
        param: the parameter array, e.g. a kernel [in, out].
        names: its logical axis names, one per dimension.
    """
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return param
    spec = [_without_batch_axes(axes) for axes in nn.logical_to_mesh_axes(names, rules)]
    spec = _fit_spec(spec, param.shape, mesh)
    return jax.lax.with_sharding_constraint(param, spec)


def _without_batch_axes(axes):
    if axes is None:
        return None
    kept = tuple(
        axis for axis in ((axes,) if isinstance(axes, str) else axes) if axis not in BATCH_AXES
    )
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else kept


def spec_table(shardings):
    """Return {path: spec} for a tree of NamedShardings, paths joined with "/".

    Each spec is a list with one entry per dimension: None (replicated), a mesh
    axis name, or a list of axis names (a dimension split over several axes).
    """
    table = {}
    for path, sharding in jax.tree_util.tree_flatten_with_path(shardings)[0]:
        spec = [list(axes) if isinstance(axes, tuple) else axes for axes in sharding.spec]
        table[jax.tree_util.keystr(path, simple=True, separator="/")] = spec
    return table


def batch_sharding(mesh):
    """Sharding of a batch: leading dimension over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch, mesh):
    """Assemble this process's numpy batch into global jax.Arrays sharded over the batch axes.

    Raises:
        ValueError: a batch dimension is not a multiple of the data-parallel device count.
    """
    sharding = batch_sharding(mesh)
    ways = int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))
    for name, array in local_batch.items():
        rows = array.shape[0] * jax.process_count()
        if rows % ways:
            raise ValueError(
                f"Batch field {name!r} has {rows} rows, not a multiple of the {ways} data-parallel "
                "devices (mesh data x fsdp). Choose data.batch_size and data.mixture so that the "
                "generation and understanding rows each divide evenly."
            )
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
