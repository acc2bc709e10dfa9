"""Tests for the representation tokenizer codebook in rf_jax.codebook."""

import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rf_jax.codebook import (
    CodebookState,
    assign_tokens,
    codebook_perplexity,
    init_codebook,
    sinkhorn_knopp,
    update_codebook,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Jitted once per keyword set, so the tests do not pay for op-by-op dispatch. The keyword
# arguments are traced, so range checks on them are tested on the plain function.
_update_jit = jax.jit(update_codebook)


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _angle_vectors(degrees):
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=-1)


def _sinkhorn_reference(scores, eps=0.05, num_iters=3):
    """Plain float64 Sinkhorn-Knopp, Q prototype-major [num_codes, batch], no max shift."""
    scores = np.asarray(scores, dtype=np.float64)
    batch, num_codes = scores.shape
    q = np.exp(scores.T / eps)
    for _ in range(num_iters):
        q = q / q.sum(axis=1, keepdims=True) / num_codes
        q = q / q.sum(axis=0, keepdims=True) / batch
    return q


def _random_cosine_scores(seed, batch, num_codes, dim=8):
    rng = np.random.default_rng(seed)
    features = _unit(rng.normal(size=(batch, dim)))
    prototypes = _unit(rng.normal(size=(num_codes, dim)))
    return (features @ prototypes.T).astype(np.float32)


def _balanced_ids(features, prototypes, eps=0.05, num_iters=3):
    logits = _unit(features) @ _unit(prototypes).T
    q = sinkhorn_knopp(jnp.asarray(logits, jnp.float32), eps=eps, num_iters=num_iters)
    return np.asarray(jnp.argmax(q, axis=0))


# Sinkhorn-Knopp


def test_sinkhorn_marginals():
    batch, num_codes = 64, 16
    scores = _random_cosine_scores(0, batch, num_codes)
    q = np.asarray(sinkhorn_knopp(jnp.asarray(scores)), dtype=np.float64)

    assert q.shape == (num_codes, batch)
    # The column step comes last, so column sums are 1 / batch up to float32 rounding.
    np.testing.assert_allclose(q.sum(axis=0), 1.0 / batch, rtol=1e-5)
    # The total mass is then 1, so the mean row sum is 1 / num_codes.
    np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-5)
    # After 3 iterations each row sum is only near 1 / num_codes: on these scores the
    # row sums span 0.56 / num_codes to 1.52 / num_codes (0.26 to 2.45 after 1 iteration).
    row_sums = q.sum(axis=1) * num_codes
    assert row_sums.min() > 0.5
    assert row_sums.max() < 2.0
    one_iteration = np.asarray(sinkhorn_knopp(jnp.asarray(scores), num_iters=1)).sum(axis=1)
    assert np.ptp(row_sums) < np.ptp(one_iteration * num_codes)


def test_sinkhorn_rows_converge_with_iterations():
    batch, num_codes = 64, 16
    scores = jnp.asarray(_random_cosine_scores(0, batch, num_codes))
    q = np.asarray(sinkhorn_knopp(scores, num_iters=50), dtype=np.float64)

    # On these scores the row sums are within 1e-4 relative of 1 / num_codes.
    np.testing.assert_allclose(q.sum(axis=1), 1.0 / num_codes, rtol=1e-3)
    np.testing.assert_allclose(q.sum(axis=0), 1.0 / batch, rtol=1e-5)


@pytest.mark.parametrize("eps,num_iters", [(0.05, 3), (0.05, 1), (0.1, 5)])
def test_sinkhorn_matches_numpy_reference(eps, num_iters):
    scores = _random_cosine_scores(1, 48, 24)
    q = np.asarray(sinkhorn_knopp(jnp.asarray(scores), eps=eps, num_iters=num_iters))
    expected = _sinkhorn_reference(scores, eps=eps, num_iters=num_iters)

    # float32 rounding of scores / eps (exponent up to 2 / eps = 40) gives a relative
    # error of a few 1e-6 in each entry. Entries go down to about 1e-20, so the check is relative only.
    np.testing.assert_allclose(q, expected, rtol=2e-5, atol=0)


def test_sinkhorn_no_overflow_with_large_scores():
    # exp(scores / eps) overflows float32 without the max shift.
    scores = np.random.default_rng(2).uniform(-10.0, 10.0, size=(32, 8)).astype(np.float32)
    q = np.asarray(sinkhorn_knopp(jnp.asarray(scores), eps=0.5))

    assert np.all(np.isfinite(q))
    np.testing.assert_allclose(q, _sinkhorn_reference(scores, eps=0.5), rtol=2e-5, atol=0)


def test_sinkhorn_balances_skewed_features():
    num_codes, dim, batch = 32, 16, 256
    state = init_codebook(jax.random.key(0), num_codes, dim)
    prototypes = np.asarray(state.prototypes)
    features = prototypes[0] + 0.05 * np.random.default_rng(3).normal(size=(batch, dim))

    nearest = np.asarray(assign_tokens(jnp.asarray(features, jnp.float32), state.prototypes))
    balanced = _balanced_ids(features, prototypes)
    counts = np.bincount(balanced, minlength=num_codes)

    assert len(np.unique(nearest)) == 1
    assert len(np.unique(balanced)) >= num_codes // 2
    assert counts.max() <= batch // 8

    _, metrics = _update_jit(state, jnp.asarray(features, jnp.float32))
    assert metrics["active_codes"] == 1
    assert metrics["sinkhorn_assigned_codes"] == len(np.unique(balanced))


def test_sinkhorn_rejects_bad_input():
    scores = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=r"\[batch, num_codes\].*\(12,\)"):
        sinkhorn_knopp(jnp.zeros((12,)))
    with pytest.raises(ValueError, match="eps"):
        sinkhorn_knopp(scores, eps=0.0)
    with pytest.raises(ValueError, match="num_iters"):
        sinkhorn_knopp(scores, num_iters=0)


# Data parallelism over 8 fake CPU devices

_SHARDED_SCRIPT = textwrap.dedent("""
    import sys

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from rf_jax.codebook import CodebookState, sinkhorn_knopp, update_codebook

    inputs = np.load(sys.argv[1])
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch_sharding = NamedSharding(mesh, P("data", None))
    scores = jax.device_put(inputs["scores"], batch_sharding)
    features = jax.device_put(inputs["features"], batch_sharding)
    state = CodebookState(
        prototypes=jnp.asarray(inputs["prototypes"]), usage=jnp.asarray(inputs["usage"])
    )

    sinkhorn = jax.jit(sinkhorn_knopp)
    update = jax.jit(update_codebook)
    q = sinkhorn(scores)
    new_state, metrics = update(state, features)
    np.savez(
        sys.argv[2],
        device_count=jax.device_count(),
        feature_shard_shapes=np.array([s.data.shape for s in features.addressable_shards]),
        sinkhorn_all_reduces=sinkhorn.lower(scores).compile().as_text().count("all-reduce"),
        update_all_reduces=update.lower(state, features).compile().as_text().count("all-reduce"),
        q=np.asarray(q),
        prototypes=np.asarray(new_state.prototypes),
        usage=np.asarray(new_state.usage),
        **{"metric_" + name: np.asarray(value) for name, value in metrics.items()},
    )
    """)


def test_sharded_over_8_devices_matches_single_device(tmp_path):
    batch, num_codes, dim = 256, 64, 16
    rng = np.random.default_rng(4)
    state = init_codebook(jax.random.key(5), num_codes, dim)
    inputs = {
        "scores": _random_cosine_scores(6, batch, num_codes),
        "features": rng.normal(size=(batch, dim)).astype(np.float32),
        "prototypes": np.asarray(state.prototypes),
        "usage": np.asarray(state.usage),
    }
    np.savez(tmp_path / "inputs.npz", **inputs)

    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    process = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT, tmp_path / "inputs.npz", tmp_path / "out.npz"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr
    sharded = np.load(tmp_path / "out.npz")

    assert sharded["device_count"] == 8
    np.testing.assert_array_equal(sharded["feature_shard_shapes"], [[batch // 8, dim]] * 8)
    # The batch sums must be cross-device reductions, not per-shard ones.
    assert sharded["sinkhorn_all_reduces"] > 0
    assert sharded["update_all_reduces"] > 0

    # Single-device results, computed in this process, which has one device.
    q = np.asarray(jax.jit(sinkhorn_knopp)(jnp.asarray(inputs["scores"])))
    new_state, metrics = jax.jit(update_codebook)(state, jnp.asarray(inputs["features"]))

    # Sharding only changes the order of float32 sums (per shard, then all-reduce), so
    # results differ by rounding: up to about 1e-6 relative in Q and 3e-8 in the
    # prototypes. The scores of this fixed seed have no near-ties in the balanced argmax.
    np.testing.assert_allclose(sharded["q"], q, rtol=1e-5, atol=0)
    np.testing.assert_array_equal(np.argmax(sharded["q"], axis=0), np.argmax(q, axis=0))
    np.testing.assert_allclose(sharded["prototypes"], new_state.prototypes, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sharded["usage"], new_state.usage, rtol=1e-6, atol=0)
    for name, value in metrics.items():
        np.testing.assert_allclose(sharded["metric_" + name], value, rtol=1e-5, err_msg=name)


# Codebook update


@pytest.mark.parametrize("momentum", [0.5, 0.75])
def test_update_matches_hand_computed_case(momentum):
    # K=3 prototypes at 0, 120 and 240 degrees. Each gets two features, at +10 and +30
    # degrees, with different lengths, so each normalised mean points at +20 degrees.
    prototype_angles = np.array([0.0, 120.0, 240.0])
    prototypes = _angle_vectors(prototype_angles)
    feature_angles = np.repeat(prototype_angles, 2) + np.tile([10.0, 30.0], 3)
    lengths = np.tile([5.0, 0.2], 3)[:, None]
    features = _angle_vectors(feature_angles) * lengths
    state = CodebookState(
        prototypes=jnp.asarray(prototypes, jnp.float32), usage=jnp.full((3,), 1 / 3)
    )

    new_state, metrics = _update_jit(state, jnp.asarray(features, jnp.float32), momentum=momentum)

    mean_directions = _angle_vectors(prototype_angles + 20.0)
    expected = _unit(momentum * prototypes + (1.0 - momentum) * mean_directions)
    assert metrics["sinkhorn_assigned_codes"] == 3
    np.testing.assert_allclose(new_state.prototypes, expected, atol=1e-6)
    if momentum == 0.5:
        # The blend of two unit vectors with equal weights is their bisector.
        np.testing.assert_allclose(
            new_state.prototypes, _angle_vectors(prototype_angles + 10.0), atol=1e-6
        )


def test_unassigned_prototypes_unchanged_bitwise():
    num_codes, dim = 8, 4
    state = init_codebook(jax.random.key(7), num_codes, dim)
    prototypes = np.asarray(state.prototypes)
    features = prototypes[[2, 5]] + 0.3 * np.random.default_rng(8).normal(size=(2, dim))

    new_state, _ = _update_jit(state, jnp.asarray(features, jnp.float32), momentum=0.9)

    assigned = np.unique(_balanced_ids(features, prototypes))
    unassigned = np.setdiff1d(np.arange(num_codes), assigned)
    new_prototypes = np.asarray(new_state.prototypes)
    assert len(unassigned) >= num_codes - 2
    np.testing.assert_array_equal(new_prototypes[unassigned], prototypes[unassigned])
    for code in assigned:
        assert not np.array_equal(new_prototypes[code], prototypes[code])


def test_prototypes_stay_unit_norm():
    num_codes, dim, batch = 32, 16, 128
    state = init_codebook(jax.random.key(9), num_codes, dim)
    all_features = 3.0 * jax.random.normal(jax.random.key(10), (300, batch, dim)) + 1.0

    def step(state, features):
        new_state, _ = update_codebook(state, features, momentum=0.9)
        return new_state, None

    state, _ = jax.jit(lambda s: jax.lax.scan(step, s, all_features))(state)

    norms = np.linalg.norm(np.asarray(state.prototypes, dtype=np.float64), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)
    np.testing.assert_allclose(np.sum(state.usage), 1.0, atol=1e-5)


def test_update_casts_bf16_to_float32():
    state = init_codebook(jax.random.key(11), 16, 8)
    features = jax.random.normal(jax.random.key(12), (4, 8, 8), dtype=jnp.bfloat16)

    from_bf16, metrics = _update_jit(state, features)
    from_float32, _ = _update_jit(state, features.astype(jnp.float32))

    assert from_bf16.prototypes.dtype == jnp.float32
    assert from_bf16.usage.dtype == jnp.float32
    assert all(value.dtype == jnp.float32 and value.shape == () for value in metrics.values())
    np.testing.assert_array_equal(from_bf16.prototypes, from_float32.prototypes)


def test_update_rejects_bad_input():
    state = init_codebook(jax.random.key(13), 8, 4)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(8, 4\)"):
        update_codebook(state, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="no feature vectors"):
        update_codebook(state, jnp.zeros((0, 4)))
    with pytest.raises(ValueError, match="momentum"):
        update_codebook(state, jnp.ones((2, 4)), momentum=1.5)
    with pytest.raises(ValueError, match="usage_decay"):
        update_codebook(state, jnp.ones((2, 4)), usage_decay=-0.1)
    with pytest.raises(ValueError, match=r"usage of shape \(3,\)"):
        update_codebook(state.replace(usage=jnp.ones((3,))), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="num_codes"):
        init_codebook(jax.random.key(0), 0, 4)


# Token assignment and usage statistics


def test_assign_tokens_picks_max_cosine():
    rng = np.random.default_rng(14)
    prototypes = _unit(rng.normal(size=(10, 6)))
    features = rng.normal(size=(3, 5, 6))
    scales = 10.0 ** rng.uniform(-3, 3, size=(3, 5, 1))

    token_ids = assign_tokens(
        jnp.asarray(features, jnp.float32), jnp.asarray(prototypes, jnp.float32)
    )
    scaled_ids = assign_tokens(
        jnp.asarray(features * scales, jnp.float32), jnp.asarray(prototypes, jnp.float32)
    )

    assert token_ids.shape == (3, 5)
    assert token_ids.dtype == jnp.int32
    np.testing.assert_array_equal(token_ids, np.argmax(_unit(features) @ prototypes.T, axis=-1))
    np.testing.assert_array_equal(scaled_ids, token_ids)


def test_assign_tokens_uses_cosine_not_dot_product():
    # Prototype 0 is long but 60 degrees away, prototype 1 is short but 10 degrees away.
    prototypes = np.array([10.0 * _angle_vectors(60.0), 0.5 * _angle_vectors(10.0)])
    features = _angle_vectors([0.0])

    token_ids = assign_tokens(
        jnp.asarray(features, jnp.float32), jnp.asarray(prototypes, jnp.float32)
    )

    np.testing.assert_array_equal(token_ids, [1])


def test_assign_tokens_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(8, 2\)"):
        assign_tokens(jnp.zeros((4, 3)), jnp.zeros((8, 2)))
    with pytest.raises(ValueError, match=r"\[num_codes, dim\]"):
        assign_tokens(jnp.zeros((4, 3)), jnp.zeros((3,)))


def test_perplexity_uniform_and_collapsed():
    num_codes = 8
    assert np.isclose(codebook_perplexity(jnp.arange(num_codes), num_codes), num_codes, rtol=1e-5)
    assert np.isclose(codebook_perplexity(jnp.zeros((32,), jnp.int32), num_codes), 1.0, rtol=1e-6)
    assert np.isclose(codebook_perplexity(jnp.array([0, 0, 3, 3]), num_codes), 2.0, rtol=1e-6)

    state = init_codebook(jax.random.key(15), num_codes, 4)
    _, uniform = _update_jit(state, state.prototypes)
    _, collapsed = _update_jit(state, jnp.tile(state.prototypes[:1], (16, 1)))
    np.testing.assert_allclose(uniform["codebook_perplexity"], num_codes, rtol=1e-5)
    np.testing.assert_allclose(collapsed["codebook_perplexity"], 1.0, rtol=1e-6)


def test_dead_code_fraction_tracks_running_usage():
    num_codes = 8
    state = init_codebook(jax.random.key(16), num_codes, 4)
    collapsed = jnp.tile(state.prototypes[:1], (16, 1))
    fractions = []
    for _ in range(4):
        state, metrics = _update_jit(state, collapsed, usage_decay=0.5)
        fractions.append(float(metrics["dead_code_fraction"]))

    # Unused codes fall to (1/K) * 0.5**t, below the 0.1/K threshold first at t = 4.
    assert fractions[:3] == [0.0, 0.0, 0.0]
    assert fractions[3] == (num_codes - 1) / num_codes
    np.testing.assert_allclose(state.usage[1:], 0.5**4 / num_codes, rtol=1e-6)
    np.testing.assert_allclose(np.sum(state.usage), 1.0, rtol=1e-6)


def test_jit_traces_once():
    state = init_codebook(jax.random.key(17), 16, 8)
    update = jax.jit(chex.assert_max_traces(update_codebook, n=1))
    assign = jax.jit(chex.assert_max_traces(assign_tokens, n=1))
    try:
        for seed in range(3):
            features = jax.random.normal(jax.random.key(seed), (32, 8))
            state, _ = update(state, features, momentum=jnp.float32(0.9 + 0.01 * seed))
            assign(features, state.prototypes)
    finally:
        chex.clear_trace_counter()
