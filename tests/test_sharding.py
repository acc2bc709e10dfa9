"""Sharding: one train step on 8-device meshes equals one device, and a golden sharding table."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rf_jax import partitioning

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SCRIPT = os.path.join(TESTS, "scripts", "mesh_step.py")
GOLDEN = os.path.join(TESTS, "golden", "shardings_2x2x2.json")
sys.path.insert(0, os.path.join(TESTS, "golden"))

from conftest import tiny_config  # noqa: E402
from sharding_table import sharding_table, state_shardings  # noqa: E402

MESHES = ("8x1x1", "2x4x1", "1x4x2", "2x2x2")
# Sharded sums add the same float32 terms in another order: about 3e-6 seen, 1e-5 allowed.
ATOL = 1e-5


def _run(meshes):
    env = dict(os.environ, MESHES=",".join(meshes))
    result = subprocess.run(
        [sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def output():
    """Results of one step on one device and on each mesh, from a single subprocess."""
    return _run(("1x1x1",) + MESHES)


@pytest.fixture(scope="module")
def runs(output):
    return output["runs"]


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN, encoding="utf-8") as f:
        return json.load(f)


def test_mesh_script_uses_this_checkout(output):
    assert os.path.dirname(os.path.dirname(output["rf_jax_file"])) == ROOT


@pytest.mark.parametrize("mesh", MESHES)
def test_loss_and_gradients_match_one_device(runs, mesh):
    reference, run = runs["1x1x1"], runs[mesh]
    np.testing.assert_allclose(run["loss"], reference["loss"], atol=ATOL, err_msg=mesh)
    assert run["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        np.testing.assert_allclose(
            run["grads"][name], grad, atol=ATOL, err_msg=f"{mesh} gradient {name}"
        )


@pytest.mark.parametrize("mesh", MESHES)
def test_codebook_and_ema_updates_match_one_device(runs, mesh):
    reference, run = runs["1x1x1"], runs[mesh]
    # The prototypes move by the Sinkhorn-Knopp assignment of the EMA encoder's features.
    np.testing.assert_allclose(run["prototypes"], reference["prototypes"], atol=ATOL)
    np.testing.assert_allclose(run["usage"], reference["usage"], atol=ATOL)
    for name, value in reference["codebook_metrics"].items():
        np.testing.assert_allclose(run["codebook_metrics"][name], value, atol=ATOL, err_msg=name)
    for name, value in reference["ema_encoder"].items():
        np.testing.assert_allclose(run["ema_encoder"][name], value, atol=ATOL, err_msg=name)


def test_parameters_follow_logical_rules(runs):
    specs = runs["2x2x2"]["specs"]
    assert specs["params/backbone/layers_0/attn/q_proj/kernel"] == ["fsdp", "tensor"]
    assert specs["params/backbone/layers_0/attn/o_proj/kernel"] == ["tensor", "fsdp"]
    assert specs["params/backbone/layers_0/expert_2/mlp/down_proj/kernel"] == ["tensor", "fsdp"]
    assert specs["params/encoder/layers_0/mlp/gate_proj/kernel"] == ["fsdp", "tensor"]
    assert specs["params/text_embed/embedding"] == ["tensor", "fsdp"]
    # 13 rep embeddings (12 codes and BOR) do not split over 2 devices, so they replicate.
    assert specs["params/rep_embed/embedding"] == [None, "fsdp"]


def test_rules_give_golden_table(golden):
    # Regenerate on purpose with the command in the table's "regenerate" entry.
    assert sharding_table() == golden


def test_trained_state_follows_golden_table(runs, golden):
    specs = runs["2x2x2"]["specs"]
    for name, spec in golden["params"].items():
        assert specs[f"params/{name}"] == spec, name
    for name, spec in golden["codebook"].items():
        assert specs[f"codebook/{name}"] == spec, name
    num_params = len(golden["params"])
    assert sum(name.startswith("params/") for name in specs) == num_params


def test_ema_encoder_shards_like_encoder(runs, golden):
    specs = runs["2x2x2"]["specs"]
    encoder = {
        k[len("encoder/") :]: v for k, v in golden["params"].items() if k.startswith("encoder/")
    }
    ema = {k[len("ema_encoder/") :]: v for k, v in specs.items() if k.startswith("ema_encoder/")}
    assert ema == encoder


def test_optimizer_moments_shard_like_parameters(runs, golden):
    specs = runs["2x2x2"]["specs"]
    for moment in ("mu", "nu"):
        prefix = f"opt_state/1/0/{moment}/"
        moments = {k[len(prefix) :]: v for k, v in specs.items() if k.startswith(prefix)}
        assert moments == golden["params"], moment
    # Step counts, the PRNG key and the skip counter are scalars, replicated.
    others = [k for k in specs if not k.startswith(("params/", "ema_encoder/", "codebook/"))]
    scalars = [k for k in others if "/mu/" not in k and "/nu/" not in k]
    assert scalars
    for name in scalars:
        assert specs[name] == [], name


def test_stacked_layers_shard_like_each_layer():
    config = tiny_config()
    config.model.scan_layers = True
    stacked = partitioning.spec_table(state_shardings(config).params)
    per_layer = partitioning.spec_table(state_shardings().params)
    for name, spec in stacked.items():
        if "/layers/" not in name:
            assert per_layer[name] == spec, name
            continue
        # The leading [depth] axis ("layers") is never split.
        assert spec[0] is None, name
        assert per_layer[name.replace("/layers/", "/layers_0/")] == spec[1:], name


def test_mesh_shape_errors_name_the_fix():
    devices = jax.devices()[:1]
    with pytest.raises(ValueError, match="At most one mesh axis may be -1"):
        partitioning.create_mesh(dict(data=-1, fsdp=-1, tensor=1), devices)
    with pytest.raises(ValueError, match="needs 8 devices but 1 are available"):
        partitioning.create_mesh(dict(data=2, fsdp=2, tensor=2), devices)
