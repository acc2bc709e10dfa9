"""Run one train step of the tiny config on several meshes of 8 fake CPU devices.

Prints one JSON line: for each mesh, the loss, every gradient and updated
parameter (as lists), and the sharding spec of every parameter. The test
compares the meshes with the single-device run.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_config  # noqa: E402
from rf_jax import configs  # noqa: E402
from rf_jax import partitioning  # noqa: E402
from rf_jax import trainer as trainer_lib  # noqa: E402

MESHES = tuple(
    tuple(int(n) for n in m.split("x"))
    for m in os.environ.get("MESHES", "1x1x1,8x1x1,2x4x1,2x2x2").split(",")
)


def make_batch():
    rng = np.random.default_rng(0)
    return dict(
        gen_text=np.concatenate(
            [
                np.zeros((8, 3), np.int32),
                np.ones((8, 1), np.int32),
                rng.integers(4, 40, (8, 2), dtype=np.int32),
            ],
            axis=1,
        ),
        gen_image=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
        und_image=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
        und_text=np.concatenate(
            [
                np.ones((8, 1), np.int32),
                rng.integers(4, 40, (8, 6), dtype=np.int32),
                np.full((8, 1), 2, np.int32),
            ],
            axis=1,
        ),
        und_loss_mask=np.concatenate(
            [np.zeros((8, 4), np.float32), np.ones((8, 4), np.float32)], axis=1
        ),
    )


def run(mesh_shape):
    config = tiny_config()
    config.data.batch_size = 16
    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = partitioning.create_mesh(config.mesh, devices)
    model_config = configs.model_config(config, 40)
    trainer = trainer_lib.Trainer(config, model_config, mesh, 10)
    _, shardings = trainer.abstract_state()
    state = trainer.init_state(0)
    batch = partitioning.global_batch(make_batch(), mesh)

    def loss_and_grads(state, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        _, targets = trainer.rep_targets(state.ema_encoder, state.codebook, batch["gen_image"])
        grad_fn = jax.value_and_grad(lambda p: trainer.loss(p, batch, targets, rng)[0])
        return grad_fn(state.params)

    with trainer.sharding_context():
        loss, grads = jax.jit(loss_and_grads)(state, batch)
    state, _ = trainer.jit_train_step(shardings)(state, batch)
    flatten = lambda tree: {  # noqa: E731
        jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf).tolist()
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    specs = {
        jax.tree_util.keystr(path, simple=True, separator="/"): [
            list(axis) if isinstance(axis, tuple) else axis for axis in leaf.sharding.spec
        ]
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]
    }
    return dict(
        loss=float(loss),
        grads=flatten(grads),
        params=flatten(state.params),
        prototypes=np.asarray(state.codebook.prototypes).tolist(),
        specs=specs,
    )


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    print(json.dumps({"x".join(map(str, shape)): run(shape) for shape in MESHES}))
