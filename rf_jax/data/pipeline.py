"""Grain input pipelines over a built data set: training batches and eval examples.

`data_config` is an `ml_collections.ConfigDict` with the fields
`name, dir, image_size, vocab_size, text_len, und_text_len, batch_size,
mixture.generation, mixture.understanding, seed, num_workers`.

Text conventions, T = `text_len`, Tu = `und_text_len`:
    gen_text  [batch, T]: left-padded with PAD, content [BOS, caption tokens].
        Captions longer than T - 1 tokens are truncated at the end; truncations
        are logged the first time and then at 10, 100, ... per process.
    und_text  [batch, Tu]: right-padded with PAD, content
        [BOS, question tokens, answer tokens, EOS]. Long answers are truncated,
        keeping EOS; a question that leaves no room for one answer token raises.
    und_loss_mask [batch, Tu]: 1.0 where und_text contains an answer token or the
        final EOS, i.e. the positions whose token is a prediction target.
"""

import os
from typing import Any, Sequence

from absl import logging
import grain
import ml_collections
import numpy as np

from rf_jax.data import process_rows
from rf_jax.data import records
from rf_jax.data import tokenizer as tokenizer_lib

# Batches each thread of a process assembles ahead of the consumer.
_READ_THREADS = 4
_PREFETCH_BATCHES = 4


def dataset_dir(data_config: ml_collections.ConfigDict) -> str:
    """Return the built data set directory that `data_config` points to."""
    return records.dataset_path(data_config.dir, data_config.name, data_config.image_size)


def load_tokenizer(data_config: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer:
    """Load the tokenizer stored with the data set of `data_config`."""
    directory = dataset_dir(data_config)
    manifest = records.load_manifest(directory, data_config.image_size)
    return tokenizer_lib.Tokenizer.load(os.path.join(directory, manifest.tokenizer_file))


def mixture_sizes(batch_size: int, generation: float, understanding: float) -> tuple[int, int]:
    """Split `batch_size` rows into (generation, understanding) rows by weight.

    Raises:
        ValueError: if a weight is negative, both are zero, or rounding leaves a
            task with a positive weight without rows.
    """
    if generation < 0 or understanding < 0 or generation + understanding <= 0:
        raise ValueError(
            f"Mixture weights must be non-negative with a positive sum, got "
            f"generation={generation}, understanding={understanding}."
        )
    gen_rows = round(batch_size * generation / (generation + understanding))
    und_rows = batch_size - gen_rows
    for task, weight, rows in (
        ("generation", generation, gen_rows),
        ("understanding", understanding, und_rows),
    ):
        if weight > 0 and rows == 0:
            raise ValueError(
                f"Mixture weight {task}={weight} gives 0 of {batch_size} rows in a "
                "batch. Increase batch_size or the weight, or set it to 0."
            )
    return gen_rows, und_rows


def encode_generation_text(
    tokenizer: tokenizer_lib.Tokenizer, caption: str, text_len: int
) -> tuple[np.ndarray, bool]:
    """Return int32 [text_len] left-padded [BOS, caption tokens] and whether
    the caption was truncated to text_len - 1 tokens."""
    tokens = tokenizer.encode(caption)
    truncated = len(tokens) > text_len - 1
    sequence = [tokenizer.bos_id] + tokens[: text_len - 1]
    ids = np.full(text_len, tokenizer.pad_id, dtype=np.int32)
    ids[text_len - len(sequence) :] = sequence
    return ids, truncated


def encode_understanding_text(
    tokenizer: tokenizer_lib.Tokenizer,
    question: str,
    answer: str,
    text_len: int,
    example_name: str = "example",
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Encode a (question, answer) pair as right-padded [BOS, q, a, EOS].

    Returns:
        ids int32 [text_len], loss mask float32 [text_len] (1.0 on answer tokens
        and EOS), and whether the answer was truncated.

    Raises:
        ValueError: if BOS, the question, one answer token and EOS do not fit.
    """
    question_ids = tokenizer.encode(question)
    answer_ids = tokenizer.encode(answer)
    needed = 2 + len(question_ids) + min(1, len(answer_ids))
    if needed > text_len:
        raise ValueError(
            f"Question {question!r} of {example_name} needs {needed} tokens with "
            f"BOS, one answer token and EOS, above und_text_len={text_len}. "
            "Increase und_text_len."
        )
    room = text_len - 2 - len(question_ids)
    truncated = len(answer_ids) > room
    sequence = [tokenizer.bos_id] + question_ids + answer_ids[:room] + [tokenizer.eos_id]
    ids = np.full(text_len, tokenizer.pad_id, dtype=np.int32)
    ids[: len(sequence)] = sequence
    loss_mask = np.zeros(text_len, dtype=np.float32)
    loss_mask[1 + len(question_ids) : len(sequence)] = 1.0
    return ids, loss_mask, truncated


def choose_task(example: records.Example, seed: int, index: int) -> tuple[str, str]:
    """Pick the caption (question "") or one QA pair of `example`.

    The choice depends only on `seed` and `index`, the example's position in
    the repeated stream, so it changes between epochs but not between runs.
    """
    tasks = [("", example.caption)] + list(example.qa)
    choice = np.random.default_rng((seed, index)).integers(len(tasks))
    return tasks[int(choice)]


class _TruncationLog:
    """Counts truncated texts and logs at counts 1, 10, 100, ..."""

    def __init__(self, text_kind: str, limit_name: str):
        self._text_kind = text_kind
        self._limit_name = limit_name
        self.count = 0

    def add(self, example_name: str, limit: int) -> None:
        self.count += 1
        if self.count == 10 ** (len(str(self.count)) - 1):
            logging.warning(
                "Truncated %d %s to %s=%d in this process so far, latest in %s.",
                self.count,
                self._text_kind,
                self._limit_name,
                limit,
                example_name,
            )


class _BatchAssembler:
    """Grain `batch_fn`: turns a list of (stream index, Example) into a batch.

    The first `gen_rows` elements become generation rows and the rest
    understanding rows.
    """

    def __init__(
        self,
        tokenizer,
        gen_rows: int,
        und_rows: int,
        data_config: ml_collections.ConfigDict,
        split: str,
    ):
        self._tokenizer = tokenizer
        self._gen_rows = gen_rows
        self._und_rows = und_rows
        self._text_len = data_config.text_len
        self._und_text_len = data_config.und_text_len
        self._image_size = data_config.image_size
        self._seed = data_config.seed
        self._source = f"{data_config.name}/{split}"
        self._caption_log = _TruncationLog("captions", "text_len - 1")
        self._answer_log = _TruncationLog("answers", "und_text_len")

    def _name(self, index: int, example: records.Example) -> str:
        return f"{self._source} stream index {index} (caption {example.caption!r})"

    def __call__(self, elements: Sequence[tuple[int, records.Example]]):
        size = self._image_size
        batch = {
            "gen_text": np.zeros((self._gen_rows, self._text_len), np.int32),
            "gen_image": np.zeros((self._gen_rows, size, size, 3), np.uint8),
            "und_image": np.zeros((self._und_rows, size, size, 3), np.uint8),
            "und_text": np.zeros((self._und_rows, self._und_text_len), np.int32),
            "und_loss_mask": np.zeros((self._und_rows, self._und_text_len), np.float32),
        }
        for row, (index, example) in enumerate(elements[: self._gen_rows]):
            batch["gen_image"][row] = example.image
            batch["gen_text"][row], truncated = encode_generation_text(
                self._tokenizer, example.caption, self._text_len
            )
            if truncated:
                self._caption_log.add(self._name(index, example), self._text_len - 1)
        for row, (index, example) in enumerate(elements[self._gen_rows :]):
            question, answer = choose_task(example, self._seed, index)
            batch["und_image"][row] = example.image
            ids, mask, truncated = encode_understanding_text(
                self._tokenizer,
                question,
                answer,
                self._und_text_len,
                self._name(index, example),
            )
            batch["und_text"][row], batch["und_loss_mask"][row] = ids, mask
            if truncated:
                self._answer_log.add(self._name(index, example), self._und_text_len)
        return batch


def _attach_index(index: int, example: records.Example):
    # A module-level function, unlike a lambda, pickles into worker processes.
    return index, example


def _open_split(
    data_config: ml_collections.ConfigDict,
    tokenizer: tokenizer_lib.Tokenizer,
    split: str,
) -> records.RecordSource:
    """Open `split` after checking the config against the manifest."""
    directory = dataset_dir(data_config)
    manifest = records.load_manifest(directory, data_config.image_size)
    # Only the data set's own sentencepiece model is sized by data.vocab_size; a pretrained
    # tokenizer brings its own vocabulary.
    if (
        isinstance(tokenizer, tokenizer_lib.Tokenizer)
        and tokenizer.vocab_size > data_config.vocab_size
    ):
        raise ValueError(
            f"Tokenizer has {tokenizer.vocab_size} tokens, more than "
            f"data.vocab_size={data_config.vocab_size}, so some ids would be "
            f"out of range. Raise vocab_size to {tokenizer.vocab_size} or more."
        )
    return records.RecordSource(directory, manifest, split)


def _process_batch_rows(
    data_config: ml_collections.ConfigDict,
    process_index: int,
    process_count: int,
) -> tuple[int, int, int]:
    """Return this process's (batch rows, generation rows, understanding rows)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    if data_config.batch_size % process_count:
        raise ValueError(
            f"Global batch_size={data_config.batch_size} is not divisible by "
            f"process_count={process_count}."
        )
    if data_config.text_len < 2:
        raise ValueError(
            f"text_len={data_config.text_len} leaves no room for a caption token "
            "after BOS. Set text_len to 2 or more."
        )
    gen_rows, und_rows = mixture_sizes(
        data_config.batch_size,
        data_config.mixture.generation,
        data_config.mixture.understanding,
    )
    if gen_rows % process_count or und_rows % process_count:
        raise ValueError(
            f"The global batch of {data_config.batch_size} rows splits into {gen_rows} "
            f"generation and {und_rows} understanding rows, which do not divide evenly over "
            f"process_count={process_count}. Choose data.batch_size and data.mixture so that "
            "both row counts are multiples of the process count."
        )
    return (
        data_config.batch_size // process_count,
        gen_rows // process_count,
        und_rows // process_count,
    )


def make_train_iterator(
    data_config: ml_collections.ConfigDict,
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Create the endless, shuffled training iterator of this process.

    All processes shuffle the whole `train` split with `data_config.seed`, with
    a new order each epoch, and cut the stream into global batches of
    `data_config.batch_size` examples: the first Bg * process_count of each as
    generation rows, the rest as understanding rows (`mixture_sizes`). Each
    process reads only its block of each (`process_rows.global_batch_rows`),
    so the local batches of processes 0, 1, ... concatenated per field equal
    the batch of a single-process run with the same config.

    Returns:
        A Grain `DatasetIterator` of dicts: gen_text int32 [Bg, T], gen_image
        uint8 [Bg, H, W, 3], und_image uint8 [Bu, H, W, 3], und_text int32
        [Bu, Tu], und_loss_mask float32 [Bu, Tu], where Bg and Bu are this
        process's rows. `get_state()` and `set_state(state)` checkpoint and
        restore its position exactly.

    Raises:
        ValueError: the batch size or either row count is not a multiple of
            process_count, or the split has fewer examples than process_count.
    """
    batch_size, gen_rows, und_rows = _process_batch_rows(data_config, process_index, process_count)
    source = _open_split(data_config, tokenizer, "train")
    if len(source) < process_count:
        raise ValueError(
            f"The train split has {len(source)} examples, fewer than "
            f"process_count={process_count}."
        )

    # Stream position -> (position, example); the position seeds the task choice.
    stream = (
        grain.MapDataset.source(source)
        .shuffle(seed=data_config.seed)
        .repeat()
        .map_with_index(_attach_index)
    )
    rows = process_rows.global_batch_rows(gen_rows, und_rows, process_index, process_count)
    dataset = process_rows.ProcessRows(stream, rows, data_config.batch_size).batch(
        batch_size,
        drop_remainder=True,
        batch_fn=_BatchAssembler(tokenizer, gen_rows, und_rows, data_config, "train"),
    )
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
    )
    if data_config.num_workers > 0:
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=data_config.num_workers)
        )
    logging.info(
        "Train iterator: process %d of %d reads rows %s of each global batch of %d "
        "examples of %s (%d examples), %d generation + %d understanding rows.",
        process_index,
        process_count,
        rows,
        data_config.batch_size,
        data_config.name,
        len(source),
        gen_rows,
        und_rows,
    )
    return iter(iter_dataset)


def load_examples(
    data_config: ml_collections.ConfigDict,
    tokenizer: tokenizer_lib.Tokenizer,
    split: str = "test",
    count: int | None = None,
) -> list[records.Example]:
    """Return `count` examples of `split` evenly spaced over it (all of them if None)."""
    source = _open_split(data_config, tokenizer, split)
    count = len(source) if count is None else count
    if not 0 < count <= len(source):
        raise ValueError(
            f"count={count} must be between 1 and the {len(source)} examples of "
            f"split {split!r}."
        )
    indices = np.linspace(0, len(source) - 1, count).round().astype(int)
    return [source[int(index)] for index in indices]


def make_eval_examples(
    data_config: ml_collections.ConfigDict,
    tokenizer: tokenizer_lib.Tokenizer,
    split: str = "test",
    count: int = 16,
) -> dict[str, Any]:
    """Return `count` fixed examples of `split`, evenly spaced over it.

    The understanding task is captioning (question ""), so the prompt is [BOS].

    Returns:
        A dict with these entries:
            image: uint8 [count, H, W, 3].
            caption: list of `count` str.
            label: int32 [count], -1 for data sets without classes.
            gen_text: int32 [count, T], the generation prompt as in training.
            und_prompt: int32 [count, Tu], right-padded [BOS, question tokens].
            und_prompt_len: int32 [count], tokens of und_prompt before padding.
            und_text, und_loss_mask: int32 and float32 [count, Tu], the caption as
                understanding target as in training, for an eval loss.
    """
    source = _open_split(data_config, tokenizer, split)
    if not 0 < count <= len(source):
        raise ValueError(
            f"count={count} must be between 1 and the {len(source)} examples of "
            f"split {split!r}."
        )
    indices = np.linspace(0, len(source) - 1, count).round().astype(int)
    text_len, und_text_len = data_config.text_len, data_config.und_text_len
    result = {
        "image": [],
        "caption": [],
        "label": [],
        "gen_text": [],
        "und_prompt": [],
        "und_prompt_len": [],
        "und_text": [],
        "und_loss_mask": [],
    }
    for index in indices:
        example = source[int(index)]
        name = f"{data_config.name}/{split} record {index}"
        ids, mask, _ = encode_understanding_text(tokenizer, "", example.caption, und_text_len, name)
        prompt = [tokenizer.bos_id]
        result["image"].append(example.image)
        result["caption"].append(example.caption)
        result["label"].append(example.label)
        result["gen_text"].append(encode_generation_text(tokenizer, example.caption, text_len)[0])
        result["und_prompt"].append(
            np.pad(
                prompt, (0, und_text_len - len(prompt)), constant_values=tokenizer.pad_id
            ).astype(np.int32)
        )
        result["und_prompt_len"].append(len(prompt))
        result["und_text"].append(ids)
        result["und_loss_mask"].append(mask)
    dtypes = {
        "image": np.uint8,
        "label": np.int32,
        "gen_text": np.int32,
        "und_prompt": np.int32,
        "und_prompt_len": np.int32,
        "und_text": np.int32,
        "und_loss_mask": np.float32,
    }
    for key, dtype in dtypes.items():
        result[key] = np.stack(result[key]).astype(dtype)
    return result
