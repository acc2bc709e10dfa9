"""Fashion-MNIST from its gzip IDX files, resized and captioned by class.

The files come from the Debian package `dataset-fashion-mnist`. Only when the
caller passes `allow_download=True` and the files are missing is the data
read through `tensorflow_datasets`, which downloads it.
"""

import functools
import gzip
import importlib.metadata
import os
import subprocess
import zlib
from typing import Iterator

from absl import logging
import numpy as np
from PIL import Image

from rf_jax.data import records

NAME = "fashion_mnist"
DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
APT_PACKAGE = "dataset-fashion-mnist"
# File name prefix of each split in the IDX distribution.
SPLIT_FILES = {"train": "train", "test": "t10k"}
# Class names in label order, as answers, and with an article for captions.
CLASS_NAMES = (
    "t-shirt",
    "trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
CLASS_PHRASES = (
    "a t-shirt",
    "a pair of trousers",
    "a pullover",
    "a dress",
    "a coat",
    "a sandal",
    "a shirt",
    "a sneaker",
    "a bag",
    "an ankle boot",
)
CAPTION_TEMPLATES = (
    "a photo of {}",
    "a picture of {}",
    "a grayscale photo of {}",
    "{}",
)
_FOOTWEAR = frozenset({"sandal", "sneaker", "ankle boot"})
# IDX magic numbers: 0x08 is the unsigned byte type, the low byte the rank.
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801


def read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes.

    Returns:
        uint8 array with the shape given in the file header, e.g. [n, 28, 28].

    Raises:
        ValueError: if the file is not valid gzip, has another magic number, or
            contains fewer or more bytes than its header declares.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(
            f"IDX file {path} is truncated or not valid gzip ({e}). Reinstall "
            f"it: apt-get install --reinstall {APT_PACKAGE}"
        ) from e
    if len(data) < 4:
        raise ValueError(f"IDX file {path} is too short for a header.")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"IDX file {path} has magic number {magic:#010x}, expected "
            f"{expected_magic:#010x}; it is not the expected uint8 array."
        )
    rank = magic & 0xFF
    header_size = 4 + 4 * rank
    if len(data) < header_size:
        raise ValueError(f"IDX file {path} is truncated inside its header.")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    expected = header_size + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(
            f"IDX file {path} has {len(data)} bytes, but its header shape "
            f"{list(shape)} needs {expected}; the file is truncated or corrupt."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def _idx_paths(source_dir: str, split: str) -> tuple[str, str]:
    prefix = SPLIT_FILES[split]
    return (
        os.path.join(source_dir, f"{prefix}-images-idx3-ubyte.gz"),
        os.path.join(source_dir, f"{prefix}-labels-idx1-ubyte.gz"),
    )


def _load_from_tfds(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load a split through tensorflow_datasets, downloading it if needed."""
    # NOTE: this path downloads data and is not exercised by the tests.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    logging.info("Loading Fashion-MNIST %s through tensorflow_datasets.", split)
    data = tfds.as_numpy(tfds.load("fashion_mnist", split=split, batch_size=-1))
    return data["image"][..., 0].astype(np.uint8), data["label"].astype(np.uint8)


def load_arrays(
    split: str, source_dir: str = DEFAULT_SOURCE_DIR, allow_download=False
) -> tuple[np.ndarray, np.ndarray]:
    """Read one split.

    Returns:
        images uint8 [n, 28, 28] and labels uint8 [n].

    Raises:
        FileNotFoundError: if the IDX files are missing and `allow_download` is
            False.
        ValueError: if a file is corrupt or images and labels disagree in count.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"Unknown split {split!r}. Expected one of {list(SPLIT_FILES)}.")
    images_path, labels_path = _idx_paths(source_dir, split)
    missing = [p for p in (images_path, labels_path) if not os.path.isfile(p)]
    if missing:
        if allow_download:
            return _load_from_tfds(split)
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {source_dir}: {missing}. Install "
            f"them with `apt-get install {APT_PACKAGE}`, or pass "
            "allow_download=True (--allow_download) to download them through "
            "tensorflow-datasets."
        )
    images = read_idx(images_path, _IMAGES_MAGIC)
    labels = read_idx(labels_path, _LABELS_MAGIC)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(
            f"{images_path} has shape {list(images.shape)} but {labels_path} has "
            f"{len(labels)} labels; expected [n, height, width] with n labels."
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ValueError(
            f"{labels_path} has label {labels.max()}, above the last class id "
            f"{len(CLASS_NAMES) - 1}."
        )
    return images, labels


def make_example(image: np.ndarray, label: int, index: int, image_size: int) -> records.Example:
    """Resize a grey [28, 28] image to RGB [image_size, image_size, 3] and caption it.

    The caption template is chosen by `index`, so a rebuild gives the same
    captions.
    """
    grey = Image.fromarray(image)
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), Image.BILINEAR)
    rgb = np.repeat(np.asarray(grey)[:, :, None], 3, axis=2)
    name = CLASS_NAMES[label]
    template = CAPTION_TEMPLATES[index % len(CAPTION_TEMPLATES)]
    qa = [
        ("what is this?", name),
        ("what kind of clothing is this?", name),
        ("is this footwear?", "yes" if name in _FOOTWEAR else "no"),
    ]
    caption = template.format(CLASS_PHRASES[label])
    return records.Example(image=rgb, caption=caption, qa=qa, label=int(label))


def _examples(images: np.ndarray, labels: np.ndarray, image_size: int) -> Iterator[records.Example]:
    for index, (image, label) in enumerate(zip(images, labels)):
        yield make_example(image, int(label), index, image_size)


def load_splits(
    image_size: int,
    limit: int | None = None,
    source_dir: str = DEFAULT_SOURCE_DIR,
    allow_download: bool = False,
) -> dict[str, records.SplitPlan]:
    """Read the official `train` (60,000) and `test` (10,000) splits.

    Args:
        image_size: height and width of the resized images in pixels.
        limit: if set, keep only the first `limit` examples of each split.
        source_dir: directory with the gzip IDX files.
        allow_download: read through tensorflow_datasets if the files are missing.
    """
    plans = {}
    for split in SPLIT_FILES:
        images, labels = load_arrays(split, source_dir, allow_download)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        plans[split] = records.SplitPlan(
            num_examples=len(images),
            examples=functools.partial(_examples, images, labels, image_size),
        )
    return plans


def source_versions(source_dir: str = DEFAULT_SOURCE_DIR) -> dict[str, str]:
    """Return where the IDX files came from and which version, for the manifest."""
    images_path, _ = _idx_paths(source_dir, "train")
    if not os.path.isfile(images_path):
        return {"tensorflow-datasets": importlib.metadata.version("tensorflow-datasets")}
    try:
        version = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", APT_PACKAGE],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        version = "unknown"
    return {APT_PACKAGE: version, "source_dir": source_dir}
