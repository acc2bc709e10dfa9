"""Tests of GenEval metadata parsing, its scoring rules and the accuracy summary."""

import json

import numpy as np
import pytest

from rf_jax.eval import detector as detector_lib
from rf_jax.eval import geneval

# Lines in the format of GenEval's published evaluation_metadata.jsonl, one per tag.
GENEVAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], '
    '"prompt": "a photo of a bench"}',
    '{"tag": "two_object", "include": [{"class": "toaster", "count": 1}, '
    '{"class": "oven", "count": 1}], "prompt": "a photo of a toaster and an oven"}',
    '{"tag": "counting", "include": [{"class": "clock", "count": 3}], "exclude": '
    '[{"class": "clock", "count": 4}], "prompt": "a photo of three clocks"}',
    '{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "green"}], '
    '"prompt": "a photo of a green car"}',
    '{"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", '
    '"count": 1, "position": ["right of", 0]}], "prompt": "a photo of a cat right of a dog"}',
    '{"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "red"}, '
    '{"class": "vase", "count": 1, "color": "white"}], '
    '"prompt": "a photo of a red bus and a white vase"}',
]


def det(class_name, box, color="red", score=1.0):
    """A hand-made detection; the area is unused by the scoring rules."""
    return detector_lib.Detection(class_name, color, tuple(float(v) for v in box), 1.0, score)


def spec_of(line: str) -> geneval.PromptSpec:
    return geneval.parse_metadata([line])[0]


# ---------------------------------------------------------------- parsing


def test_parse_geneval_lines():
    specs = geneval.parse_metadata(GENEVAL_LINES)
    assert [spec.tag for spec in specs] == list(geneval.TASKS)
    assert specs[0].include == (geneval.Requirement("bench", 1),)
    assert specs[2].include == (geneval.Requirement("clock", 3),)
    assert specs[2].exclude == (geneval.Requirement("clock", 4),)
    assert specs[3].include[0].color == "green"
    assert specs[4].include[1].position == ("right of", 0)
    assert specs[4].prompt == "a photo of a cat right of a dog"


def test_spec_to_json_round_trip():
    for line in GENEVAL_LINES:
        assert spec_of(line).to_json() == line


def test_load_metadata_file_skips_blank_lines(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(GENEVAL_LINES) + "\n\n", encoding="utf-8")
    specs = geneval.load_metadata(str(path))
    assert len(specs) == len(GENEVAL_LINES)


# Each case: a malformed second line, and text the error must contain.
BAD_LINES = [
    ('{"tag": "colors", "include": [', "invalid JSON"),
    ('["single_object"]', "expected a JSON object"),
    ('{"include": [{"class": "cat", "count": 1}], "prompt": "a cat"}', "field 'tag'"),
    ('{"tag": "texture", "include": [{"class": "cat", "count": 1}], "prompt": "p"}', "'tag'"),
    ('{"tag": "colors", "include": [{"class": "cat", "count": 1}], "prompt": 3}', "'prompt'"),
    ('{"tag": "colors", "include": [], "prompt": "p"}', "field 'include'"),
    ('{"tag": "colors", "prompt": "p"}', "field 'include'"),
    ('{"tag": "colors", "include": [{"count": 1}], "prompt": "p"}', "'include[0].class'"),
    ('{"tag": "colors", "include": [{"class": "cat", "count": "2"}], "prompt": "p"}', "count"),
    ('{"tag": "colors", "include": [{"class": "cat", "count": 0}], "prompt": "p"}', "count"),
    ('{"tag": "colors", "include": [{"class": "cat", "count": true}], "prompt": "p"}', "count"),
    (
        '{"tag": "colors", "include": [{"class": "cat", "count": 1, "color": 5}], "prompt": "p"}',
        "color",
    ),
    (
        '{"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", '
        '"count": 1, "position": ["near", 0]}], "prompt": "p"}',
        "'include[1].position' has relation 'near'",
    ),
    (
        '{"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", '
        '"count": 1, "position": ["above", 1]}], "prompt": "p"}',
        "'include[1].position' has index 1",
    ),
    (
        '{"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", '
        '"count": 1, "position": ["above", -1]}], "prompt": "p"}',
        "has index -1",
    ),
    (
        '{"tag": "position", "include": [{"class": "cat", "count": 1, "position": "above"}], '
        '"prompt": "p"}',
        "'include[0].position' must be",
    ),
    (
        '{"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": {}, "prompt": "p"}',
        "'exclude'",
    ),
    (
        '{"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": '
        '[{"class": "cat", "count": 3, "color": "red"}], "prompt": "p"}',
        "'exclude[0]' has unknown keys",
    ),
    (
        '{"tag": "colors", "include": [{"class": "cat", "count": 1, "colour": "red"}], "prompt": "p"}',
        "unknown keys",
    ),
    (
        '{"tag": "colors", "include": [{"class": "cat", "count": 1}], "prompt": "p", "x": 1}',
        "unknown fields",
    ),
]


@pytest.mark.parametrize("bad_line, message", BAD_LINES)
def test_load_metadata_invalid_line(tmp_path, bad_line, message):
    path = tmp_path / "metadata.jsonl"
    path.write_text(GENEVAL_LINES[0] + "\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2") as error:
        geneval.load_metadata(str(path))
    assert message in str(error.value)


# ---------------------------------------------------------------- relations


def test_relative_position_axis_cases():
    # A 20 px left of B, equal 10 px boxes: shrunk offset -(20 - 0.1 * 20) = -18,
    # divided by the distance 20 gives -0.9.
    assert geneval.relation_offset((0, 0, 10, 10), (20, 0, 30, 10)) == pytest.approx((-0.9, 0.0))
    assert geneval.relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert geneval.relative_position((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    assert geneval.relative_position((0, 0, 10, 10), (0, 20, 10, 30)) == {"above"}
    assert geneval.relative_position((0, 20, 10, 30), (0, 0, 10, 10)) == {"below"}


def test_relative_position_diagonal_has_two():
    # Offset (-20, -20): each shrunk component is -18 / 28.28 = -0.64, beyond 0.5.
    relations = geneval.relative_position((0, 0, 10, 10), (20, 20, 30, 30))
    assert relations == {"left of", "above"}


def test_relative_position_margin():
    # Offset 1.5 px is below the margin 0.1 * (10 + 10) = 2 px, so no relation.
    assert geneval.relative_position((0, 0, 10, 10), (1.5, 0, 11.5, 10)) == set()
    # Offset (-10, -7): shrunk (-8, -5) / 12.21 = (-0.655, -0.41), so only left.
    dx, dy = geneval.relation_offset((0, 0, 10, 10), (10, 7, 20, 17))
    assert dx == pytest.approx(-8 / np.hypot(10, 7))
    assert dy == pytest.approx(-5 / np.hypot(10, 7))
    assert geneval.relative_position((0, 0, 10, 10), (10, 7, 20, 17)) == {"left of"}


# ---------------------------------------------------------------- scoring rules


def test_score_single_object():
    spec = spec_of(GENEVAL_LINES[0])
    assert geneval.score_image(spec, [det("bench", (0, 0, 5, 5))])
    # Extra objects do not fail a prompt without exclude clauses.
    assert geneval.score_image(spec, [det("bench", (0, 0, 5, 5)), det("cat", (9, 9, 12, 12))])
    assert not geneval.score_image(spec, [])
    assert not geneval.score_image(spec, [det("chair", (0, 0, 5, 5))])


def test_score_counting_exact():
    spec = spec_of(GENEVAL_LINES[2])
    clocks = [det("clock", (10 * i, 0, 10 * i + 5, 5)) for i in range(5)]
    assert not geneval.score_image(spec, clocks[:2])
    assert geneval.score_image(spec, clocks[:3])
    correct, reasons = geneval.explain_image(spec, clocks[:4])
    assert not correct
    assert reasons == ["expected fewer than 4 clock, found 4"]


def test_score_two_object():
    spec = spec_of(GENEVAL_LINES[1])
    toaster, oven = det("toaster", (0, 0, 5, 5)), det("oven", (10, 0, 15, 5))
    assert geneval.score_image(spec, [oven, toaster])
    assert not geneval.score_image(spec, [toaster, toaster])


def test_score_color_checks_most_confident():
    spec = spec_of(GENEVAL_LINES[3])
    assert geneval.score_image(spec, [det("car", (0, 0, 5, 5), "green")])
    assert not geneval.score_image(spec, [det("car", (0, 0, 5, 5), "blue")])
    # Only the highest-scored car (count 1) is checked for its colour.
    blue_first = [det("car", (0, 0, 5, 5), "blue", 0.9), det("car", (9, 0, 14, 5), "green", 0.4)]
    assert not geneval.score_image(spec, blue_first)
    green_first = [det("car", (0, 0, 5, 5), "blue", 0.4), det("car", (9, 0, 14, 5), "green", 0.9)]
    assert geneval.score_image(spec, green_first)


def test_score_color_attr_binding():
    spec = spec_of(GENEVAL_LINES[5])
    assert geneval.score_image(
        spec, [det("bus", (0, 0, 5, 5), "red"), det("vase", (9, 0, 14, 5), "white")]
    )
    assert not geneval.score_image(
        spec, [det("bus", (0, 0, 5, 5), "white"), det("vase", (9, 0, 14, 5), "red")]
    )


def test_score_position_rules():
    spec = spec_of(GENEVAL_LINES[4])
    dog_left, cat_right = det("dog", (0, 0, 10, 10)), det("cat", (20, 0, 30, 10))
    assert geneval.score_image(spec, [dog_left, cat_right])
    assert not geneval.score_image(spec, [det("dog", (20, 0, 30, 10)), det("cat", (0, 0, 10, 10))])
    # Cat 1.5 px right of the dog: within the 2 px margin, so no relation.
    assert not geneval.score_image(spec, [dog_left, det("cat", (1.5, 0, 11.5, 10))])
    # Diagonal down-right still counts as "right of".
    assert geneval.score_image(spec, [dog_left, det("cat", (20, 20, 30, 30))])
    # A lower-scored second dog on the cat's right is outside the count-1 target group.
    extra_dog = det("dog", (40, 0, 50, 10), score=0.5)
    assert geneval.score_image(spec, [dog_left, cat_right, extra_dog])


def test_score_position_without_target():
    spec = spec_of(GENEVAL_LINES[4])
    correct, reasons = geneval.explain_image(spec, [det("cat", (20, 0, 30, 10))])
    assert not correct
    assert "expected at least 1 dog, found 0" in reasons
    assert any("no matched 'right of' target" in reason for reason in reasons)


def test_score_exclude_capped_at_max_objects():
    # GenEval keeps at most 16 detections per class, so "fewer than 17" holds for 20.
    spec = geneval.spec_from_dict(
        {
            "tag": "counting",
            "include": [{"class": "cat", "count": 1}],
            "exclude": [{"class": "cat", "count": geneval.MAX_OBJECTS_PER_CLASS + 1}],
            "prompt": "p",
        }
    )
    cats = [det("cat", (i, 0, i + 1, 1)) for i in range(20)]
    assert geneval.score_image(spec, cats)


# ---------------------------------------------------------------- evaluate


class TableDetector:
    """Returns the detections listed for the value of the image's first pixel."""

    def __init__(self, table):
        self.table = table

    def detect(self, image):
        return self.table[int(image[0, 0, 0])]


def image_with_id(index: int) -> np.ndarray:
    return np.full((4, 4, 3), index, np.uint8)


def test_evaluate_accuracies():
    specs = geneval.parse_metadata(GENEVAL_LINES[:3])
    table = {
        0: [det("bench", (0, 0, 1, 1))],
        1: [],
        2: [det("toaster", (0, 0, 1, 1)), det("oven", (5, 0, 6, 1))],
        3: [det("clock", (i, 0, i + 1, 1)) for i in range(3)],
        4: [det("clock", (i, 0, i + 1, 1)) for i in range(4)],
    }
    images = [
        [image_with_id(0), image_with_id(1)],
        [image_with_id(2)] * 3,
        [image_with_id(3), image_with_id(4)],
    ]
    result = geneval.evaluate(specs, images, TableDetector(table))
    assert result["tasks"]["single_object"] == {
        "correct": 1,
        "images": 2,
        "prompts": 1,
        "accuracy": 0.5,
    }
    assert result["tasks"]["two_object"]["accuracy"] == 1.0
    assert result["tasks"]["counting"]["accuracy"] == 0.5
    # Overall is the mean over tasks (0.5 + 1 + 0.5) / 3, not over images (5 / 7).
    assert result["overall"] == pytest.approx(2 / 3)
    assert result["image_accuracy"] == pytest.approx(5 / 7)
    assert result["prompt_accuracy"] == 1.0
    assert result["missing_tasks"] == ["colors", "position", "color_attr"]
    assert result["correct_per_prompt"] == [1, 3, 1]
    assert result["images"] == 7


def test_evaluate_rejects_mismatched_inputs():
    specs = geneval.parse_metadata(GENEVAL_LINES[:2])
    detector = TableDetector({0: []})
    with pytest.raises(ValueError, match="one list of images per spec"):
        geneval.evaluate(specs, [[image_with_id(0)]], detector)
    with pytest.raises(ValueError, match="has no images"):
        geneval.evaluate(specs, [[image_with_id(0)], []], detector)
    with pytest.raises(ValueError, match="No specs"):
        geneval.evaluate([], [], detector)


def test_metadata_line_is_plain_json():
    # A spec written by to_json reads back with the standard json module as GenEval does.
    fields = json.loads(spec_of(GENEVAL_LINES[4]).to_json())
    assert fields["include"][1]["position"] == ["right of", 0]
