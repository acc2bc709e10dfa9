"""The `tokenizer.json` backend: special tokens rf_jax needs, ids, round trips, model config."""

import json
import pickle

import numpy as np
import pytest

import hf_checkpoints as hf
from rf_jax import configs, inference, pretrained
from rf_jax.data import tokenizer as tokenizer_lib
from rf_jax.data.hf_tokenizer import ADDED_BOS, ADDED_PAD, HFTokenizer

WORDS = ["red", "apple", "green", "heart", "a", "sun"]


@pytest.fixture
def tokenizer_dir(tmp_path):
    hf.write_tokenizer(tmp_path, WORDS, pad="<|endoftext|>")
    return tmp_path


def test_hf_tokenizer_adds_pad_and_bos(tokenizer_dir):
    tokenizer = HFTokenizer.from_pretrained(str(tokenizer_dir))
    size = len(WORDS) + 2  # EOS, the words, [UNK].

    assert tokenizer.eos_id == 0
    # The pad token of the config equals EOS, so a distinct one is added, then BOS.
    assert tokenizer.pad_token == ADDED_PAD
    assert tokenizer.bos_token == ADDED_BOS
    assert (tokenizer.pad_id, tokenizer.bos_id) == (size, size + 1)
    assert tokenizer.vocab_size == size + 2
    assert tokenizer.added_tokens == [ADDED_PAD, ADDED_BOS]


def test_hf_tokenizer_encode_decode(tokenizer_dir):
    tokenizer = HFTokenizer.from_pretrained(str(tokenizer_dir))

    ids = tokenizer.encode("red apple")

    assert ids == [1, 2]
    assert tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id, 3]) == "red apple"
    assert tokenizer.encode(ADDED_BOS + " sun") == [tokenizer.bos_id, 6]


def test_hf_tokenizer_keeps_distinct_pad(tmp_path):
    hf.write_tokenizer(tmp_path, WORDS + ["<pad>"], pad="<pad>")

    tokenizer = HFTokenizer.from_pretrained(str(tmp_path))

    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_id == len(WORDS) + 1
    assert tokenizer.added_tokens == [ADDED_BOS]


def test_hf_tokenizer_save_load_and_pickle(tokenizer_dir, tmp_path):
    tokenizer = HFTokenizer.from_pretrained(str(tokenizer_dir), min_vocab_size=50)
    tokenizer.save(str(tmp_path / "saved"))

    loaded = tokenizer_lib.load_tokenizer(str(tmp_path / "saved"))
    unpickled = pickle.loads(pickle.dumps(tokenizer))

    for copy in (loaded, unpickled):
        assert (copy.pad_id, copy.bos_id, copy.eos_id) == (
            tokenizer.pad_id,
            tokenizer.bos_id,
            tokenizer.eos_id,
        )
        assert copy.vocab_size == 50
        assert copy.encode("green heart") == tokenizer.encode("green heart")


def test_hf_tokenizer_missing_eos_raises(tmp_path):
    hf.write_tokenizer(tmp_path, WORDS)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None}))

    with pytest.raises(ValueError, match="names no eos_token"):
        HFTokenizer.from_pretrained(str(tmp_path))


def test_load_tokenizer_covers_checkpoint_rows(tokenizer_dir):
    (tokenizer_dir / "config.json").write_text(json.dumps({"vocab_size": 300}))

    tokenizer = pretrained.load_tokenizer(str(tokenizer_dir))
    model_config = configs.model_config_for_tokenizer(hf.rf_config(), tokenizer)

    assert tokenizer.vocab_size == 300
    assert model_config.vocab_size == 300
    assert (model_config.pad_id, model_config.bos_id, model_config.eos_id) == (
        tokenizer.pad_id,
        tokenizer.bos_id,
        tokenizer.eos_id,
    )


def test_encode_prompts_uses_tokenizer_ids(tokenizer_dir):
    tokenizer = HFTokenizer.from_pretrained(str(tokenizer_dir))

    rows = inference.encode_prompts(tokenizer, ["red apple", ""], text_len=4)

    pad, bos = tokenizer.pad_id, tokenizer.bos_id
    np.testing.assert_array_equal(rows, [[pad, bos, 1, 2], [pad, pad, pad, bos]])


def test_sentencepiece_ids_are_the_constants():
    assert (tokenizer_lib.PAD_ID, tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID) == (0, 1, 2)
    model_config = configs.model_config(hf.rf_config(), 40)
    assert (model_config.pad_id, model_config.bos_id, model_config.eos_id) == (0, 1, 2)


def test_model_config_rejects_pad_equal_to_eos():
    with pytest.raises(ValueError, match="pad_id=5 equals"):
        configs.model_config(hf.rf_config(), 40, pad_id=5, bos_id=1, eos_id=5)


def test_model_config_rejects_ids_outside_vocab():
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 40\)"):
        configs.model_config(hf.rf_config(), 40, pad_id=45, bos_id=1, eos_id=2)
