"""Pretrained Qwen2 / Qwen2.5 and DINOv3 checkpoints (Hugging Face safetensors) into rf_jax.

    state, report = load_pretrained(state, model_config, llm_path=..., encoder_path=...)

`load_for_training` applies `config.init.llm_path` and `config.init.encoder_path`
at fresh initialisation, and `load_tokenizer` loads the LLM's tokenizer with the
special tokens rf_jax needs.
"""

from rf_jax.pretrained.loader import ConversionReport
from rf_jax.pretrained.loader import load_for_training
from rf_jax.pretrained.loader import load_pretrained
from rf_jax.pretrained.loader import load_tokenizer
from rf_jax.pretrained.loader import zeros_state

__all__ = [
    "ConversionReport",
    "load_for_training",
    "load_pretrained",
    "load_tokenizer",
    "zeros_state",
]
