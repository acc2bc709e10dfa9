"""Tests for rf_jax.eval.classifier and its cache on synthetic images, without the IDX files."""

import gzip
import json
import os
import shutil
import subprocess
import sys

from absl import app
import jax
import numpy as np
import pytest

from rf_jax.data import fashion_mnist
from rf_jax.eval import classifier as classifier_lib
from rf_jax.eval import classifier_cache

# Small settings, so that each training in these tests takes seconds on CPU.
SMALL = classifier_lib.TrainSettings(
    conv_features=(8, 16), dense_features=32, epochs=2, batch_size=32, eval_batch_size=64
)


def _stripe_images(num_images, seed):
    """Images [n, 28, 28] with a bright 2-row stripe at row 2 + 2 * label over dark noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, num_images).astype(np.uint8)
    images = rng.integers(0, 60, (num_images, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        image[2 + 2 * label : 4 + 2 * label, 3:25] = 255
    return images, labels


def _write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_source_dir(directory):
    """Write synthetic stripe images as the four Fashion-MNIST IDX files."""
    os.makedirs(directory, exist_ok=True)
    for split, num_images, seed in (("train", 640, 0), ("t10k", 200, 1)):
        images, labels = _stripe_images(num_images, seed)
        _write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), images, 0x803)
        _write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), labels, 0x801)
    return directory


def _render_rgb(images, size):
    """Render grey [n, 28, 28] images as RGB [n, size, size, 3], the way the data set builder does."""
    return np.stack([fashion_mnist.make_example(image, 0, 0, size).image for image in images])


@pytest.fixture(scope="module")
def trained():
    train_images, train_labels = _stripe_images(640, 0)
    test_images, test_labels = _stripe_images(200, 1)
    classifier = classifier_lib.train_classifier(
        train_images, train_labels, test_images, test_labels, SMALL, seed=0
    )
    return classifier, test_images, test_labels


def test_train_classifier_learns_stripes(trained):
    classifier, _, _ = trained
    # Chance is 0.1, and each class has its own stripe row, so training must find it.
    assert classifier.test_accuracy >= 0.95


def test_predict_rendered_rgb_matches_grey(trained):
    classifier, test_images, test_labels = trained
    rgb = _render_rgb(test_images, 32)

    predicted = classifier.predict(rgb)

    assert predicted.shape == (200,)
    # Upsampling to 32 px and back blurs the stripe edges a little, but keeps the row.
    assert np.mean(predicted == test_labels) >= 0.95
    features = classifier.features(rgb)
    assert features.shape == (200, SMALL.dense_features)
    assert features.dtype == np.float32


def test_predict_empty_batch(trained):
    classifier, _, _ = trained
    assert classifier.predict(np.zeros((0, 28, 28), np.uint8)).shape == (0,)
    assert classifier.features(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 32)


def test_preprocess_images_shapes_and_dtypes():
    grey, _ = _stripe_images(3, 2)
    rgb = _render_rgb(grey, 32)

    out_rgb = classifier_lib.preprocess_images(rgb)
    out_grey_32 = classifier_lib.preprocess_images(rgb[..., 0])
    out_28 = classifier_lib.preprocess_images(grey)
    out_channel = classifier_lib.preprocess_images(grey[..., None])

    for out in (out_rgb, out_grey_32, out_28, out_channel):
        assert out.shape == (3, 28, 28)
        assert out.dtype == np.uint8
    # Grey content in RGB gives exactly the grey image.
    np.testing.assert_array_equal(out_rgb, out_grey_32)
    np.testing.assert_array_equal(out_28, grey)
    np.testing.assert_array_equal(out_channel, grey)


def test_preprocess_images_luma_weights():
    red = np.zeros((1, 28, 28, 3), np.uint8)
    red[..., 0] = 200
    # BT.601 luma of pure red 200 is 0.299 * 200 = 59.8, rounded to 60.
    assert classifier_lib.preprocess_images(red)[0, 0, 0] == 60


def test_preprocess_images_rejects_bad_input():
    with pytest.raises(ValueError, match="dtype float32"):
        classifier_lib.preprocess_images(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"\[2, 28, 28, 2\]"):
        classifier_lib.preprocess_images(np.zeros((2, 28, 28, 2), np.uint8))
    with pytest.raises(ValueError, match=r"\[28, 28\]"):
        classifier_lib.preprocess_images(np.zeros((28, 28), np.uint8))


def test_train_classifier_rejects_small_data():
    images, labels = _stripe_images(10, 3)
    with pytest.raises(ValueError, match="fewer than batch_size=32"):
        classifier_lib.train_classifier(images, labels, images, labels, SMALL)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """(cache_dir, source_dir, classifier) after one load_or_train call that trained."""
    root = tmp_path_factory.mktemp("classifier_cache")
    source_dir = _write_source_dir(str(root / "source"))
    cache_dir = str(root / "cache")
    classifier = classifier_lib.load_or_train(cache_dir, source_dir, seed=0, settings=SMALL)
    return cache_dir, source_dir, classifier


def _cache_path(cache_dir, name):
    return os.path.join(cache_dir, classifier_cache.CACHE_SUBDIR, name)


def _copy_cache(cache_dir, tmp_path):
    copy = str(tmp_path / "cache")
    shutil.copytree(cache_dir, copy)
    return copy


def test_load_or_train_writes_record(cached):
    cache_dir, _, classifier = cached
    with open(_cache_path(cache_dir, classifier_cache.RECORD_FILE)) as f:
        record = json.load(f)

    assert record["test_accuracy"] == classifier.test_accuracy
    assert record["test_accuracy"] >= 0.95
    assert record["test_accuracy_resized"]["32"] >= 0.95
    assert record["seed"] == 0
    assert record["settings"]["conv_features"] == [8, 16]
    assert record["num_train"] == 640
    assert sorted(record["source_files"]) == sorted(
        f"{prefix}-{kind}-ubyte.gz"
        for prefix in ("train", "t10k")
        for kind in ("images-idx3", "labels-idx1")
    )
    # Atomic writes leave no temporary files behind.
    files = os.listdir(os.path.dirname(_cache_path(cache_dir, "")))
    assert sorted(files) == [classifier_cache.PARAMS_FILE, classifier_cache.RECORD_FILE]


def test_load_or_train_cache_round_trip_bitwise(cached, tmp_path):
    cache_dir, _, classifier = cached
    # Without any IDX files, a second call can only load, because training would fail.
    empty_source = str(tmp_path / "no_data")

    loaded = classifier_lib.load_or_train(cache_dir, empty_source, seed=0, settings=SMALL)

    assert loaded.test_accuracy == classifier.test_accuracy
    original_leaves = jax.tree.leaves_with_path(classifier.params)
    loaded_leaves = jax.tree.leaves_with_path(loaded.params)
    assert [path for path, _ in loaded_leaves] == [path for path, _ in original_leaves]
    for (_, original), (_, restored) in zip(original_leaves, loaded_leaves):
        assert restored.dtype == original.dtype
        np.testing.assert_array_equal(restored, original)
    images, _ = _stripe_images(16, 4)
    np.testing.assert_array_equal(loaded.features(images), classifier.features(images))


def test_load_or_train_retrains_corrupt_params(cached, tmp_path, caplog):
    cache_dir, source_dir, classifier = cached
    copy = _copy_cache(cache_dir, tmp_path)
    params_path = _cache_path(copy, classifier_cache.PARAMS_FILE)
    with open(params_path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))

    retrained = classifier_lib.load_or_train(copy, source_dir, seed=0, settings=SMALL)

    assert "does not match the checksum" in caplog.text
    assert "Retraining" in caplog.text
    assert retrained.test_accuracy >= 0.95
    # The retrained cache is valid again.
    _, record = classifier_cache.load_cache(_cache_path(copy, ""), SMALL, 0, retrained.params)
    assert record["test_accuracy"] == retrained.test_accuracy


def test_load_or_train_corrupt_record_without_data(cached, tmp_path):
    cache_dir, _, _ = cached
    copy = _copy_cache(cache_dir, tmp_path)
    with open(_cache_path(copy, classifier_cache.RECORD_FILE), "w") as f:
        f.write("{not json")

    with pytest.raises(FileNotFoundError, match="unusable.*not valid JSON.*retraining failed"):
        classifier_lib.load_or_train(copy, str(tmp_path / "no_data"), seed=0, settings=SMALL)


def test_load_cache_rejects_other_settings(cached):
    cache_dir, _, classifier = cached
    directory = _cache_path(cache_dir, "")
    other = classifier_lib.TrainSettings(conv_features=(8, 16), dense_features=64)
    with pytest.raises(classifier_cache.CacheError, match="settings="):
        classifier_cache.load_cache(directory, other, 0, classifier.params)
    with pytest.raises(classifier_cache.CacheError, match="seed=0, expected 1"):
        classifier_cache.load_cache(directory, SMALL, 1, classifier.params)


def test_load_cache_rejects_other_data(cached, tmp_path):
    cache_dir, _, classifier = cached
    other_source = str(tmp_path / "other")
    _write_source_dir(other_source)
    images, labels = _stripe_images(640, 5)
    _write_idx(os.path.join(other_source, "train-images-idx3-ubyte.gz"), images, 0x803)
    source_files = classifier_cache.source_file_checksums(other_source)

    with pytest.raises(classifier_cache.CacheError, match="other data files"):
        classifier_cache.load_cache(
            _cache_path(cache_dir, ""), SMALL, 0, classifier.params, source_files
        )


def test_load_cache_rejects_other_param_shapes(cached):
    cache_dir, _, classifier = cached
    wider = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape + (2,), leaf.dtype), classifier.params
    )
    with pytest.raises(classifier_cache.CacheError, match="does not hold the parameters"):
        classifier_cache.load_cache(_cache_path(cache_dir, ""), SMALL, 0, wider)


def _write_untrained_default_cache(cache_dir, test_accuracy):
    """Cache all-zero parameters of the default architecture, with the default settings and seed.

    Training the default architecture took about 20 s on a shared 2-core CPU. The
    CLI checks only the record and the parameter shapes, so untrained parameters
    suffice, and zeros need no compiled initialisation.
    """
    settings = classifier_lib.TrainSettings()
    model = classifier_lib.FashionCNN(settings.conv_features, settings.dense_features)
    dummy = np.zeros((1, 28, 28), np.uint8)
    abstract = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
    params = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract)
    record = classifier_cache.make_record(
        test_accuracy=test_accuracy,
        test_accuracy_resized={},
        seed=0,
        settings=settings,
        train_seconds=0.0,
        num_train=0,
        num_test=0,
        source_files={},
    )
    classifier = classifier_lib.FashionClassifier(params, settings, test_accuracy, record)
    classifier_cache.save_cache(classifier, os.path.join(cache_dir, classifier_cache.CACHE_SUBDIR))


def test_cli_loads_default_cache(tmp_path):
    cache_dir = str(tmp_path / "cache")
    _write_untrained_default_cache(cache_dir, test_accuracy=0.1234)
    # The CLI gets no IDX files, so it passes only if it loads the cache.
    command = [sys.executable, "-m", "rf_jax.eval.classifier", "--cache_dir", cache_dir]
    command += ["--source_dir", str(tmp_path / "no_data")]

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "test accuracy: 0.1234\n"
    assert "Loaded the classifier" in result.stderr


def test_cli_rejects_extra_arguments():
    with pytest.raises(app.UsageError, match=r"Unexpected arguments: \['extra'\]"):
        classifier_lib.main(["classifier", "extra"])
