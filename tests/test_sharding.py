"""One train step on meshes of 8 fake CPU devices equals the single-device step."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "mesh_step.py")
# Sharded sums add the same float32 terms in another order: about 1e-6 seen, 1e-5 allowed.
ATOL = 1e-5


def _run(meshes):
    env = dict(os.environ, MESHES=",".join(meshes))
    result = subprocess.run(
        [sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    """Results of one step on each mesh, from a single subprocess."""
    return _run(["1x1x1", "8x1x1", "2x4x1", "1x4x2", "2x2x2"])


def test_data_and_fsdp_meshes_match_one_device(runs):
    reference = runs["1x1x1"]
    for mesh in ("8x1x1", "2x4x1", "1x4x2"):
        run = runs[mesh]
        np.testing.assert_allclose(run["loss"], reference["loss"], atol=ATOL, err_msg=mesh)
        for name, grad in reference["grads"].items():
            np.testing.assert_allclose(
                run["grads"][name], grad, atol=ATOL, err_msg=f"{mesh} gradient {name}"
            )
        np.testing.assert_allclose(
            run["prototypes"], reference["prototypes"], atol=ATOL, err_msg=f"{mesh} codebook"
        )


def test_parameters_follow_logical_rules(runs):
    specs = runs["2x2x2"]["specs"]
    assert specs["backbone/layers_0/attn/q_proj/kernel"] == ["fsdp", "tensor"]
    assert specs["backbone/layers_0/attn/o_proj/kernel"] == ["tensor", "fsdp"]
    assert specs["backbone/layers_0/expert_2/mlp/down_proj/kernel"] == ["tensor", "fsdp"]
    assert specs["encoder/layers_0/mlp/gate_proj/kernel"] == ["fsdp", "tensor"]
    assert specs["text_embed/embedding"] == ["tensor", "fsdp"]
    # 13 rep embeddings (12 codes and BOR) do not split over 2 devices, so they replicate.
    assert specs["rep_embed/embedding"] == [None, "fsdp"]
