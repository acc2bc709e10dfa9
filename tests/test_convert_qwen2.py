"""Qwen2 checkpoints into the backbone: hidden states, logits and greedy tokens match transformers.

Both sides compute in float32 on the CPU. The tolerance of the parity checks is
1e-4 of the largest reference magnitude. The two implementations sum in
different orders, which leaves differences near 1e-6 of that scale. A mapping
error (a transposed kernel, a missing bias, a wrong RoPE layout) changes the
outputs by far more than 1e-4.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import hf_checkpoints as hf
from rf_jax import sampler
from rf_jax.model import RFModel
from rf_jax.pretrained import load_pretrained
from rf_jax.pretrained.safetensors_reader import SafetensorsCheckpoint

RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """(torch model, directory) of an untied Qwen2 saved in several shards with an index."""
    model = hf.qwen2_model(tied=False, seed=0)
    directory = hf.save(model, tmp_path_factory.mktemp("qwen_untied"), max_shard_size="50KB")
    return model, directory


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """(torch model, directory) of a Qwen2 with tied embeddings in one safetensors file."""
    model = hf.qwen2_model(tied=True, seed=1)
    return model, hf.save(model, tmp_path_factory.mktemp("qwen_tied"))


def convert(directory, tied=False, vocab_size=hf.QWEN_VOCAB):
    config = hf.rf_config(tied=tied)
    model_config = hf.model_config(config, vocab_size)
    state = hf.blank_state(config, model_config)
    state, report = load_pretrained(state, model_config, llm_path=directory)
    return RFModel(model_config), state.params, report


def text_forward(model, params, ids):
    """Jitted `RFModel.text_forward` (compiling once is faster than running op by op)."""
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, method=RFModel.text_forward))
    return forward(params, jnp.asarray(ids, jnp.int32))


def max_relative_error(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def reference_outputs(torch_model, ids):
    with torch.no_grad():
        tokens = torch.from_numpy(ids)
        hidden = torch_model.model(tokens).last_hidden_state.numpy()
        logits = torch_model(tokens).logits.numpy()
    return hidden, logits


def test_qwen2_sharded_index_has_several_files(untied):
    _, directory = untied
    assert os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))
    assert len([name for name in os.listdir(directory) if name.endswith(".safetensors")]) > 1


def test_qwen2_hidden_and_logits_match(untied):
    torch_model, directory = untied
    model, params, _ = convert(directory)
    ids = np.random.RandomState(0).randint(0, hf.EOS, (3, 11)).astype(np.int64)

    hidden, logits = text_forward(model, params, ids)
    ref_hidden, ref_logits = reference_outputs(torch_model, ids)

    assert max_relative_error(hidden, ref_hidden) < RELATIVE_TOLERANCE
    assert max_relative_error(logits, ref_logits) < RELATIVE_TOLERANCE


def test_qwen2_tied_checkpoint_into_untied_head(tied):
    torch_model, directory = tied
    model, params, report = convert(directory, tied=False)
    embedding = torch_model.model.embed_tokens.weight.detach().numpy()
    ids = np.random.RandomState(1).randint(0, hf.EOS, (2, 6)).astype(np.int64)

    _, logits = text_forward(model, params, ids)

    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]), embedding.T)
    assert max_relative_error(logits, reference_outputs(torch_model, ids)[1]) < RELATIVE_TOLERANCE
    assert any("checkpoint tied, rf_jax separate lm_head" in line for line in report.lines)


def greedy_reference(torch_model, prompt, new_tokens):
    with torch.no_grad():
        out = torch_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=hf.PAD,
        )
    return out[0, len(prompt) :].tolist()


def until_eos(tokens):
    tokens = list(tokens)
    return tokens[: tokens.index(hf.EOS) + 1] if hf.EOS in tokens else tokens


def test_qwen2_greedy_tokens_match_generate(tied):
    torch_model, directory = tied
    model, params, _ = convert(directory, tied=True)
    prompts = [[5, 17, 230, 41, 99, 7], [12, 250, 3]]
    new_tokens = 12
    # Left-padded as rf_jax prompts are: the shorter row starts with PAD.
    width = max(len(prompt) for prompt in prompts)
    rows = np.full((len(prompts), width), hf.PAD, np.int32)
    for row, prompt in enumerate(prompts):
        rows[row, width - len(prompt) :] = prompt

    generate = sampler.make_text_to_text(model.config, new_tokens)
    tokens = np.asarray(generate(params, jnp.asarray(rows), jax.random.key(0)))

    for row, prompt in enumerate(prompts):
        expected = until_eos(greedy_reference(torch_model, prompt, new_tokens))
        assert until_eos(tokens[row].tolist()) == expected


def test_qwen2_vocab_resize_adds_mean_rows(untied):
    torch_model, directory = untied
    model, params, report = convert(directory, vocab_size=hf.QWEN_VOCAB + 4)
    embedding = torch_model.model.embed_tokens.weight.detach().numpy()
    head = torch_model.lm_head.weight.detach().numpy()
    ids = np.random.RandomState(2).randint(0, hf.EOS, (2, 5)).astype(np.int64)

    table = np.asarray(params["text_embed"]["embedding"])
    kernel = np.asarray(params["lm_head"]["kernel"])
    _, logits = text_forward(model, params, ids)

    assert table.shape == (hf.QWEN_VOCAB + 4, hf.QWEN_FIELDS["width"])
    np.testing.assert_array_equal(table[: hf.QWEN_VOCAB], embedding)
    # float32 means of 300 rows: numpy and the converter sum in the same order.
    np.testing.assert_allclose(
        table[hf.QWEN_VOCAB :], np.tile(embedding.mean(0), (4, 1)), atol=1e-7
    )
    np.testing.assert_allclose(
        kernel[:, hf.QWEN_VOCAB :].T, np.tile(head.mean(0), (4, 1)), atol=1e-7
    )
    ref_logits = reference_outputs(torch_model, ids)[1]
    assert max_relative_error(np.asarray(logits)[..., : hf.QWEN_VOCAB], ref_logits) < 1e-4
    assert any("resized from 300 to 304" in line for line in report.lines)


def test_qwen2_config_mismatch_names_field(untied):
    _, directory = untied
    config = hf.rf_config()
    config.model.backbone.depth = 3
    model_config = hf.model_config(config)
    state = hf.blank_state(config, model_config)

    with pytest.raises(ValueError, match=r"--config\.model\.backbone\.depth=2"):
        load_pretrained(state, model_config, llm_path=directory)


def test_qwen2_untied_checkpoint_into_tied_model_raises(untied):
    _, directory = untied
    config = hf.rf_config(tied=True)
    model_config = hf.model_config(config)
    state = hf.blank_state(config, model_config)

    with pytest.raises(ValueError, match="tie_embeddings=False"):
        load_pretrained(state, model_config, llm_path=directory)


def test_qwen2_bad_keys_are_listed(tied, tmp_path):
    _, directory = tied
    checkpoint = SafetensorsCheckpoint(directory)
    tensors = {name: checkpoint.read(name) for name in checkpoint.keys()}
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][
        :, :8
    ]
    tensors["model.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(directory, "config.json"), tmp_path / "config.json")
    config = hf.rf_config(tied=True)
    model_config = hf.model_config(config)
    state = hf.blank_state(config, model_config)

    with pytest.raises(ValueError) as error:
        load_pretrained(state, model_config, llm_path=str(tmp_path))

    message = str(error.value)
    assert "1 missing tensors: model.layers.1.self_attn.k_proj.bias" in message
    assert "1 unexpected tensors: model.extra.weight" in message
    assert "model.layers.0.mlp.up_proj.weight: checkpoint (128, 8), expected (128, 64)" in message


def test_qwen2_pickle_checkpoint_is_not_read(tied, tmp_path):
    _, directory = tied
    shutil.copy(os.path.join(directory, "config.json"), tmp_path / "config.json")
    # Not a valid pickle: any attempt to unpickle it would raise a different error.
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    config = hf.rf_config(tied=True)
    model_config = hf.model_config(config)
    state = hf.blank_state(config, model_config)

    with pytest.raises(FileNotFoundError, match=r"pickle-based weights \['pytorch_model.bin'\]"):
        load_pretrained(state, model_config, llm_path=str(tmp_path))


def test_qwen2_missing_directory_raises(tmp_path):
    config = hf.rf_config()
    model_config = hf.model_config(config)
    state = hf.blank_state(config, model_config)

    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(state, model_config, llm_path=str(tmp_path / "absent"))
