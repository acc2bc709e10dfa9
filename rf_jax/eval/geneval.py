"""GenEval prompt metadata, its scoring rules, and per-task accuracy of generated images.

GenEval (Ghosh et al., 2023) scores a text-to-image model with an object
detector. Each prompt has metadata, one JSON object per line:

    {"tag": "position", "include": [{"class": "dog", "count": 1},
     {"class": "cat", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a cat right of a dog"}

The rules below follow `evaluation/evaluate_images.py` of
github.com/djghosh13/geneval (commit 16f1681):

- Detections of each class are ordered by score, highest first, and at most
  `MAX_OBJECTS_PER_CLASS` are kept.
- An `include` clause {class, count} needs at least `count` detections of the
  class. Colour and position are checked on the first `count` of them.
- `color`: each of those `count` detections has that colour.
- `position` [relation, index]: each of those detections is in `relation`
  to every detection matched by include clause `index`, which must itself
  have passed.
- An `exclude` clause {class, count} fails when `count` or more detections of
  the class exist. Counting prompts carry include N and exclude N + 1, so
  they need exactly N objects. Other tags have no exclude clause, so extra
  objects do not fail them.
- The accuracy of a task (tag) is the fraction of its images that are correct,
  and the overall score is the mean of the task accuracies.
"""

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:
    from rf_jax.eval import detector as detector_lib

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
# Fraction of the summed box sizes that is subtracted from the centre offset
# before a relation is decided, so that nearly aligned objects have none.
POSITION_THRESHOLD = 0.1
MAX_OBJECTS_PER_CLASS = 16
_PROMPT_KEYS = ("tag", "include", "exclude", "prompt")
_INCLUDE_KEYS = ("class", "count", "color", "position")
_EXCLUDE_KEYS = ("class", "count")


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One `include` or `exclude` clause of a prompt.

    Attributes:
        class_name: object class, e.g. "circle" or "dog".
        count: number of objects; at least this many for `include`, fewer than
            this many for `exclude`.
        color: required colour name of the objects, or None.
        position: (relation, index of an earlier include clause), or None.
    """

    class_name: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"class": self.class_name, "count": self.count}
        if self.color is not None:
            fields["color"] = self.color
        if self.position is not None:
            fields["position"] = [self.position[0], self.position[1]]
        return fields


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """GenEval metadata of one prompt."""

    tag: str
    prompt: str
    include: tuple[Requirement, ...]
    exclude: tuple[Requirement, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the metadata as a dict with GenEval's key order."""
        fields: dict[str, Any] = {
            "tag": self.tag,
            "include": [clause.to_dict() for clause in self.include],
        }
        if self.exclude:
            fields["exclude"] = [clause.to_dict() for clause in self.exclude]
        fields["prompt"] = self.prompt
        return fields

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def _check(condition: bool, where: str, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{where}: field {field!r} {message}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _parse_clause(fields: Any, where: str, field: str, keys: tuple[str, ...]) -> dict:
    _check(isinstance(fields, dict), where, field, f"must be a JSON object, got {fields!r}.")
    unknown = sorted(set(fields) - set(keys))
    _check(not unknown, where, field, f"has unknown keys {unknown}; allowed keys are {keys}.")
    class_name = fields.get("class")
    _check(
        isinstance(class_name, str) and class_name != "",
        where,
        f"{field}.class",
        f"must be a non-empty string, got {class_name!r}.",
    )
    _check(
        _is_count(fields.get("count")),
        where,
        f"{field}.count",
        f"must be a positive integer, got {fields.get('count')!r}.",
    )
    return fields


def _parse_include(fields: Any, where: str, index: int) -> Requirement:
    field = f"include[{index}]"
    fields = _parse_clause(fields, where, field, _INCLUDE_KEYS)
    color = fields.get("color")
    _check(
        color is None or (isinstance(color, str) and color != ""),
        where,
        f"{field}.color",
        f"must be a non-empty string, got {color!r}.",
    )
    position = fields.get("position")
    if position is not None:
        _check(
            isinstance(position, (list, tuple)) and len(position) == 2,
            where,
            f"{field}.position",
            f"must be [relation, index], got {position!r}.",
        )
        relation, target = position
        _check(
            relation in RELATIONS,
            where,
            f"{field}.position",
            f"has relation {relation!r}; expected one of {RELATIONS}.",
        )
        _check(
            isinstance(target, int) and not isinstance(target, bool) and 0 <= target < index,
            where,
            f"{field}.position",
            f"has index {target!r}, which must be an earlier include clause (0 to {index - 1}).",
        )
        position = (relation, target)
    return Requirement(fields["class"], fields["count"], color, position)


def spec_from_dict(fields: Any, where: str = "metadata") -> PromptSpec:
    """Check GenEval metadata of one prompt and convert it to a `PromptSpec`.

    Raises:
        ValueError: naming `where` and the first invalid field.
    """
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: expected a JSON object with {_PROMPT_KEYS}, got {fields!r}.")
    unknown = sorted(set(fields) - set(_PROMPT_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}; allowed fields are {_PROMPT_KEYS}.")
    tag = fields.get("tag")
    _check(tag in TASKS, where, "tag", f"must be one of {TASKS}, got {tag!r}.")
    prompt = fields.get("prompt")
    _check(
        isinstance(prompt, str) and prompt != "",
        where,
        "prompt",
        f"must be a non-empty string, got {prompt!r}.",
    )
    include = fields.get("include")
    _check(
        isinstance(include, list) and len(include) > 0,
        where,
        "include",
        f"must be a non-empty list of clauses, got {include!r}.",
    )
    exclude = fields.get("exclude", [])
    _check(isinstance(exclude, list), where, "exclude", f"must be a list, got {exclude!r}.")
    include_clauses = tuple(_parse_include(clause, where, i) for i, clause in enumerate(include))
    exclude_clauses = []
    for i, clause in enumerate(exclude):
        clause = _parse_clause(clause, where, f"exclude[{i}]", _EXCLUDE_KEYS)
        exclude_clauses.append(Requirement(clause["class"], clause["count"]))
    return PromptSpec(tag, prompt, include_clauses, tuple(exclude_clauses))


def parse_metadata(lines: Iterable[str], source: str = "metadata") -> list[PromptSpec]:
    """Parse GenEval metadata given as JSON lines; blank lines are skipped.

    Raises:
        ValueError: naming `source`, the 1-based line number and the field.
    """
    specs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e}). Each line must be one object.") from e
        specs.append(spec_from_dict(fields, where))
    return specs


def load_metadata(path: str) -> list[PromptSpec]:
    """Read a GenEval `evaluation_metadata.jsonl` file; see `parse_metadata`."""
    with open(path, encoding="utf-8") as f:
        return parse_metadata(f, path)


def relation_offset(
    box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD
) -> tuple[float, float]:
    """Return GenEval's shrunk centre offset of box A from box B, divided by the distance.

    Boxes are (x0, y0, x1, y1) with y growing downwards. Each axis of the
    offset between the centres shrinks towards 0 by `threshold` times the
    summed box sizes along that axis. Returns (0, 0) when both shrunk
    components are below 1e-3, so the boxes are too close for any relation.
    """
    # Plain floats: this runs for every pair of objects, where numpy's call
    # overhead dominates.
    ax0, ay0, ax1, ay1 = (float(v) for v in box_a)
    bx0, by0, bx1, by1 = (float(v) for v in box_b)
    offset = ((ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2)
    sizes = (abs(ax1 - ax0) + abs(bx1 - bx0), abs(ay1 - ay0) + abs(by1 - by0))
    shrunk = [
        math.copysign(max(abs(o) - threshold * size, 0.0), o) for o, size in zip(offset, sizes)
    ]
    if abs(shrunk[0]) < 1e-3 and abs(shrunk[1]) < 1e-3:
        return 0.0, 0.0
    distance = math.hypot(*offset)
    return shrunk[0] / distance, shrunk[1] / distance


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """Return the relations of box A to box B: a component beyond 0.5 sets one each way."""
    dx, dy = relation_offset(box_a, box_b, threshold)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _group_by_class(detections: Sequence[Any]) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for detection in detections:
        groups.setdefault(detection.class_name, []).append(detection)
    for name, group in groups.items():
        # A stable sort keeps the detector's order among equal scores.
        group.sort(key=lambda detection: -detection.score)
        groups[name] = group[:MAX_OBJECTS_PER_CLASS]
    return groups


def _position_failure(clause: Requirement, found: list, matched: list) -> str | None:
    relation, target = clause.position
    if matched[target] is None:
        return f"no matched {relation!r} target (include clause {target}) for {clause.class_name}"
    for detection in found:
        for other in matched[target]:
            relations = relative_position(detection.box, other.box)
            if relation not in relations:
                return (
                    f"expected {clause.class_name} {relation} {other.class_name}, found "
                    f"{sorted(relations) or 'no relation'}"
                )
    return None


def explain_image(spec: PromptSpec, detections: Sequence[Any]) -> tuple[bool, list[str]]:
    """Score one image by GenEval's rules; return (correct, reasons it failed)."""
    groups = _group_by_class(detections)
    reasons = []
    matched: list[list | None] = []
    for clause in spec.include:
        found = groups.get(clause.class_name, [])[: clause.count]
        failure = None
        if len(found) < clause.count:
            failure = f"expected at least {clause.count} {clause.class_name}, found {len(found)}"
        elif clause.color is not None:
            colors = [detection.color for detection in found]
            if colors.count(clause.color) < clause.count:
                failure = (
                    f"expected {clause.count} {clause.color} {clause.class_name}, found {colors}"
                )
        if failure is None and clause.position is not None:
            failure = _position_failure(clause, found, matched)
        if failure is not None:
            reasons.append(failure)
        matched.append(found if failure is None else None)
    for clause in spec.exclude:
        count = len(groups.get(clause.class_name, []))
        if count >= clause.count:
            reasons.append(f"expected fewer than {clause.count} {clause.class_name}, found {count}")
    return not reasons, reasons


def score_image(spec: PromptSpec, detections: Sequence[Any]) -> bool:
    """Return whether `detections` of one image satisfy `spec` by GenEval's rules."""
    return explain_image(spec, detections)[0]


def evaluate(
    specs: Sequence[PromptSpec],
    images_per_spec: Sequence[Sequence[np.ndarray]],
    detector: "detector_lib.Detector",
) -> dict[str, Any]:
    """Detect objects in generated images and compute GenEval accuracies.

    Args:
        specs: prompt metadata.
        images_per_spec: for each spec, its generated uint8 [height, width, 3]
            images; each spec needs at least one.
        detector: object with `detect(image) -> list of detections`.

    Returns:
        A dict with `tasks` (tag -> {"accuracy", "correct", "images", "prompts"},
        only for tags with images), `overall` (mean accuracy over those tags; a
        task without prompts is left out of the mean and listed in
        `missing_tasks`), `image_accuracy`, `prompt_accuracy` (fraction of
        prompts with at least one correct image), `images`, `prompts` and
        `correct_per_prompt`.

    Raises:
        ValueError: if the lengths disagree or a spec has no images.
    """
    if len(specs) != len(images_per_spec):
        raise ValueError(
            f"Got {len(specs)} specs but images for {len(images_per_spec)}; pass one "
            "list of images per spec."
        )
    if not specs:
        raise ValueError("No specs to evaluate; load them with load_metadata.")
    correct_per_prompt = []
    tasks: dict[str, dict[str, Any]] = {}
    for index, (spec, images) in enumerate(zip(specs, images_per_spec)):
        if len(images) == 0:
            raise ValueError(
                f"Spec {index} ({spec.prompt!r}) has no images; generate at least one."
            )
        correct = sum(score_image(spec, detector.detect(image)) for image in images)
        correct_per_prompt.append(int(correct))
        task = tasks.setdefault(spec.tag, {"correct": 0, "images": 0, "prompts": 0})
        task["correct"] += int(correct)
        task["images"] += len(images)
        task["prompts"] += 1
    for task in tasks.values():
        task["accuracy"] = task["correct"] / task["images"]
    total_images = sum(task["images"] for task in tasks.values())
    return {
        "tasks": {tag: tasks[tag] for tag in TASKS if tag in tasks},
        "overall": math.fsum(task["accuracy"] for task in tasks.values()) / len(tasks),
        "missing_tasks": [tag for tag in TASKS if tag not in tasks],
        "image_accuracy": sum(correct_per_prompt) / total_images,
        "prompt_accuracy": sum(count > 0 for count in correct_per_prompt) / len(specs),
        "images": total_images,
        "prompts": len(specs),
        "correct_per_prompt": correct_per_prompt,
    }
