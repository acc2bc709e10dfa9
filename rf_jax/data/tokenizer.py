"""Sentencepiece tokenizer with fixed special token ids.

Any tokenizer backend used with rf_jax provides the same small interface:
`encode`, `decode`, `vocab_size`, and the special ids `pad_id`, `bos_id` and
`eos_id`. The sentencepiece models trained here use the module constants
below; a pretrained tokenizer (`rf_jax.data.hf_tokenizer`) has its own ids.
"""

import io
import os
from typing import Iterable, Sequence

from absl import logging
import sentencepiece as spm

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
_SPECIAL_IDS = (PAD_ID, BOS_ID, EOS_ID, UNK_ID)


class Tokenizer:
    """Text <-> token ids through a sentencepiece model."""

    def __init__(self, model_proto: bytes):
        """Create a tokenizer from serialised sentencepiece `ModelProto` bytes.

        Raises:
            ValueError: if the model does not use the ids `PAD_ID`, `BOS_ID`,
                `EOS_ID`, `UNK_ID` for pad, BOS, EOS and unknown.
        """
        self._model_proto = model_proto
        self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
        found = (
            self._processor.pad_id(),
            self._processor.bos_id(),
            self._processor.eos_id(),
            self._processor.unk_id(),
        )
        if found != _SPECIAL_IDS:
            raise ValueError(
                f"Sentencepiece model has special ids (pad, bos, eos, unk) = {found}"
                f", expected {_SPECIAL_IDS}. Train it with `train_tokenizer`."
            )

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """Load a sentencepiece model file written by `train_tokenizer`."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Tokenizer model {path} not found. It is written next to the data "
                "set manifest by `python -m rf_jax.data.build`."
            )
        with open(path, "rb") as f:
            return cls(f.read())

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special ids included. Every id is below it."""
        return self._processor.vocab_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def encode(self, text: str) -> list[int]:
        """Return the token ids of `text`, without BOS or EOS."""
        return self._processor.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of `ids` up to the first EOS, skipping PAD and BOS."""
        pieces = []
        for token in ids:
            token = int(token)
            if token == EOS_ID:
                break
            if token in (PAD_ID, BOS_ID):
                continue
            pieces.append(token)
        return self._processor.decode(pieces)

    def __getstate__(self) -> dict[str, bytes]:
        # The sentencepiece processor is rebuilt from the model bytes, so
        # tokenizers can be sent to Grain worker processes.
        return {"model_proto": self._model_proto}

    def __setstate__(self, state: dict[str, bytes]) -> None:
        self.__init__(state["model_proto"])


def train_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int) -> Tokenizer:
    """Train a BPE sentencepiece model on `texts` and save it to `model_path`.

    Text is NFKC-normalised and case-folded, so the model is case-insensitive.
    Training runs on one thread, so the same texts give the same model bytes.
    A corpus with few distinct words yields fewer than `vocab_size` pieces
    (`hard_vocab_limit=False`); check `Tokenizer.vocab_size` for the real size.

    Raises:
        ValueError: if `vocab_size` cannot hold the special tokens and every
            character of `texts`, or `texts` is empty.
    """
    texts = [text for text in texts if text]
    if not texts:
        raise ValueError("Cannot train a tokenizer: no non-empty texts were given.")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            # BPE, because the unigram trainer of sentencepiece 0.2.3 keeps the
            # last character of frequent words out of its pieces ("skin" becomes
            # "▁ski", "n") on short captions like ours.
            model_type="bpe",
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            hard_vocab_limit=False,
            character_coverage=1.0,
            normalization_rule_name="nmt_nfkc_cf",
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        message = str(e).rstrip(".")
        raise ValueError(
            f"Sentencepiece training failed for vocab_size={vocab_size} on "
            f"{len(texts)} texts: {message}. Increase vocab_size, which must "
            f"cover the {len(_SPECIAL_IDS)} special tokens and every distinct "
            "character of the texts."
        ) from e
    model_proto = model.getvalue()
    with open(model_path, "wb") as f:
        f.write(model_proto)
    tokenizer = Tokenizer(model_proto)
    logging.info(
        "Trained tokenizer on %d texts: %d pieces (requested %d), saved to %s.",
        len(texts),
        tokenizer.vocab_size,
        vocab_size,
        model_path,
    )
    return tokenizer


def load_tokenizer(path: str):
    """Load a tokenizer file: a `tokenizer.json` directory or file, else a sentencepiece model.

    A directory or a path ending in `.json` loads `rf_jax.data.hf_tokenizer.HFTokenizer`.
    """
    if os.path.isdir(path) or path.endswith(".json"):
        from rf_jax.data import hf_tokenizer  # The `tokenizers` package loads only when needed.

        return hf_tokenizer.HFTokenizer.load(path)
    return Tokenizer.load(path)
