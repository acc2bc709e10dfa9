"""A pretrained Hugging Face tokenizer (`tokenizer.json`) behind the rf_jax tokenizer interface.

rf_jax needs three distinct special ids: PAD (every PAD id is treated as
padding), BOS (starts every prompt) and EOS (ends every answer). Pretrained
tokenizers often lack a BOS token, or use one token for PAD and EOS. Such
tokens are added as new special tokens (`ADDED_PAD`, `ADDED_BOS`) with ids
after the existing vocabulary, and the model's embeddings are resized to cover
them (`rf_jax.pretrained`).
"""

import json
import os
from typing import Optional, Sequence

from absl import logging
import tokenizers

ADDED_PAD = "<|rf_pad|>"
ADDED_BOS = "<|rf_bos|>"
TOKENIZER_FILE = "tokenizer.json"
# Written by `HFTokenizer.save`: the special tokens chosen and the minimum vocabulary size.
SPECIAL_TOKENS_FILE = "special_tokens.json"
_HF_CONFIG_FILE = "tokenizer_config.json"


def _token_content(value) -> Optional[str]:
    """Return the token text of a `tokenizer_config.json` entry (a string or {"content": ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer:
    """Text <-> token ids through the `tokenizers` package."""

    def __init__(
        self,
        tokenizer_json: str,
        eos_token: str,
        bos_token: Optional[str] = None,
        pad_token: Optional[str] = None,
        min_vocab_size: int = 0,
    ):
        """Build the tokenizer from the text of a `tokenizer.json`.

        Args:
            tokenizer_json: the serialised tokenizer.
            eos_token: the end-of-sequence token; it must exist in the vocabulary.
            bos_token, pad_token: existing tokens to use, or None to add
                `ADDED_BOS` and `ADDED_PAD`. A pad token equal to the BOS or
                EOS token is replaced by `ADDED_PAD`.
            min_vocab_size: `vocab_size` is at least this (the embedding rows of
                a checkpoint, which may exceed the tokenizer's own ids).

        Raises:
            ValueError: the EOS, BOS or pad token is not in the vocabulary.
        """
        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        if pad_token in (eos_token, bos_token):
            pad_token = None
        self.eos_token = eos_token
        self.bos_token = bos_token or ADDED_BOS
        self.pad_token = pad_token or ADDED_PAD
        self.added_tokens = [
            token
            for token, requested in ((self.pad_token, pad_token), (self.bos_token, bos_token))
            if requested is None and self._tokenizer.token_to_id(token) is None
        ]
        if self.added_tokens:
            self._tokenizer.add_special_tokens(
                [tokenizers.AddedToken(token, special=True) for token in self.added_tokens]
            )
        self._min_vocab_size = int(min_vocab_size)
        ids = {}
        for role, token in (("eos", eos_token), ("bos", self.bos_token), ("pad", self.pad_token)):
            ids[role] = self._tokenizer.token_to_id(token)
            if ids[role] is None:
                raise ValueError(
                    f"The {role} token {token!r} is not in the tokenizer's vocabulary. "
                    f"Set {role}_token in {_HF_CONFIG_FILE} to a token of tokenizer.json."
                )
        self._eos_id, self._bos_id, self._pad_id = ids["eos"], ids["bos"], ids["pad"]

    @classmethod
    def from_pretrained(cls, directory: str, min_vocab_size: int = 0) -> "HFTokenizer":
        """Load `tokenizer.json` and the special tokens of `tokenizer_config.json` in `directory`.

        Raises:
            FileNotFoundError: `tokenizer.json` is missing.
            ValueError: `tokenizer_config.json` names no EOS token.
        """
        tokenizer_path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(tokenizer_path):
            raise FileNotFoundError(
                f"{tokenizer_path} not found. Download the checkpoint with its tokenizer files "
                "(tokenizer.json, tokenizer_config.json) into that directory."
            )
        config_path = os.path.join(directory, _HF_CONFIG_FILE)
        hf_config = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                hf_config = json.load(f)
        eos_token = _token_content(hf_config.get("eos_token"))
        if not eos_token:
            raise ValueError(
                f'{config_path} names no eos_token. Add an "eos_token" entry with the '
                "end-of-text token of tokenizer.json."
            )
        with open(tokenizer_path, encoding="utf-8") as f:
            tokenizer = cls(
                f.read(),
                eos_token=eos_token,
                bos_token=_token_content(hf_config.get("bos_token")),
                pad_token=_token_content(hf_config.get("pad_token")),
                min_vocab_size=min_vocab_size,
            )
        logging.info(
            "Loaded tokenizer %s: %d ids; pad %r = %d, bos %r = %d, eos %r = %d; added %s.",
            tokenizer_path,
            tokenizer.vocab_size,
            tokenizer.pad_token,
            tokenizer.pad_id,
            tokenizer.bos_token,
            tokenizer.bos_id,
            tokenizer.eos_token,
            tokenizer.eos_id,
            tokenizer.added_tokens or "nothing",
        )
        return tokenizer

    @classmethod
    def load(cls, path: str) -> "HFTokenizer":
        """Load a tokenizer written by `save`, or a Hugging Face checkpoint's tokenizer.

        `path` is a directory, or a `tokenizer.json` inside one.
        """
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        special_path = os.path.join(directory, SPECIAL_TOKENS_FILE)
        if not os.path.isfile(special_path):
            return cls.from_pretrained(directory)
        with open(special_path, encoding="utf-8") as f:
            special = json.load(f)
        with open(os.path.join(directory, TOKENIZER_FILE), encoding="utf-8") as f:
            return cls(f.read(), **special)

    def save(self, directory: str) -> None:
        """Write `tokenizer.json` (with the added tokens) and the special-token choices."""
        os.makedirs(directory, exist_ok=True)
        self._tokenizer.save(os.path.join(directory, TOKENIZER_FILE))
        with open(os.path.join(directory, SPECIAL_TOKENS_FILE), "w", encoding="utf-8") as f:
            json.dump(self._special_state(), f, indent=2)

    def _special_state(self) -> dict:
        return dict(
            eos_token=self.eos_token,
            bos_token=self.bos_token,
            pad_token=self.pad_token,
            min_vocab_size=self._min_vocab_size,
        )

    @property
    def tokenizer_size(self) -> int:
        """One more than the largest id the tokenizer can produce, added tokens included."""
        return max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model embeds. Every id is below it."""
        return max(self.tokenizer_size, self._min_vocab_size)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        """Return the token ids of `text`, without BOS or EOS."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of `ids` up to the first EOS, skipping special tokens."""
        text_ids = []
        for token in ids:
            token = int(token)
            if token == self._eos_id:
                break
            text_ids.append(token)
        return self._tokenizer.decode(text_ids, skip_special_tokens=True)

    def __getstate__(self) -> dict:
        # Rebuilt from JSON, so tokenizers can be sent to Grain worker processes.
        return dict(tokenizer_json=self._tokenizer.to_str(), **self._special_state())

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)
