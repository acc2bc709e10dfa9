"""Captions, held-out combinations and GenEval evaluation prompts of the shapes data set.

Captions follow GenEval's six prompt templates (`make_spec`) over the shapes,
colours and counts defined here. `rf_jax.data.shapes` draws the scenes.

Held-out combinations, fixed by the seed, test compositional generalisation:

- colors: one shape per colour, 8 of the 32 (colour, shape) pairs;
- two_object: shape pairs with no shape in common, 2 of the 6;
- counting: one (shape, count) per count, 3 of the 12;
- position: one arrangement per shape pair, 6 of the 24 (an arrangement is a
  shape pair on one axis, so "a circle left of a square" and "a square right
  of a circle" are the same one);
- color_attr: 25% of the coloured shape pairs whose shape pair and (colour,
  shape) pairs are all seen.

No training or test scene shows a held-out combination, in its caption or in
its pixels. `evaluation_metadata` writes GenEval metadata for the held-out
combinations only. single_object has no combination to hold out, so its
evaluation prompts ("a photo of a circle") also occur in training.
"""

import collections
import dataclasses
import itertools
import os
from typing import Any

import numpy as np

from rf_jax.eval import geneval

DEFAULT_SEED = 0
SHAPES = ("circle", "square", "triangle", "diamond")
# Colour names and the RGB colour each is drawn in. The scenes and the held-out
# combinations of a seed depend on the order of the names.
COLORS = {
    "red": (215, 35, 35),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "purple": (140, 50, 185),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
COUNTS = (2, 3, 4)
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
HELD_OUT_FRACTION = 0.25
GENEVAL_PROMPTS_FILE = "geneval_prompts.jsonl"
# Random streams of a seed, distinct from streams 0 and 1, which
# `rf_jax.data.shapes` uses for the scenes of its splits.
_HELD_OUT_STREAM, _METADATA_STREAM = 2, 3


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Combinations that no training scene shows, per task (see the module doc)."""

    color_shapes: frozenset  # of (color, shape)
    shape_pairs: frozenset  # of frozenset({shape, shape})
    counts: frozenset  # of (shape, count)
    arrangements: frozenset  # of (first, second, axis): first left of / above second
    color_pairs: frozenset  # of frozenset({(color, shape), (color, shape)})


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(word: str) -> str:
    """Return the English plural of a shape name."""
    return f"{word}es" if word.endswith("s") else f"{word}s"


def make_spec(task: str, combination: tuple) -> geneval.PromptSpec:
    """Return the GenEval prompt of `task` for one combination.

    `combination` is (shape,) for single_object, (shape, shape) for two_object,
    (shape, count) for counting, (color, shape) for colors, (shape, relation,
    shape) for position and ((color, shape), (color, shape)) for color_attr.
    """
    requirement = geneval.Requirement
    if task == "single_object":
        (shape,) = combination
        return geneval.PromptSpec(task, f"a photo of {_article(shape)}", (requirement(shape, 1),))
    if task == "two_object":
        a, b = combination
        prompt = f"a photo of {_article(a)} and {_article(b)}"
        return geneval.PromptSpec(task, prompt, (requirement(a, 1), requirement(b, 1)))
    if task == "counting":
        shape, count = combination
        prompt = f"a photo of {NUMBER_WORDS[count]} {plural(shape)}"
        return geneval.PromptSpec(
            task, prompt, (requirement(shape, count),), (requirement(shape, count + 1),)
        )
    if task == "colors":
        color, shape = combination
        prompt = f"a photo of {_article(color)} {shape}"
        return geneval.PromptSpec(task, prompt, (requirement(shape, 1, color),))
    if task == "position":
        a, relation, b = combination
        prompt = f"a photo of {_article(a)} {relation} {_article(b)}"
        return geneval.PromptSpec(
            task, prompt, (requirement(b, 1), requirement(a, 1, position=(relation, 0)))
        )
    if task == "color_attr":
        (color_a, a), (color_b, b) = combination
        prompt = f"a photo of {_article(color_a)} {a} and {_article(color_b)} {b}"
        return geneval.PromptSpec(
            task, prompt, (requirement(a, 1, color_a), requirement(b, 1, color_b))
        )
    raise ValueError(f"Unknown task {task!r}; expected one of {geneval.TASKS}.")


def _arrangement(a: str, relation: str, b: str) -> tuple[str, str, str]:
    """Return the held-out key of "a `relation` b": (left or upper, other, axis)."""
    return {
        "left of": (a, b, "horizontal"),
        "right of": (b, a, "horizontal"),
        "above": (a, b, "vertical"),
        "below": (b, a, "vertical"),
    }[relation]


def held_out_combinations(seed: int = DEFAULT_SEED) -> HeldOut:
    """Choose the held-out combinations of each task (see the module doc)."""
    rng = np.random.default_rng([seed, _HELD_OUT_STREAM])
    colors = [str(c) for c in rng.permutation(list(COLORS))]
    shape_order = [str(s) for s in rng.permutation(SHAPES)]
    color_shapes = {(color, shape_order[i % len(SHAPES)]) for i, color in enumerate(colors)}

    pairs = [frozenset(p) for p in itertools.combinations(SHAPES, 2)]
    target_pairs = round(HELD_OUT_FRACTION * len(pairs))
    shape_pairs: list[frozenset] = []
    for index in rng.permutation(len(pairs)):
        if len(shape_pairs) < target_pairs and not any(pairs[index] & p for p in shape_pairs):
            shape_pairs.append(pairs[index])

    shape_order = [str(s) for s in rng.permutation(SHAPES)]
    counts = {(shape_order[i % len(SHAPES)], count) for i, count in enumerate(COUNTS)}
    arrangements = set()
    for a, b in itertools.combinations(SHAPES, 2):
        first, second = (a, b) if rng.integers(2) else (b, a)
        arrangements.add((first, second, ("horizontal", "vertical")[rng.integers(2)]))

    candidates = []
    for a, b in itertools.combinations(SHAPES, 2):
        if frozenset((a, b)) in shape_pairs:
            continue
        for color_a, color_b in itertools.permutations(COLORS, 2):
            if (color_a, a) not in color_shapes and (color_b, b) not in color_shapes:
                candidates.append(frozenset(((color_a, a), (color_b, b))))
    chosen = rng.permutation(len(candidates))[: round(HELD_OUT_FRACTION * len(candidates))]
    return HeldOut(
        frozenset(color_shapes),
        frozenset(shape_pairs),
        frozenset(counts),
        frozenset(arrangements),
        frozenset(candidates[i] for i in chosen),
    )


def depicts_held_out(objects, held_out: HeldOut) -> bool:
    """Return whether `objects` show any held-out combination, in any relation.

    Each object needs `shape`, `color` and `box` like `shapes.ShapeObject`.
    """
    if any((obj.color, obj.shape) in held_out.color_shapes for obj in objects):
        return True
    counts = collections.Counter(obj.shape for obj in objects)
    if any((shape, count) in held_out.counts for shape, count in counts.items()):
        return True
    for a, b in itertools.permutations(objects, 2):
        if a.shape == b.shape:
            continue
        if frozenset((a.shape, b.shape)) in held_out.shape_pairs:
            return True
        if frozenset(((a.color, a.shape), (b.color, b.shape))) in held_out.color_pairs:
            return True
        # Threshold 0 finds every relation a slightly different rule could see.
        for relation in geneval.relative_position(a.box, b.box, threshold=0.0):
            if _arrangement(a.shape, relation, b.shape) in held_out.arrangements:
                return True
    return False


def caption_shows_held_out(task: str, combination: tuple, held_out: HeldOut) -> bool:
    """Return whether a caption shows a held-out combination, whatever the scene."""
    spec = make_spec(task, combination)
    spec_shapes = frozenset(clause.class_name for clause in spec.include)
    if len(spec_shapes) == 2 and spec_shapes in held_out.shape_pairs:
        return True
    if any((clause.color, clause.class_name) in held_out.color_shapes for clause in spec.include):
        return True
    if task == "counting":
        return combination in held_out.counts
    if task == "position":
        return _arrangement(*combination) in held_out.arrangements
    if task == "color_attr":
        return frozenset(combination) in held_out.color_pairs
    return False


def evaluation_metadata(seed: int = DEFAULT_SEED) -> list[dict[str, Any]]:
    """Return GenEval metadata of the held-out prompts of `seed`, grouped by task.

    single_object gets one prompt per shape, two_object and position both word
    orders of each held-out pair or arrangement, and color_attr one random
    word order of each held-out combination.
    """
    held_out = held_out_combinations(seed)
    rng = np.random.default_rng([seed, _METADATA_STREAM])
    combinations: list[tuple[str, tuple]] = [("single_object", (shape,)) for shape in SHAPES]
    for pair in sorted(tuple(sorted(pair)) for pair in held_out.shape_pairs):
        combinations += [("two_object", pair), ("two_object", pair[::-1])]
    combinations += [("counting", key) for key in sorted(held_out.counts)]
    combinations += [("colors", key) for key in sorted(held_out.color_shapes)]
    for first, second, axis in sorted(held_out.arrangements):
        forward, backward = ("left of", "right of") if axis == "horizontal" else ("above", "below")
        combinations += [("position", (first, forward, second))]
        combinations += [("position", (second, backward, first))]
    for pair in sorted(tuple(sorted(pair)) for pair in held_out.color_pairs):
        combinations.append(("color_attr", pair if rng.integers(2) else pair[::-1]))
    return [make_spec(task, combination).to_dict() for task, combination in combinations]


def write_evaluation_metadata(path: str, seed: int = DEFAULT_SEED) -> None:
    """Write `evaluation_metadata(seed)` to `path` as GenEval JSON lines."""
    specs = [geneval.spec_from_dict(fields) for fields in evaluation_metadata(seed)]
    with open(path, "w", encoding="utf-8") as f:
        for spec in specs:
            f.write(spec.to_json() + "\n")


def geneval_prompts_path(dataset_dir: str) -> str:
    """Return the GenEval metadata file that a build writes into `dataset_dir`."""
    return os.path.join(dataset_dir, GENEVAL_PROMPTS_FILE)
