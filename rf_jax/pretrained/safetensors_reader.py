"""Read a Hugging Face checkpoint directory one tensor at a time, from safetensors files only.

A checkpoint directory contains `config.json` and either `model.safetensors`
or shards listed by `model.safetensors.index.json`. Pickle-based files
(`pytorch_model.bin`, `*.pt`) are never opened, because unpickling can run
arbitrary code.
"""

import json
import os

import ml_dtypes
import numpy as np
from safetensors import safe_open

# Importing ml_dtypes registers bfloat16 with numpy, so safetensors can return BF16 tensors.
BFLOAT16 = ml_dtypes.bfloat16

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_config(directory):
    """Return the parsed `config.json` of a checkpoint directory.

    Raises:
        FileNotFoundError: the directory or its `config.json` is missing.
        ValueError: `config.json` is not valid JSON.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"Checkpoint directory {directory} not found; pass the local directory that "
            "contains config.json and the safetensors files."
        )
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; a Hugging Face checkpoint needs config.json.")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}.") from error


def _shard_files(directory):
    """Return {tensor name: safetensors file path} of the checkpoint in `directory`."""
    index_path = os.path.join(directory, INDEX_FILE)
    single_path = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(
                    f"{index_path} is not a valid safetensors index (no readable "
                    f"'weight_map'): {error}."
                ) from error
        files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
        absent = sorted({path for path in files.values() if not os.path.isfile(path)})
        if absent:
            raise FileNotFoundError(
                f"Shards listed in {index_path} are missing: {absent}. Download every shard."
            )
        return files
    if os.path.isfile(single_path):
        with safe_open(single_path, framework="numpy") as f:
            return {name: single_path for name in f.keys()}
    pickled = sorted(name for name in os.listdir(directory) if name.endswith(_PICKLE_SUFFIXES))
    hint = (
        f" Found only pickle-based weights {pickled}, which are not read because loading "
        "them can run code; download the safetensors version of the checkpoint."
        if pickled
        else ""
    )
    raise FileNotFoundError(f"No {SINGLE_FILE} or {INDEX_FILE} in {directory}.{hint}")


class SafetensorsCheckpoint:
    """Tensor names, shapes and values of a checkpoint, read lazily from its safetensors files."""

    def __init__(self, directory):
        self.directory = directory
        self.config = read_config(directory)
        self._files = _shard_files(directory)
        self._handles = {}
        self._shapes = {}
        for name, path in self._files.items():
            self._shapes[name] = tuple(self._handle(path).get_slice(name).get_shape())

    def _handle(self, path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(path, framework="numpy")
            except Exception as error:  # safetensors raises its own error types.  # noqa: BLE001
                raise ValueError(
                    f"{path} is not a readable safetensors file ({error}); download it again."
                ) from error
        return self._handles[path]

    def keys(self):
        return list(self._shapes)

    def shape(self, name):
        """Shape of tensor `name` from the file header, without reading its data."""
        return self._shapes[name]

    def read(self, name):
        """Read tensor `name` into host memory as a numpy array (BF16 as ml_dtypes.bfloat16)."""
        path = self._files[name]
        handle = self._handle(path)
        try:
            return np.asarray(handle.get_tensor(name))
        except Exception as error:  # safetensors raises its own error types.  # noqa: BLE001
            raise ValueError(
                f"Tensor {name} in {path} could not be read ({error}); the file may be "
                "truncated, download it again."
            ) from error

    def close(self):
        self._handles.clear()
