"""A conversion plan: which checkpoint tensors become which rf_jax parameters, and how.

A plan is checked against the checkpoint's file headers before any tensor is
read, so one error lists every missing, unexpected and mis-shaped tensor.
"""

import dataclasses
from typing import Callable

import numpy as np

# A parameter's path in the params tree, e.g. ("backbone", "layers_0", "attn", "q_proj", "kernel").
ParamPath = tuple[str, ...]
# Computes one parameter from the source tensors (in the order of `Assignment.sources`).
Transform = Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Parameters computed from a few checkpoint tensors, read once.

    Attributes:
        sources: checkpoint tensor names (none for a parameter set to a constant).
        source_shapes: the shape each source must have.
        targets: (parameter path, transform) pairs; each transform takes the
            source arrays and returns the parameter's value.
    """

    sources: tuple[str, ...]
    source_shapes: tuple[tuple[int, ...], ...]
    targets: tuple[tuple[ParamPath, Transform], ...]


@dataclasses.dataclass
class Plan:
    """All assignments of one checkpoint, with the tensors it may leave unread.

    Attributes:
        name: what the checkpoint is, for messages ("Qwen2 checkpoint /path").
        assignments: the parameters to write.
        ignored: checkpoint tensors that have no rf_jax counterpart, and why.
        notes: lines for the conversion report (head tying, vocabulary resize).
    """

    name: str
    assignments: list[Assignment]
    ignored: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


def check_plan(plan, checkpoint):
    """Raise ValueError listing the missing, unexpected and mis-shaped tensors of `checkpoint`."""
    available = set(checkpoint.keys())
    used = {name for assignment in plan.assignments for name in assignment.sources}
    missing = sorted(used - available)
    unexpected = sorted(available - used - set(plan.ignored))
    misshaped = []
    for assignment in plan.assignments:
        for name, shape in zip(assignment.sources, assignment.source_shapes):
            if name in available and tuple(checkpoint.shape(name)) != tuple(shape):
                misshaped.append(f"{name}: checkpoint {checkpoint.shape(name)}, expected {shape}")
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected)):
        if items:
            problems.append(f"{len(items)} {label} tensors: {_shorten(items)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped tensors: {_shorten(misshaped)}")
    if problems:
        raise ValueError(
            f"{plan.name} does not match the rf_jax model: " + "; ".join(problems) + ". Check "
            "that the directory holds the intended checkpoint and that config.model matches "
            "its config.json."
        )


def _shorten(items, limit=12):
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def transpose(weight):
    """Transpose a PyTorch linear weight [out, in] into an rf_jax kernel [in, out]."""
    return np.ascontiguousarray(weight.T)


def pad_rows(matrix, rows):
    """Return `matrix` [n, dim] with rows appended up to `rows`, each the mean of the originals.

    New vocabulary entries start at the mean embedding, so their logits start
    near the average token's instead of at an arbitrary scale.
    """
    missing = rows - matrix.shape[0]
    if missing < 0:
        raise ValueError(
            f"The checkpoint has {matrix.shape[0]} rows, more than the {rows} requested; "
            "rows are only ever added."
        )
    if not missing:
        return matrix
    mean = matrix.astype(np.float32).mean(axis=0, keepdims=True).astype(matrix.dtype)
    return np.concatenate([matrix, np.repeat(mean, missing, axis=0)], axis=0)
