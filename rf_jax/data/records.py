"""ArrayRecord shards of image-text examples, and the manifest that lists them.

A built data set lives in `{data_dir}/{name}/{image_size}px/`:

    manifest.json                            what was built, from which sources
    tokenizer.model                          sentencepiece model
    {split}-XXXXX-of-YYYYY.array_record      shards, one serialised example a record

Each record is `MAGIC`, a little-endian uint32 header length, a UTF-8 JSON
header (caption, qa, label, image shape, CRC-32 of the pixels), then the raw
image bytes (uint8, row-major [height, width, 3]). Nothing is pickled.
"""

import dataclasses
import json
import math
import os
import struct
import zlib
from typing import Any, Callable, Iterable, Iterator

from array_record.python import array_record_module
import grain
import numpy as np

FORMAT_VERSION = 1
MAGIC = b"RFX1"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
# group_size:1 makes every record its own chunk, so random access by index
# (global shuffle) decodes one record, not a group of them.
WRITER_OPTIONS = "group_size:1"
# Target bytes of raw image data per shard.
SHARD_BYTES = 128 * 1024 * 1024

_HEADER_LENGTH = struct.Struct("<I")


class DataFormatError(ValueError):
    """A built data set is missing, corrupt or from an incompatible build."""


@dataclasses.dataclass
class Example:
    """One image with its texts.

    Attributes:
        image: uint8 [height, width, 3] RGB pixels.
        caption: English description of the image.
        qa: (question, answer) pairs about the image, possibly empty.
        label: class id, or -1 for data sets without classes.
    """

    image: np.ndarray
    caption: str
    qa: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    label: int = -1


def encode_example(example: Example) -> bytes:
    """Serialise an example to the record format described in the module doc."""
    image = np.ascontiguousarray(example.image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"Example image must be uint8 [height, width, 3], got {image.dtype} "
            f"{list(image.shape)} (caption {example.caption!r})."
        )
    pixels = image.tobytes()
    header = {
        "caption": example.caption,
        "qa": [[question, answer] for question, answer in example.qa],
        "label": int(example.label),
        "shape": list(image.shape),
        "crc32": zlib.crc32(pixels),
    }
    header_bytes = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return MAGIC + _HEADER_LENGTH.pack(len(header_bytes)) + header_bytes + pixels


def decode_example(record: bytes, where: str = "record") -> Example:
    """Parse a record written by `encode_example`.

    Raises:
        DataFormatError: if the record is truncated, has a bad header or its
            pixels fail the CRC-32 check. `where` names the record in the message.
    """
    prefix = len(MAGIC) + _HEADER_LENGTH.size
    if len(record) < prefix or record[: len(MAGIC)] != MAGIC:
        raise DataFormatError(
            f"{where} is not an rf_jax example record (bad magic or too short, "
            f"{len(record)} bytes). Rebuild the data set."
        )
    (header_length,) = _HEADER_LENGTH.unpack_from(record, len(MAGIC))
    try:
        header = json.loads(record[prefix : prefix + header_length])
        shape = tuple(int(n) for n in header["shape"])
        expected_crc = int(header["crc32"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataFormatError(f"{where} has an invalid header: {e}.") from e
    pixels = record[prefix + header_length :]
    if len(pixels) != math.prod(shape) or zlib.crc32(pixels) != expected_crc:
        raise DataFormatError(
            f"{where} has corrupt image data ({len(pixels)} bytes for shape "
            f"{list(shape)}, or CRC-32 mismatch). Rebuild the data set."
        )
    image = np.frombuffer(pixels, dtype=np.uint8).reshape(shape)
    return Example(
        image=image,
        caption=header["caption"],
        qa=[(question, answer) for question, answer in header["qa"]],
        label=int(header["label"]),
    )


def dataset_path(data_dir: str, name: str, image_size: int) -> str:
    """Return the directory of data set `name` rendered at `image_size`."""
    return os.path.join(data_dir, name, f"{image_size}px")


def shard_file_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def write_split(
    directory: str,
    split: str,
    examples: Iterable[Example],
    num_examples: int,
    image_size: int,
) -> list[dict[str, Any]]:
    """Write `num_examples` examples into shards of about `SHARD_BYTES` each.

    Returns:
        One dict per shard with `file`, `num_records` and `num_bytes`, as stored
        in the manifest. A split with no examples has no shards.

    Raises:
        ValueError: if `examples` does not yield exactly `num_examples` items.
    """
    if num_examples == 0:
        return []
    example_bytes = image_size * image_size * 3
    num_shards = max(1, math.ceil(num_examples * example_bytes / SHARD_BYTES))
    # Consecutive examples go to the same shard: shard i gets `bounds[i]` to
    # `bounds[i + 1]`.
    bounds = [round(i * num_examples / num_shards) for i in range(num_shards + 1)]
    iterator = iter(examples)
    shards = []
    for shard_index in range(num_shards):
        file_name = shard_file_name(split, shard_index, num_shards)
        path = os.path.join(directory, file_name)
        writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
        count = bounds[shard_index + 1] - bounds[shard_index]
        for written in range(count):
            example = next(iterator, None)
            if example is None:
                writer.close()
                raise ValueError(
                    f"Split {split!r} ended after {bounds[shard_index] + written} "
                    f"examples, but {num_examples} were expected."
                )
            writer.write(encode_example(example))
        writer.close()
        shards.append(
            {
                "file": file_name,
                "num_records": count,
                "num_bytes": os.path.getsize(path),
            }
        )
    if next(iterator, None) is not None:
        raise ValueError(f"Split {split!r} has more than {num_examples} examples.")
    return shards


@dataclasses.dataclass
class Manifest:
    """Contents of `manifest.json`: what was built and from which sources.

    Attributes:
        name: data set name, as passed to `build_dataset`.
        image_size: height and width of every image in pixels.
        vocab_size: requested sentencepiece vocabulary size.
        tokenizer_vocab_size: size the trained tokenizer reached, at most
            `vocab_size` (small corpora cannot fill a large vocabulary).
        splits: split name -> {"num_examples": int, "shards": [shard dicts]}.
        tokenizer_file: sentencepiece model file name in the data set directory.
        limit: max examples per split of a truncated test build, or None.
        source_versions: package or file name -> version of each input.
        created_at: UTC creation time, ISO 8601.
        format_version: `FORMAT_VERSION` of the code that wrote the records.
    """

    name: str
    image_size: int
    vocab_size: int
    tokenizer_vocab_size: int
    splits: dict[str, dict[str, Any]]
    tokenizer_file: str = TOKENIZER_FILE
    limit: int | None = None
    source_versions: dict[str, str] = dataclasses.field(default_factory=dict)
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    def split_size(self, split: str) -> int:
        return int(self._split(split)["num_examples"])

    def shard_files(self, split: str) -> list[str]:
        return [shard["file"] for shard in self._split(split)["shards"]]

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.splits:
            raise ValueError(
                f"Split {split!r} not found in data set {self.name!r}, which has "
                f"{sorted(self.splits)}."
            )
        return self.splits[split]

    def write(self, dataset_dir: str) -> None:
        path = os.path.join(dataset_dir, MANIFEST_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self), f, indent=2, ensure_ascii=False)
            f.write("\n")


def rebuild_command(dataset_dir: str) -> str:
    """Return the shell command that rebuilds the data set in `dataset_dir`."""
    size_dir = os.path.normpath(dataset_dir)
    name_dir = os.path.dirname(size_dir)
    size = os.path.basename(size_dir).removesuffix("px")
    return (
        f"python -m rf_jax.data.build --name={os.path.basename(name_dir)} "
        f"--data_dir={os.path.dirname(name_dir) or '.'} --image_size={size}"
    )


def load_manifest(dataset_dir: str, image_size: int | None = None) -> Manifest:
    """Read and check `manifest.json` in `dataset_dir`.

    Raises:
        DataFormatError: if the directory or manifest is missing, unreadable, of
            another `FORMAT_VERSION`, or (when `image_size` is given) built at a
            different image size. The message names the command that rebuilds it.
    """
    hint = f"Build it with: {rebuild_command(dataset_dir)}"
    if not os.path.isdir(dataset_dir):
        raise DataFormatError(f"Data set directory {dataset_dir} not found. {hint}")
    path = os.path.join(dataset_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise DataFormatError(
            f"Manifest {path} not found, so the data set is missing or its build "
            f"did not finish. {hint}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            fields = json.load(f)
        version = fields.get("format_version")
        if version != FORMAT_VERSION:
            raise DataFormatError(
                f"Manifest {path} has format version {version}, but this code "
                f"reads version {FORMAT_VERSION}. Rebuild the data set, which "
                f"replaces it: {rebuild_command(dataset_dir)}"
            )
        manifest = Manifest(**fields)
    except (AttributeError, TypeError, json.JSONDecodeError) as e:
        raise DataFormatError(f"Manifest {path} is invalid ({e}). {hint}") from e
    if image_size is not None and manifest.image_size != image_size:
        raise DataFormatError(
            f"Manifest {path} is for image size {manifest.image_size}, but "
            f"{image_size} was requested. Build that size with: "
            f"{rebuild_command(dataset_dir)}"
        )
    return manifest


class RecordSource:
    """Random-access source of decoded `Example`s of one split.

    Checks shard sizes against the manifest when opened, and turns ArrayRecord
    read failures into `DataFormatError`s that name the data set. Picklable, so
    Grain worker processes can use it.
    """

    def __init__(self, dataset_dir: str, manifest: Manifest, split: str):
        self._dataset_dir = dataset_dir
        self._split = split
        shards = manifest._split(split)["shards"]  # pylint: disable=protected-access
        if not shards:
            raise DataFormatError(
                f"Split {split!r} of {dataset_dir} has no examples. Rebuild it "
                f"without a limit: {rebuild_command(dataset_dir)}"
            )
        paths = [os.path.join(dataset_dir, shard["file"]) for shard in shards]
        for shard, path in zip(shards, paths):
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size != shard["num_bytes"]:
                raise DataFormatError(
                    f"Shard {path} is missing or has {size} bytes, but the manifest "
                    f"lists {shard['num_bytes']}. Rebuild: {rebuild_command(dataset_dir)}"
                )
        try:
            self._source = grain.sources.ArrayRecordDataSource(paths)
        except RuntimeError as e:
            raise DataFormatError(
                f"Failed to open the ArrayRecord shards of split {split!r} in "
                f"{dataset_dir}: {e}. Rebuild: {rebuild_command(dataset_dir)}"
            ) from e
        expected = sum(shard["num_records"] for shard in shards)
        if len(self._source) != expected:
            raise DataFormatError(
                f"Split {split!r} in {dataset_dir} has {len(self._source)} records, "
                f"but the manifest lists {expected}. Rebuild: "
                f"{rebuild_command(dataset_dir)}"
            )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Example:
        where = f"Record {index} of split {self._split!r} in {self._dataset_dir}"
        try:
            record = self._source[index]
        except RuntimeError as e:
            raise DataFormatError(
                f"{where} failed to read: {e}. Rebuild: " f"{rebuild_command(self._dataset_dir)}"
            ) from e
        return decode_example(record, where)

    def __repr__(self) -> str:
        return f"RecordSource({self._dataset_dir!r}, split={self._split!r})"


@dataclasses.dataclass
class SplitPlan:
    """Examples of one split, produced lazily so large splits stream to disk.

    Attributes:
        num_examples: exact number of examples `examples()` yields.
        examples: function returning a fresh iterator over the examples.
    """

    num_examples: int
    examples: Callable[[], Iterator[Example]]
