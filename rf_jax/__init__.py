"""rf_jax: Representation Forcing for unified multimodal models in JAX/Flax.

The public names below load on first use, so that `python -m rf_jax.aot` can
set the simulated device count before JAX is imported.
"""

import importlib

_EXPORTS = {
    "RFModel": "rf_jax.model",
    "ModelConfig": "rf_jax.model",
    "SamplerConfig": "rf_jax.sampler",
    "make_text_to_image": "rf_jax.sampler",
    "make_image_to_text": "rf_jax.sampler",
    "make_text_to_text": "rf_jax.sampler",
    "load_pretrained": "rf_jax.pretrained",
    "default_config": "rf_jax.configs",
    "model_config": "rf_jax.configs",
    "encode_prompts": "rf_jax.inference",
    "load_run": "rf_jax.inference",
    "stack_layers": "rf_jax.layer_stack",
    "unstack_layers": "rf_jax.layer_stack",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rf_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
