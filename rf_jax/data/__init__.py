"""Loaders that build the data sets rf_jax trains on, and Grain pipelines over them."""
