"""Run one train step of the tiny config on several meshes of 8 fake CPU devices.

Prints one JSON line: for each mesh, the loss and every gradient of the first
step, then after the step the codebook (prototypes, usage and metrics), the
EMA encoder and the sharding spec of every array of the train state. The test
compares the meshes with the single-device run.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Import this repository's rf_jax even when another copy is installed.
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]
from conftest import tiny_config  # noqa: E402
import rf_jax  # noqa: E402
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
    state, metrics = trainer.jit_train_step(shardings)(state, batch)
    flatten = lambda tree: {  # noqa: E731
        jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf).tolist()
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    codebook_metrics = (
        "codebook_perplexity",
        "dead_code_fraction",
        "active_codes",
        "sinkhorn_assigned_codes",
        "mean_token_cosine",
    )
    return dict(
        loss=float(loss),
        grads=flatten(grads),
        prototypes=np.asarray(state.codebook.prototypes).tolist(),
        usage=np.asarray(state.codebook.usage).tolist(),
        codebook_metrics={name: float(metrics[name]) for name in codebook_metrics},
        ema_encoder=flatten(state.ema_encoder),
        specs=partitioning.spec_table(jax.tree.map(lambda leaf: leaf.sharding, state)),
    )


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    runs = {"x".join(map(str, shape)): run(shape) for shape in MESHES}
    print(json.dumps(dict(rf_jax_file=rf_jax.__file__, runs=runs)))
