"""Convert a source data set once into ArrayRecord shards, manifest and tokenizer.

Usage:
    python -m rf_jax.data.build --name=openmoji --data_dir=data --image_size=32 \
            --vocab_size=1024

The result goes to `{data_dir}/{name}/{image_size}px/` (layout in
`rf_jax.data.records`). A build writes to a hidden temporary directory next to
it and renames that into place only when it is complete, so an interrupted
build never leaves a directory with a manifest. Such a build leaves a
`.{image_size}px.tmp-*` directory behind, which is safe to delete.
"""

import datetime
import os
import shutil
import time
from typing import Callable, Iterator, Sequence

from absl import app
from absl import flags
from absl import logging

from rf_jax.data import fashion_mnist
from rf_jax.data import openmoji
from rf_jax.data import records
from rf_jax.data import shapes
from rf_jax.data import shapes_prompts
from rf_jax.data import tokenizer as tokenizer_lib

KNOWN_DATASETS = (openmoji.NAME, fashion_mnist.NAME, shapes.NAME)
# Environment variable naming the root data directory when none is configured.
DATA_DIR_ENV = "RF_JAX_DATA_DIR"
_PROGRESS_EVERY = 5000


def _load_source(
    name: str,
    image_size: int,
    limit: int | None,
    allow_download: bool,
    source_dir: str | None,
) -> tuple[dict[str, records.SplitPlan], dict[str, str]]:
    """Return the split plans and source versions of data set `name`."""
    if name == openmoji.NAME:
        plans = openmoji.load_splits(image_size, limit, source_dir)
        return plans, openmoji.source_versions()
    if name == fashion_mnist.NAME:
        source_dir = source_dir or fashion_mnist.DEFAULT_SOURCE_DIR
        plans = fashion_mnist.load_splits(image_size, limit, source_dir, allow_download)
        return plans, fashion_mnist.source_versions(source_dir)
    if name == shapes.NAME:
        plans = shapes.load_splits(image_size, limit, shapes.DEFAULT_SEED)
        return plans, shapes.source_versions(shapes.DEFAULT_SEED)
    raise ValueError(f"Unknown data set {name!r}. Known data sets: {', '.join(KNOWN_DATASETS)}.")


def _write_shapes_prompts(directory: str) -> None:
    """Write the GenEval metadata of the held-out shapes prompts into `directory`."""
    path = shapes_prompts.geneval_prompts_path(directory)
    shapes_prompts.write_evaluation_metadata(path, shapes_prompts.DEFAULT_SEED)


# Data set files beyond shards, tokenizer and manifest, written by the build.
_EXTRA_FILE_WRITERS = {shapes.NAME: _write_shapes_prompts}


def _existing_manifest(
    dataset_dir: str, name: str, image_size: int, vocab_size: int, limit
) -> records.Manifest | None:
    """Return the manifest in `dataset_dir` if it describes the requested build.

    A shapes build must also match the current generator version, seed and
    Pillow version, because its scenes are generated, not read from files.
    """
    if not os.path.isfile(os.path.join(dataset_dir, records.MANIFEST_FILE)):
        return None
    try:
        manifest = records.load_manifest(dataset_dir, image_size)
    except records.DataFormatError as e:
        logging.warning("Rebuilding %s: %s", dataset_dir, e)
        return None
    requested = (name, vocab_size, limit)
    found = (manifest.name, manifest.vocab_size, manifest.limit)
    if requested != found:
        logging.info(
            "Rebuilding %s: it has (name, vocab_size, limit) = %s, requested %s.",
            dataset_dir,
            found,
            requested,
        )
        return None
    if name == shapes.NAME:
        expected = shapes.source_versions(shapes.DEFAULT_SEED)
        if manifest.source_versions != expected:
            logging.info(
                "Rebuilding %s: it has source versions %s, the generator is %s.",
                dataset_dir,
                manifest.source_versions,
                expected,
            )
            return None
    return manifest


def _with_progress(
    examples: Iterator[records.Example],
    split: str,
    total: int,
    texts: list[str] | None,
) -> Iterator[records.Example]:
    """Yield `examples`, logging progress and collecting texts if `texts` is set."""
    start = time.monotonic()
    count = 0
    for count, example in enumerate(examples, start=1):
        if texts is not None:
            texts.append(example.caption)
            for question, answer in example.qa:
                texts.extend((question, answer))
        if count % _PROGRESS_EVERY == 0:
            logging.info(
                "Split %s: %d / %d examples, %.1f s.", split, count, total, time.monotonic() - start
            )
        yield example
    logging.info("Split %s: wrote %d examples in %.1f s.", split, count, time.monotonic() - start)


def _replace_directory(temp_dir: str, dataset_dir: str) -> None:
    """Move the finished `temp_dir` to `dataset_dir`, replacing an old build."""
    old_dir = None
    if os.path.exists(dataset_dir):
        old_dir = f"{temp_dir}.old"
        os.rename(dataset_dir, old_dir)
    os.rename(temp_dir, dataset_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir)


def write_dataset(
    dataset_dir: str,
    name: str,
    image_size: int,
    vocab_size: int,
    plans: dict[str, records.SplitPlan],
    source_versions: dict[str, str],
    limit: int | None = None,
    write_extra_files: Callable[[str], None] | None = None,
) -> records.Manifest:
    """Write the splits in `plans`, train the tokenizer and write the manifest.

    The tokenizer is trained on the captions, questions and answers of the
    `train` split. `write_extra_files(directory)`, if given, adds data set
    specific files before the manifest is written. Everything is written to a
    temporary directory that replaces `dataset_dir` at the end, and that is
    deleted if writing raises.
    """
    if "train" not in plans:
        raise ValueError(f"Data set {name!r} has no 'train' split: {list(plans)}.")
    parent = os.path.dirname(os.path.normpath(dataset_dir))
    os.makedirs(parent, exist_ok=True)
    temp_dir = os.path.join(
        parent,
        f".{os.path.basename(os.path.normpath(dataset_dir))}.tmp-{os.getpid()}",
    )
    if os.path.exists(temp_dir):
        shutil.rmtree(temp_dir)
    os.makedirs(temp_dir)
    try:
        manifest = _write_contents(
            temp_dir, name, image_size, vocab_size, plans, source_versions, limit, write_extra_files
        )
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    _replace_directory(temp_dir, dataset_dir)
    return manifest


def _write_contents(
    temp_dir: str,
    name: str,
    image_size: int,
    vocab_size: int,
    plans: dict[str, records.SplitPlan],
    source_versions: dict[str, str],
    limit: int | None,
    write_extra_files: Callable[[str], None] | None,
) -> records.Manifest:
    """Write shards, tokenizer, extra files and manifest, in that order, into `temp_dir`."""
    texts: list[str] = []
    splits = {}
    for split, plan in plans.items():
        examples = _with_progress(
            plan.examples(),
            split,
            plan.num_examples,
            texts if split == "train" else None,
        )
        shards = records.write_split(temp_dir, split, examples, plan.num_examples, image_size)
        splits[split] = {"num_examples": plan.num_examples, "shards": shards}

    tokenizer = tokenizer_lib.train_tokenizer(
        texts, os.path.join(temp_dir, records.TOKENIZER_FILE), vocab_size
    )
    if write_extra_files is not None:
        write_extra_files(temp_dir)
    manifest = records.Manifest(
        name=name,
        image_size=image_size,
        vocab_size=vocab_size,
        tokenizer_vocab_size=tokenizer.vocab_size,
        splits=splits,
        limit=limit,
        source_versions=source_versions,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    )
    manifest.write(temp_dir)
    return manifest


def default_data_dir(data_dir: str | None = None) -> str:
    """Return data_dir if set, else $RF_JAX_DATA_DIR, else ~/.cache/rf_jax/data."""
    return (
        data_dir
        or os.environ.get(DATA_DIR_ENV)
        or os.path.join(os.path.expanduser("~"), ".cache", "rf_jax", "data")
    )


def build_dataset(
    name: str,
    data_dir: str,
    image_size: int,
    vocab_size: int,
    allow_download: bool = False,
    *,
    limit: int | None = None,
    source_dir: str | None = None,
) -> records.Manifest:
    """Build data set `name` at `image_size` unless a matching build exists.

    Args:
        name: one of `KNOWN_DATASETS`.
        data_dir: root data directory. The build goes to
            `{data_dir}/{name}/{image_size}px`.
        image_size: height and width of the stored images in pixels.
        vocab_size: requested sentencepiece vocabulary size.
        allow_download: for Fashion-MNIST, download through tensorflow-datasets
            if the IDX files are missing.
        limit: if set, keep only the first `limit` examples of each split (for
            tests). The limit is part of the manifest, so a full build replaces it.
        source_dir: input directory: the SVG directory for OpenMoji, the IDX
            directory for Fashion-MNIST. Defaults to the installed package files.
            Shapes are generated and take none.

    A shapes build also writes the GenEval metadata of its held-out prompts,
    at `shapes_prompts.geneval_prompts_path(dataset_dir)`.

    Returns:
        The manifest of the new or reused build.
    """
    if name not in KNOWN_DATASETS:
        raise ValueError(
            f"Unknown data set {name!r}. Known data sets: {', '.join(KNOWN_DATASETS)}."
        )
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive or None, got {limit}.")
    dataset_dir = records.dataset_path(data_dir, name, image_size)
    manifest = _existing_manifest(dataset_dir, name, image_size, vocab_size, limit)
    if manifest is not None:
        logging.info(
            "Reusing the %s build in %s (created %s).", name, dataset_dir, manifest.created_at
        )
        return manifest

    start = time.monotonic()
    logging.info("Building %s at %d px into %s.", name, image_size, dataset_dir)
    plans, versions = _load_source(name, image_size, limit, allow_download, source_dir)
    manifest = write_dataset(
        dataset_dir,
        name,
        image_size,
        vocab_size,
        plans,
        versions,
        limit,
        _EXTRA_FILE_WRITERS.get(name),
    )
    sizes = {split: info["num_examples"] for split, info in manifest.splits.items()}
    logging.info(
        "Built %s in %s: %s examples in %.1f s.", name, dataset_dir, sizes, time.monotonic() - start
    )
    return manifest


def _define_flags() -> None:
    """Define the command-line flags.

    Called only when this module runs as a program, so that importing it never
    clashes with a trainer's flags of the same name.
    """
    flags.DEFINE_enum("name", openmoji.NAME, KNOWN_DATASETS, "Data set to build.")
    flags.DEFINE_string(
        "data_dir",
        None,
        f"Root data directory (default: ${DATA_DIR_ENV}, else ~/.cache/rf_jax/data).",
    )
    flags.DEFINE_integer("image_size", 32, "Height and width of the stored images, in pixels.")
    flags.DEFINE_integer("vocab_size", 1024, "Requested sentencepiece vocabulary size, in tokens.")
    flags.DEFINE_bool(
        "allow_download",
        False,
        "Download Fashion-MNIST through tensorflow-datasets if the IDX files of "
        f"the Debian package {fashion_mnist.APT_PACKAGE} are missing.",
    )
    flags.DEFINE_integer("limit", None, "Keep only this many examples per split (for quick tests).")
    flags.DEFINE_string(
        "source_dir",
        None,
        "Input directory (OpenMoji SVGs or Fashion-MNIST IDX files); defaults "
        "to the installed package files.",
    )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    build_dataset(
        values.name,
        default_data_dir(values.data_dir),
        values.image_size,
        values.vocab_size,
        values.allow_download,
        limit=values.limit,
        source_dir=values.source_dir,
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
