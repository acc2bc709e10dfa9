"""On-disk cache of a trained Fashion-MNIST classifier, as msgpack parameters and a JSON record.

A cache directory contains two files. `params.msgpack` is the Flax msgpack
serialisation of the parameter tree. `record.json` stores the settings, the
seed, the test accuracy, the size and SHA-256 of each IDX file used for
training, and the SHA-256 of the parameter file. Both files are written
atomically.

This module stores parameter trees and records only, and does not import
`rf_jax.eval.classifier`, which builds on it.
"""

import dataclasses
import hashlib
import json
import os
import tempfile

import flax
import jax
import optax

from rf_jax.data import fashion_mnist

CACHE_SUBDIR = "fashion_mnist_classifier"
PARAMS_FILE = "params.msgpack"
RECORD_FILE = "record.json"
# Bump when the model or the cache layout changes, so old caches are retrained.
CACHE_FORMAT_VERSION = 1


class CacheError(ValueError):
    """A cached classifier that is corrupt or was made with other settings or data."""


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def source_file_checksums(source_dir: str) -> dict[str, dict]:
    """Return the size and SHA-256 of each IDX file in `source_dir`, or {} if there are none."""
    files = {}
    for prefix in fashion_mnist.SPLIT_FILES.values():
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte.gz"
            path = os.path.join(source_dir, name)
            if os.path.isfile(path):
                files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    return files


def make_record(
    *,
    test_accuracy: float,
    test_accuracy_resized: dict[str, float],
    seed: int,
    settings,
    train_seconds: float,
    num_train: int,
    num_test: int,
    source_files: dict,
) -> dict:
    """Build the JSON record of a trained classifier, without the checksum that `save_cache` adds.

    Args:
        test_accuracy: accuracy on the test split.
        test_accuracy_resized: accuracy on the test images resized to each augment
            size and back, keyed by the size as a string.
        seed: seed of the initialisation and of the shuffling.
        settings: the `TrainSettings` dataclass of the classifier.
        train_seconds: wall-clock time of training and evaluation.
        num_train: number of training images.
        num_test: number of test images.
        source_files: the output of `source_file_checksums` for the training data.
    """
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "test_accuracy": test_accuracy,
        "test_accuracy_resized": test_accuracy_resized,
        "seed": seed,
        "settings": dataclasses.asdict(settings),
        "train_seconds": train_seconds,
        "num_train": num_train,
        "num_test": num_test,
        "source_files": source_files,
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
    }


def _write_atomically(path: str, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, then rename it over `path`."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:
        os.unlink(temp_path)
        raise


def save_cache(classifier, directory: str) -> None:
    """Write the parameters, then the JSON record with their checksum, into `directory`.

    `classifier` is a `FashionClassifier` (any object with `params` and a `record`
    dict). Its `record` is replaced by the written record, which adds the checksum.
    A crash between the two writes leaves a record whose checksum does not match
    the parameters, so the next load treats the cache as corrupt.
    """
    params_bytes = flax.serialization.msgpack_serialize(classifier.params)
    record = dict(classifier.record, params_sha256=hashlib.sha256(params_bytes).hexdigest())
    _write_atomically(os.path.join(directory, PARAMS_FILE), params_bytes)
    _write_atomically(
        os.path.join(directory, RECORD_FILE), json.dumps(record, indent=2).encode("utf-8")
    )
    classifier.record = record


def _check_record(record, settings, seed: int, source_files: dict) -> None:
    if not isinstance(record, dict):
        raise CacheError(f"{RECORD_FILE} is not a JSON object.")
    expected = {
        "format_version": CACHE_FORMAT_VERSION,
        "settings": json.loads(json.dumps(dataclasses.asdict(settings))),
        "seed": seed,
    }
    for key, value in expected.items():
        if record.get(key) != value:
            raise CacheError(f"{RECORD_FILE} has {key}={record.get(key)!r}, expected {value!r}.")
    # Without the IDX files at hand (for example on a machine that only has the
    # cache), the cache is trusted.
    if source_files and record.get("source_files") != source_files:
        raise CacheError(f"{RECORD_FILE} was trained on other data files than the ones given.")
    if not isinstance(record.get("test_accuracy"), float):
        raise CacheError(f"{RECORD_FILE} has no float test_accuracy.")


def load_cache(directory: str, settings, seed: int, expected_params, source_files=None):
    """Load the parameters and the record written by `save_cache`.

    Args:
        directory: the cache directory.
        settings: the `TrainSettings` the cache must have been made with.
        seed: the seed the cache must have been made with.
        expected_params: a parameter tree of `settings` with arrays or
            `jax.ShapeDtypeStruct`s as leaves. The loaded tree must have its
            structure, shapes and dtypes.
        source_files: the output of `source_file_checksums`. If not empty, the
            record must list the same files.

    Returns:
        (params, record): the parameter tree of numpy arrays and the record dict.

    Raises:
        FileNotFoundError: if the record or the parameter file is missing.
        CacheError: if either file is corrupt, or the cache was made with other
            settings, another seed or, when `source_files` is given, other data.
    """
    record_path = os.path.join(directory, RECORD_FILE)
    params_path = os.path.join(directory, PARAMS_FILE)
    with open(record_path, "rb") as f:
        record_bytes = f.read()
    with open(params_path, "rb") as f:
        params_bytes = f.read()
    try:
        record = json.loads(record_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{record_path} is not valid JSON ({e}).") from e
    _check_record(record, settings, seed, source_files or {})
    if hashlib.sha256(params_bytes).hexdigest() != record.get("params_sha256"):
        raise CacheError(f"{params_path} does not match the checksum in {RECORD_FILE}.")

    try:
        params = flax.serialization.msgpack_restore(params_bytes)
    except ValueError as e:
        raise CacheError(f"{params_path} is not a valid msgpack parameter file ({e}).") from e
    shapes = jax.tree.map(lambda leaf: (tuple(leaf.shape), str(leaf.dtype)), params)
    expected_shapes = jax.tree.map(
        lambda leaf: (tuple(leaf.shape), str(leaf.dtype)), expected_params
    )
    if shapes != expected_shapes:
        raise CacheError(f"{params_path} does not hold the parameters of {settings}.")
    return params, record
