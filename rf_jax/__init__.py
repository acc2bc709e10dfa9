"""rf_jax: Representation Forcing for unified multimodal models in JAX/Flax."""
