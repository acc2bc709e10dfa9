"""Reproduce the XLA SPMD partitioner bug that `partitioning.gather_for_compute` works around.

    python tests/scripts/xla_dot_repro.py

On a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices it computes
`sum(x * (g @ w.T), axis=0)`. Here g [batch, out] is split over
((data, fsdp), tensor) and w [in, out] over (fsdp, tensor), and the product
[batch, in] is constrained to ((data, fsdp), tensor). With jaxlib 0.10.2 the
partitioner swaps batch shards of g between devices before the dot and never
swaps the result back, so the plain version is far off the single-device value. Gathering w over fsdp first, as
rf_jax does for every parameter, gives the right value. If a new jaxlib prints
a small error for both lines, the bug is fixed.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

BATCH = ("data", "fsdp")


def weighted_input_grad(g, w, x, mesh, gather):
    """Return sum over the batch of x * (g @ w.T), [in]."""
    if gather:
        w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, PartitionSpec(None, "tensor")))
    product = g @ w.T
    product = jax.lax.with_sharding_constraint(
        product, NamedSharding(mesh, PartitionSpec(BATCH, "tensor"))
    )
    return (x * product).sum(axis=0)


def main():
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    rng = np.random.default_rng(0)
    g = rng.normal(size=(8, 12)).astype(np.float32)
    w = rng.normal(size=(32, 12)).astype(np.float32)
    x = rng.normal(size=(8, 32)).astype(np.float32)
    expected = (x * (g @ w.T)).sum(axis=0)

    shardings = tuple(
        NamedSharding(mesh, spec)
        for spec in (
            PartitionSpec(BATCH, "tensor"),
            PartitionSpec("fsdp", "tensor"),
            PartitionSpec(BATCH),
        )
    )
    with jax.set_mesh(mesh):
        for gather in (False, True):
            step = jax.jit(
                lambda g, w, x, gather=gather: weighted_input_grad(g, w, x, mesh, gather),
                in_shardings=shardings,
            )
            error = np.max(np.abs(np.asarray(step(g, w, x)) - expected))
            label = "w gathered over fsdp" if gather else "plain"
            print(f"{label}: max abs error {error:.3g} (values up to {np.abs(expected).max():.3g})")


if __name__ == "__main__":
    main()
