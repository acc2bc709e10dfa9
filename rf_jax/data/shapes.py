"""Procedural scenes of coloured shapes, captioned in GenEval's six prompt templates.

Each scene shows one to four flat shapes on a grey background and is captioned
by one GenEval task, e.g. "a photo of three triangles" (counting) or "a photo
of a red circle and a blue square" (color_attr). A scene shows exactly the
objects of its caption, so a counting scene has exactly that count.

No training or test scene shows a held-out combination, in its caption or in
its pixels. `rf_jax.data.shapes_prompts` defines the captions, chooses the
held-out combinations and writes the GenEval metadata of their prompts.

Questions per scene: the colour of a shape that occurs once ("what color is
the circle?" -> "red"), a count ("how many squares are there?" -> "two", as a
word from "zero" to "four") and, for two different shapes in a clear
relation, their position ("where is the circle relative to the square?" ->
"left", "right", "above" or "below"). `Example.label` is the index of the
caption's task in `geneval.TASKS`.
"""

import collections
import dataclasses
import functools
import importlib.metadata
import math
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image
from PIL import ImageDraw

from rf_jax.data import records
from rf_jax.data.shapes_prompts import (
    COLORS,
    COUNTS,
    DEFAULT_SEED,
    NUMBER_WORDS,
    SHAPES,
    HeldOut,
    caption_shows_held_out,
    depicts_held_out,
    held_out_combinations,
    make_spec,
    plural,
)
from rf_jax.eval import geneval

NAME = "shapes"
# Bump when the scenes, captions or held-out combinations of a seed change,
# here or in `shapes_prompts`.
GENERATOR_VERSION = 1
BACKGROUND = (128, 128, 128)
# Area of each shape and the downward offset of its centroid from the box
# centre, both relative to a square bounding box of side 1. Triangles point up.
SHAPE_AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}
SHAPE_CENTROID_OFFSET = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "diamond": 0.0}
MAX_OBJECTS = 4
# Box side of an object as a fraction of the image side: 8 to 12 px at 32 px,
# at most 9.6 px when a scene has three or more objects.
MIN_SIZE, MAX_SIZE, CROWDED_MAX_SIZE = 0.25, 0.375, 0.3
# Minimum gap between boxes, and between a box and the border, as a fraction
# of the image side (3.2 px and 1.3 px at 32 px), so objects stay separate.
GAP, BORDER = 0.1, 0.04
SUPERSAMPLE = 4
SPLIT_SIZES = {"train": 20_000, "test": 1_000}
# A position in a caption is drawn with GenEval's shrunk, normalised offset at
# least 0.8 along its axis and at most 0.35 across it, well clear of the 0.5
# at which GenEval decides a relation.
_ALONG_MIN, _ACROSS_MAX = 0.8, 0.35
_ANSWER_WORDS = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
# Random streams of a seed, one per split. `shapes_prompts` uses streams 2 and 3.
_SPLIT_STREAMS = {"train": 0, "test": 1}
_PLACE_ATTEMPTS, _SPEC_ATTEMPTS, _SCENE_ATTEMPTS, _CANDIDATES = 200, 5, 1000, 64


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One shape; `center` (x, y, y down) and `size` (box side) are fractions of the image side."""

    shape: str
    color: str
    center: tuple[float, float]
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        half = self.size / 2
        return (
            self.center[0] - half,
            self.center[1] - half,
            self.center[0] + half,
            self.center[1] + half,
        )


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects of one image and the GenEval prompt (caption and task) they satisfy."""

    objects: tuple[ShapeObject, ...]
    spec: geneval.PromptSpec

    @property
    def caption(self) -> str:
        return self.spec.prompt


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple, fill) -> None:
    """Draw `shape` filling `box` (x0, y0, x1, y1) in pixels, pixel i covering [i, i + 1).

    The box snaps to whole pixels, as PIL would otherwise truncate it. PIL
    fills the pixels on or inside the outline, so the outline spans x0 to
    x1 - 1 to cover x1 - x0 pixels.
    """
    x0, y0, x1, y1 = (round(v) for v in box)
    x1, y1 = x1 - 1, y1 - 1
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "triangle":
        draw.polygon([(xm, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


def render(scene: Scene, image_size: int) -> np.ndarray:
    """Render `scene` supersampled and box-filtered down; returns uint8 [size, size, 3]."""
    canvas_size = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (canvas_size, canvas_size), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        draw_shape(draw, obj.shape, [v * canvas_size for v in obj.box], COLORS[obj.color])
    return np.asarray(canvas.resize((image_size, image_size), Image.BOX))


def _random_combination(task: str, rng: np.random.Generator) -> tuple:
    colors = list(COLORS)
    if task == "single_object":
        return (SHAPES[rng.integers(len(SHAPES))],)
    if task == "two_object":
        return tuple(str(s) for s in rng.choice(SHAPES, 2, replace=False))
    if task == "counting":
        return (SHAPES[rng.integers(len(SHAPES))], COUNTS[rng.integers(len(COUNTS))])
    if task == "colors":
        return (colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))])
    if task == "position":
        a, b = (str(s) for s in rng.choice(SHAPES, 2, replace=False))
        return (a, geneval.RELATIONS[rng.integers(len(geneval.RELATIONS))], b)
    a, b = (str(s) for s in rng.choice(SHAPES, 2, replace=False))
    color_a, color_b = (str(c) for c in rng.choice(colors, 2, replace=False))
    return ((color_a, a), (color_b, b))


def _clear_relation(box_a, box_b, relation: str) -> bool:
    """Return whether box A is in `relation` to box B with margin (see _ALONG_MIN)."""
    dx, dy = geneval.relation_offset(box_a, box_b)
    along, across = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
    sign = -1.0 if relation in ("left of", "above") else 1.0
    return sign * along >= _ALONG_MIN and abs(across) <= _ACROSS_MAX


def _place(items: list[tuple[str, str]], rng, fits: Callable) -> tuple[ShapeObject, ...] | None:
    """Place (shape, colour) items at random, each clear of the earlier ones by `GAP`.

    Item i takes the first of `_CANDIDATES` random boxes that is clear and for
    which `fits(i, box, earlier boxes)` holds. Returns None after
    `_PLACE_ATTEMPTS` failed attempts.
    """
    max_size = MAX_SIZE if len(items) <= 2 else CROWDED_MAX_SIZE
    for _ in range(_PLACE_ATTEMPTS):
        boxes: list[list[float]] = []
        for index in range(len(items)):
            sizes = rng.uniform(MIN_SIZE, max_size, (_CANDIDATES, 1))
            corners = BORDER + rng.random((_CANDIDATES, 2)) * (1 - 2 * BORDER - sizes)
            candidates = np.concatenate([corners, corners + sizes], axis=1)  # [candidates, 4]
            placed = np.asarray(boxes).reshape(-1, 4)
            # Gap between each candidate and each placed box: [candidates, placed].
            gaps = np.maximum.reduce(
                [
                    candidates[:, None, 0] - placed[None, :, 2],
                    placed[None, :, 0] - candidates[:, None, 2],
                    candidates[:, None, 1] - placed[None, :, 3],
                    placed[None, :, 1] - candidates[:, None, 3],
                ]
            )
            clear = candidates[np.all(gaps >= GAP, axis=1)].tolist()
            box = next((box for box in clear if fits(index, box, boxes)), None)
            if box is None:
                break
            boxes.append(box)
        if len(boxes) == len(items):
            return tuple(
                ShapeObject(shape, color, ((x0 + x1) / 2, (y0 + y1) / 2), x1 - x0)
                for (shape, color), (x0, y0, x1, y1) in zip(items, boxes)
            )
    return None


def _objects_for_spec(spec: geneval.PromptSpec, rng: np.random.Generator, held_out=None):
    """Place objects that satisfy `spec`; uncoloured ones get random colours.

    With `held_out`, the random colours skip held-out (colour, shape) pairs.

    Returns None when placement fails, which is rare for specs that pass the
    checks. Raises ValueError for specs no scene can satisfy.
    """
    clause_of = []  # include clause of each object, in clause order
    for index, clause in enumerate(spec.include):
        unknown_color = clause.color is not None and clause.color not in COLORS
        if clause.class_name not in SHAPES or unknown_color:
            requested = " ".join(word for word in (clause.color, clause.class_name) if word)
            raise ValueError(
                f"include[{index}] of {spec.prompt!r} requests {requested!r}, but this data "
                f"set draws only {SHAPES} in {list(COLORS)}."
            )
        clause_of += [index] * clause.count
    if len(clause_of) > MAX_OBJECTS:
        raise ValueError(f"{spec.prompt!r} needs {len(clause_of)} objects, above {MAX_OBJECTS}.")
    for clause in spec.exclude:
        drawn = sum(spec.include[i].class_name == clause.class_name for i in clause_of)
        if drawn >= clause.count:
            raise ValueError(f"{spec.prompt!r} includes and excludes {drawn} {clause.class_name}.")
    items = []
    for index in clause_of:
        shape, color = spec.include[index].class_name, spec.include[index].color
        if color is None:
            hidden = held_out.color_shapes if held_out is not None else frozenset()
            colors = [color for color in COLORS if (color, shape) not in hidden]
            color = colors[rng.integers(len(colors))]
        items.append((shape, color))

    def fits(index, box, earlier):
        # A position clause refers to an earlier clause, whose objects come first.
        position = spec.include[clause_of[index]].position
        if position is None:
            return True
        relation, target = position
        return all(
            _clear_relation(box, other, relation)
            for other, clause in zip(earlier, clause_of)
            if clause == target
        )

    return _place(items, rng, fits)


def scene_for_spec(spec: geneval.PromptSpec | dict[str, Any], rng: np.random.Generator) -> Scene:
    """Return a scene that satisfies GenEval metadata `spec`, held-out or not.

    Raises:
        ValueError: if `spec` requests shapes or colours this data set lacks, for
            more than `MAX_OBJECTS` objects, or for a count it also excludes.
        RuntimeError: if no placement was found (not seen for specs that pass).
    """
    if isinstance(spec, dict):
        spec = geneval.spec_from_dict(spec)
    for _ in range(_SPEC_ATTEMPTS):
        objects = _objects_for_spec(spec, rng)
        if objects is not None:
            return Scene(objects, spec)
    raise RuntimeError(f"Found no placement for {spec.prompt!r}; retry with another seed.")


def render_ground_truth(spec, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Render a random scene satisfying `spec`; returns uint8 [size, size, 3]."""
    return render(scene_for_spec(spec, rng), image_size)


def training_scene(task: str, rng: np.random.Generator, held_out: HeldOut) -> Scene:
    """Sample a scene of `task` that shows no held-out combination."""
    for _ in range(_SCENE_ATTEMPTS):
        combination = _random_combination(task, rng)
        if caption_shows_held_out(task, combination, held_out):
            continue
        spec = make_spec(task, combination)
        objects = _objects_for_spec(spec, rng, held_out)
        if objects is not None and not depicts_held_out(objects, held_out):
            return Scene(objects, spec)
    raise RuntimeError(f"Found no {task} scene without held-out combinations; check the seed.")


def questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Return up to three (question, answer) pairs about colour, count and position."""
    counts = collections.Counter(obj.shape for obj in scene.objects)
    unique = [obj for obj in scene.objects if counts[obj.shape] == 1]
    qa = []
    if unique:
        obj = unique[rng.integers(len(unique))]
        qa.append((f"what color is the {obj.shape}?", obj.color))
    # Three in four count questions ask about a shape in the scene.
    pool = sorted(counts) if rng.random() < 0.75 else SHAPES
    shape = pool[rng.integers(len(pool))]
    qa.append((f"how many {plural(shape)} are there?", NUMBER_WORDS[counts[shape]]))
    if len(scene.objects) == 2 and len(unique) == 2:
        a, b = unique if rng.integers(2) else unique[::-1]
        relations = geneval.relative_position(a.box, b.box)
        # Only a clear relation gets a question, so near-diagonal pairs get none.
        if len(relations) == 1 and _clear_relation(a.box, b.box, min(relations)):
            answer = _ANSWER_WORDS[relations.pop()]
            qa.append((f"where is the {a.shape} relative to the {b.shape}?", answer))
    return qa


def _examples(split: str, count: int, image_size: int, seed: int) -> Iterator[records.Example]:
    held_out = held_out_combinations(seed)
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], index])
        task = geneval.TASKS[index % len(geneval.TASKS)]
        scene = training_scene(task, rng, held_out)
        yield records.Example(
            image=render(scene, image_size),
            caption=scene.caption,
            qa=questions(scene, rng),
            label=geneval.TASKS.index(task),
        )


def load_splits(
    image_size: int, limit: int | None = None, seed: int = DEFAULT_SEED
) -> dict[str, records.SplitPlan]:
    """Plan the `train` (20,000) and `test` (1,000) splits, rendered lazily.

    Scene i of a split depends only on (seed, split, i), and the caption tasks
    cycle through `geneval.TASKS`, so both splits are balanced over tasks. Both
    splits show seen combinations only; the held-out ones are for generation
    (`shapes_prompts.evaluation_metadata`).

    Args:
        image_size: height and width in pixels, at least 16 (objects are then
            4 to 6 px wide; 32 px is the size the detector is tested at).
        limit: if set, keep only the first `limit` scenes of each split.
        seed: seed of the scenes and of the held-out combinations.
    """
    if image_size < 16:
        raise ValueError(f"image_size={image_size} is too small for shapes; use 16 or more.")
    plans = {}
    for split, size in SPLIT_SIZES.items():
        count = size if limit is None else min(size, limit)
        plans[split] = records.SplitPlan(
            num_examples=count,
            examples=functools.partial(_examples, split, count, image_size, seed),
        )
    return plans


def source_versions(seed: int = DEFAULT_SEED) -> dict[str, str]:
    """Return the generator version, seed and renderer version, for the manifest."""
    return {
        "shapes-generator": str(GENERATOR_VERSION),
        "seed": str(seed),
        "pillow": importlib.metadata.version("pillow"),
    }
