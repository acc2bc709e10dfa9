"""Online VQ codebook that turns encoder features into discrete representation tokens.

The codebook contains `num_codes` unit-norm prototypes. A feature vector's token id is
the index of its nearest prototype by cosine similarity, at training and at inference.
Once per train step, `update_codebook` balances the batch over the prototypes with
Sinkhorn-Knopp (as in SwAV) and moves each prototype toward the mean direction of the
features assigned to it.

Data parallelism: every function here is plain `jnp` code over the global batch. Under
`jax.jit` with the features sharded along the batch axis (for example
`NamedSharding(mesh, P('data', None))`), XLA turns each sum or max over the batch into
an all-reduce over the devices that hold the batch. So the Sinkhorn row sums, the
per-prototype feature sums and the usage counts are global, and no `shard_map` or
explicit `psum` is needed. `tests/test_codebook.py` checks that the result on 8 devices
equals the single-device result.
"""

import operator

import flax.struct
import jax
import jax.numpy as jnp

# Squared norms below this count as zero, so normalising a zero vector returns zeros.
_TINY_SQUARED_NORM = 1e-24


class CodebookState(flax.struct.PyTreeNode):
    """Codebook prototypes and their running usage.

    Attributes:
      prototypes: float32 `[num_codes, dim]`, unit-norm prototype vectors.
      usage: float32 `[num_codes]`, EMA of the fraction of feature vectors whose
        nearest prototype is each code. It sums to 1 up to float32 rounding.
    """

    prototypes: jax.Array
    usage: jax.Array

    @property
    def num_codes(self) -> int:
        return self.prototypes.shape[0]


def _l2_normalize(x: jax.Array) -> jax.Array:
    """Scale each vector along the last axis to unit norm. Zero vectors stay zero."""
    squared_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, _TINY_SQUARED_NORM))


def _check_number_in_range(name, value, low, high, *, low_inclusive=True):
    """Raise ValueError for a Python number outside the range. Traced values are not checked."""
    if not isinstance(value, (int, float)):
        return
    above_low = value >= low if low_inclusive else value > low
    if not (above_low and value <= high):
        bracket = "[" if low_inclusive else "("
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}.")


def _check_num_iters(num_iters) -> int:
    num_iters = operator.index(num_iters)
    if num_iters < 1:
        raise ValueError(f"num_iters must be a positive int, got {num_iters}.")
    return num_iters


def _check_prototypes(prototypes: jax.Array) -> None:
    if prototypes.ndim != 2:
        raise ValueError(
            f"prototypes must have shape [num_codes, dim], got shape {prototypes.shape}."
        )


def _flatten_features(features: jax.Array, prototypes: jax.Array) -> jax.Array:
    """Reshape features [..., dim] to float32 [batch, dim] after checking the width."""
    _check_prototypes(prototypes)
    dim = prototypes.shape[1]
    if features.ndim < 1 or features.shape[-1] != dim:
        raise ValueError(
            f"features of shape {features.shape} do not match prototypes of shape "
            f"{prototypes.shape}: the last feature axis must have size {dim}."
        )
    flat = jnp.reshape(features, (-1, dim)).astype(jnp.float32)
    if flat.shape[0] == 0:
        raise ValueError(f"features of shape {features.shape} contain no feature vectors.")
    return flat


def _cosine_logits(features: jax.Array, prototypes: jax.Array) -> jax.Array:
    """Return cosine logits [batch, num_codes] for float32 features [batch, dim]."""
    # HIGHEST keeps the matmul in float32 on TPU, whose default f32 precision is bf16.
    return jnp.matmul(
        _l2_normalize(features),
        _l2_normalize(prototypes.astype(jnp.float32)).T,
        precision=jax.lax.Precision.HIGHEST,
    )


def init_codebook(rng: jax.Array, num_codes: int, dim: int) -> CodebookState:
    """Create a codebook of random unit-norm prototypes with uniform usage.

    Args:
      rng: PRNG key.
      num_codes: number of prototypes K.
      dim: feature width D.

    Returns:
      A CodebookState with prototypes float32 `[num_codes, dim]` drawn uniformly on the
      unit sphere and usage `[num_codes]` equal to 1 / num_codes.
    """
    num_codes = operator.index(num_codes)
    dim = operator.index(dim)
    if num_codes < 1 or dim < 1:
        raise ValueError(
            f"num_codes and dim must be positive ints, got num_codes={num_codes}, dim={dim}."
        )
    gaussian = jax.random.normal(rng, (num_codes, dim), dtype=jnp.float32)
    return CodebookState(
        prototypes=_l2_normalize(gaussian),
        usage=jnp.full((num_codes,), 1.0 / num_codes, dtype=jnp.float32),
    )


def assign_tokens(features: jax.Array, prototypes: jax.Array) -> jax.Array:
    """Map each feature vector to the id of its max-cosine prototype.

    Args:
      features: `[..., dim]`, any float dtype. The scale of each vector does not matter.
      prototypes: `[num_codes, dim]`. They are L2-normalised before the comparison.

    Returns:
      int32 token ids of shape `features.shape[:-1]`. Ties go to the lowest id, and a
      zero feature vector gets id 0.
    """
    flat = _flatten_features(features, prototypes)
    token_ids = jnp.argmax(_cosine_logits(flat, prototypes), axis=-1).astype(jnp.int32)
    return jnp.reshape(token_ids, features.shape[:-1])


def sinkhorn_knopp(scores: jax.Array, eps: float = 0.05, num_iters: int = 3) -> jax.Array:
    """Compute the balanced soft assignment of a batch to prototypes (Sinkhorn-Knopp).

    Starts from Q = exp(scores.T / eps) and repeats `num_iters` times: scale each
    prototype row of Q to sum 1 / num_codes, then scale each sample column to sum
    1 / batch. Because the column step comes last, the column sums equal 1 / batch up to
    float32 rounding, while the row sums only approach 1 / num_codes as the iterations
    grow.

    Args:
      scores: `[batch, num_codes]` logits, sample-major. `batch` is the global batch:
        under jit with sharded scores, the sums over it are all-reduced by XLA.
      eps: entropy temperature (> 0). Smaller values give harder assignments.
      num_iters: number of row-then-column normalisation rounds (>= 1).

    Returns:
      float32 Q of shape `[num_codes, batch]`, prototype-major: Q[k, n] is the mass of
      sample n assigned to prototype k. The balanced assignment of sample n is
      `argmax(Q[:, n])`, that is `jnp.argmax(Q, axis=0)`.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [batch, num_codes], got shape {scores.shape}.")
    _check_number_in_range("eps", eps, 0.0, float("inf"), low_inclusive=False)
    num_iters = _check_num_iters(num_iters)
    batch, num_codes = scores.shape

    logits = scores.astype(jnp.float32).T / eps
    # exp(1 / 0.05) is already 4.9e8, so exp(logits) overflows float32 for logits above
    # about 88. Subtracting each prototype row's max scales that row by a constant,
    # which the first row normalisation below divides out (up to float32 rounding).
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
    # NOTE: for cosine logits in [-1, 1] the shifted exponent is at least -2 / eps, which
    # stays far above float32 underflow at eps = 0.05. Scores spread much wider than
    # that, or a much smaller eps, can underflow a whole column to zero and give NaN.
    q = jnp.exp(logits)

    for _ in range(num_iters):
        q = q / (num_codes * jnp.sum(q, axis=1, keepdims=True))
        q = q / (batch * jnp.sum(q, axis=0, keepdims=True))
    return q


def _code_frequency(token_ids: jax.Array, num_codes: int) -> jax.Array:
    """Return the fraction float32 [num_codes] of token ids [batch] equal to each code."""
    counts = jnp.sum(jax.nn.one_hot(token_ids, num_codes, dtype=jnp.float32), axis=0)
    return counts / token_ids.shape[0]


def codebook_perplexity(token_ids: jax.Array, num_codes: int) -> jax.Array:
    """Return exp of the entropy of the empirical token distribution, as float32.

    It equals num_codes when every code is used equally often and 1 when all tokens
    are the same code.
    """
    frequency = _code_frequency(jnp.reshape(token_ids, (-1,)), num_codes)
    return jnp.exp(jnp.sum(jax.scipy.special.entr(frequency)))


def update_codebook(
    state: CodebookState,
    features: jax.Array,
    *,
    momentum: float = 0.99,
    eps: float = 0.05,
    num_iters: int = 3,
    usage_decay: float = 0.99,
    dead_code_threshold: float = 0.1,
) -> tuple[CodebookState, dict[str, jax.Array]]:
    """Run one online codebook step on a batch of features.

    Steps, all in float32:
      1. Logits are the cosines between features and prototypes, `[batch, num_codes]`.
      2. Sinkhorn-Knopp balances the batch over the prototypes, and each feature's
         balanced assignment is its argmax over prototypes of Q.
      3. Each prototype that received features moves to
         `normalise(momentum * c_k + (1 - momentum) * normalise(mean_k))`, where mean_k
         is the mean of its assigned unit-norm features. A prototype that received
         none keeps its value bitwise.
      4. Usage is an EMA of the nearest-prototype token frequency (the ids that
         `assign_tokens` emits, not the balanced assignment):
         `usage = usage_decay * usage + (1 - usage_decay) * frequency`.

    A code counts as dead when its running usage is below
    `dead_code_threshold / num_codes`. With the defaults (0.1 and usage_decay 0.99), a
    code that stops being used at uniform usage is dead after about
    ln(10) / 0.01 = 230 steps.

    The function is pure and jit-compatible. `num_iters` must be a Python int, while
    the other keywords may be Python floats or traced scalars. Python floats are
    range-checked.

    Args:
      state: current codebook.
      features: `[..., dim]`, any float dtype (bf16 is cast to float32 first). All
        leading axes are flattened into the batch. Under jit the array may be sharded
        along the batch, and the result matches the single-device one.
      momentum: weight of the old prototype, in [0, 1].
      eps: Sinkhorn-Knopp temperature, > 0.
      num_iters: Sinkhorn-Knopp iterations, >= 1.
      usage_decay: EMA decay of `usage`, in [0, 1].
      dead_code_threshold: dead-code threshold as a fraction of the uniform
        frequency 1 / num_codes, in [0, 1].

    Returns:
      `(new_state, metrics)`. The metrics are float32 scalars:
        codebook_perplexity: perplexity of the batch's nearest-prototype token ids.
        dead_code_fraction: fraction of codes whose updated usage is below the threshold.
        active_codes: number of distinct nearest-prototype token ids in the batch.
        sinkhorn_assigned_codes: number of distinct balanced assignments in the batch.
        mean_token_cosine: mean cosine between a feature and its nearest prototype.
    """
    prototypes = state.prototypes
    flat = _flatten_features(features, prototypes)
    num_codes = prototypes.shape[0]
    if state.usage.shape != (num_codes,):
        raise ValueError(
            f"usage of shape {state.usage.shape} does not match prototypes of shape "
            f"{prototypes.shape}: expected usage of shape ({num_codes},)."
        )
    _check_number_in_range("momentum", momentum, 0.0, 1.0)
    _check_number_in_range("usage_decay", usage_decay, 0.0, 1.0)
    _check_number_in_range("dead_code_threshold", dead_code_threshold, 0.0, 1.0)

    unit_features = _l2_normalize(flat)
    unit_prototypes = _l2_normalize(prototypes.astype(jnp.float32))
    logits = _cosine_logits(unit_features, unit_prototypes)

    q = sinkhorn_knopp(logits, eps=eps, num_iters=num_iters)
    balanced_ids = jnp.argmax(q, axis=0)
    # One-hot matmul instead of a scatter-add: under sharding it becomes a local matmul
    # plus an all-reduce, and it is deterministic on GPU. It costs one more
    # [batch, num_codes] array, the size of the logits.
    assignment = jax.nn.one_hot(balanced_ids, num_codes, dtype=jnp.float32)
    counts = jnp.sum(assignment, axis=0)
    feature_sums = jnp.matmul(assignment.T, unit_features, precision=jax.lax.Precision.HIGHEST)

    # The mean and the sum of the assigned features have the same direction.
    mean_directions = _l2_normalize(feature_sums)
    blend = momentum * unit_prototypes + (1.0 - momentum) * mean_directions
    blend_squared_norm = jnp.sum(blend * blend, axis=-1)
    # A blend of zero length (momentum 0.5 with the mean exactly opposite the prototype)
    # has no direction, so that prototype keeps its value like an unassigned one.
    moved = (counts > 0) & (blend_squared_norm > _TINY_SQUARED_NORM)
    new_prototypes = jnp.where(moved[:, None], _l2_normalize(blend), prototypes.astype(jnp.float32))

    token_ids = jnp.argmax(logits, axis=-1)
    token_frequency = _code_frequency(token_ids, num_codes)
    new_usage = (
        usage_decay * state.usage.astype(jnp.float32) + (1.0 - usage_decay) * token_frequency
    )

    dead_codes = new_usage < dead_code_threshold / num_codes
    metrics = {
        "codebook_perplexity": jnp.exp(jnp.sum(jax.scipy.special.entr(token_frequency))),
        "dead_code_fraction": jnp.mean(dead_codes.astype(jnp.float32)),
        "active_codes": jnp.sum((token_frequency > 0).astype(jnp.float32)),
        "sinkhorn_assigned_codes": jnp.sum((counts > 0).astype(jnp.float32)),
        "mean_token_cosine": jnp.mean(jnp.max(logits, axis=-1)),
    }
    new_state = state.replace(prototypes=new_prototypes, usage=new_usage)
    return new_state, metrics
