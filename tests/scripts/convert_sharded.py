"""Convert tiny Qwen2 and DINOv3 checkpoints onto an fsdp x tensor mesh of 8 fake CPU devices.

    python convert_sharded.py LLM_DIR ENCODER_DIR

Prints one JSON line with three entries. "specs" pairs the sharding spec of
every converted parameter with the one `Trainer.abstract_state` gives.
"shard_shapes" lists the per-device shapes of two parameters. "differences"
is the largest difference between a few parameters and their source tensors,
which are read here with `safetensors.numpy.load_file` and mapped by hand.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.traverse_util  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_checkpoints as hf  # noqa: E402
from rf_jax import partitioning  # noqa: E402
from rf_jax import trainer as trainer_lib  # noqa: E402
from rf_jax.pretrained import load_pretrained, zeros_state  # noqa: E402


def source_tensors(directory):
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def patch_kernel_by_loops(weight):
    """[width, 3, p, p] -> [p*p*3, width] with row index (row * p + column) * 3 + channel."""
    width, channels, patch, _ = weight.shape
    kernel = np.zeros((patch * patch * channels, width), weight.dtype)
    for row in range(patch):
        for column in range(patch):
            for channel in range(channels):
                kernel[(row * patch + column) * channels + channel] = weight[
                    :, channel, row, column
                ]
    return kernel


def main(llm_dir, encoder_dir):
    config = hf.rf_config()
    config.mesh.update(data=1, fsdp=4, tensor=2)
    model_config = hf.model_config(config)
    mesh = partitioning.create_mesh(config.mesh)
    trainer = trainer_lib.Trainer(config, model_config, mesh, total_steps=10)
    abstract, shardings = trainer.abstract_state()
    state, _ = load_pretrained(zeros_state(abstract), model_config, llm_dir, encoder_dir)

    specs = {}
    for tree in ("params", "ema_encoder"):
        leaves = flax.traverse_util.flatten_dict(getattr(state, tree))
        expected = flax.traverse_util.flatten_dict(getattr(shardings, tree))
        for path, leaf in leaves.items():
            name = "/".join((tree,) + path)
            specs[name] = [str(leaf.sharding.spec), str(expected[path].spec)]

    params = state.params
    llm, encoder = source_tensors(llm_dir), source_tensors(encoder_dir)
    layer = params["backbone"]["layers_1"]
    pairs = {
        "q_proj": (
            layer["attn"]["q_proj"]["kernel"],
            llm["model.layers.1.self_attn.q_proj.weight"].T,
        ),
        "pixel_gate": (
            layer["expert_2"]["mlp"]["gate_proj"]["kernel"],
            llm["model.layers.1.mlp.gate_proj.weight"].T,
        ),
        "final_norm_rep": (
            params["backbone"]["final_norm_1"]["scale"],
            llm["model.norm.weight"],
        ),
        "embedding": (params["text_embed"]["embedding"], llm["model.embed_tokens.weight"]),
        "patch_embed": (
            params["encoder"]["patch_embed"]["kernel"],
            patch_kernel_by_loops(encoder["embeddings.patch_embeddings.weight"]),
        ),
        "registers": (
            params["encoder"]["prefix_tokens"][1:],
            encoder["embeddings.register_tokens"][0],
        ),
        "ema_fc": (
            state.ema_encoder["layers_0"]["mlp"]["up_proj"]["kernel"],
            encoder["layer.0.mlp.up_proj.weight"].T,
        ),
    }
    differences = {
        name: float(np.max(np.abs(np.asarray(actual) - expected)))
        for name, (actual, expected) in pairs.items()
    }
    shard_shapes = {
        name: sorted({tuple(shard.data.shape) for shard in actual.addressable_shards})
        for name, (actual, _) in pairs.items()
        if name in ("q_proj", "embedding")
    }
    print(json.dumps(dict(specs=specs, differences=differences, shard_shapes=shard_shapes)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
