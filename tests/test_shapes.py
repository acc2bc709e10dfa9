"""Tests of the shapes data set and of the detector that scores it by GenEval's rules."""

import collections
import json
import math
import os

import numpy as np
from PIL import Image
from PIL import ImageFilter
import pytest

from rf_jax.data import build
from rf_jax.data import records
from rf_jax.data import shapes
from rf_jax.data import shapes_prompts
from rf_jax.eval import detector as detector_lib
from rf_jax.eval import geneval

IMAGE_SIZE = 32
# Enough training scenes to meet every seen combination of a task several times.
NUM_SCENES = 1200
# Ground-truth renders per task for the detector accuracy checks.
IMAGES_PER_TASK = 48


@pytest.fixture(scope="module")
def held_out():
    return shapes_prompts.held_out_combinations(shapes.DEFAULT_SEED)


@pytest.fixture(scope="module")
def train_scenes(held_out):
    """The scenes behind the first NUM_SCENES training examples, without rendering."""
    scenes = []
    for index in range(NUM_SCENES):
        rng = np.random.default_rng([shapes.DEFAULT_SEED, 0, index])
        task = geneval.TASKS[index % len(geneval.TASKS)]
        scenes.append(shapes.training_scene(task, rng, held_out))
    return scenes


@pytest.fixture(scope="module")
def eval_specs():
    return [geneval.spec_from_dict(fields) for fields in shapes_prompts.evaluation_metadata()]


def oracle_detections(scene: shapes.Scene, image_size: int = IMAGE_SIZE):
    """Detections read off the scene geometry, as a perfect detector would report them."""
    detections = []
    for obj in scene.objects:
        box = tuple(v * image_size for v in obj.box)
        area = shapes.SHAPE_AREA[obj.shape] * (obj.size * image_size) ** 2
        detections.append(detector_lib.Detection(obj.shape, obj.color, box, area))
    return detections


# ---------------------------------------------------------------- rendering


def test_render_colors_and_area():
    square = shapes.ShapeObject("square", "red", (0.5, 0.5), 0.375)
    scene = shapes.Scene((square,), shapes_prompts.make_spec("colors", ("red", "square")))
    image = shapes.render(scene, IMAGE_SIZE)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert image.dtype == np.uint8
    assert tuple(image[0, 0]) == shapes.BACKGROUND
    assert tuple(image[16, 16]) == shapes.COLORS["red"]
    # Red fraction of each pixel from its green channel (red 35, background 128);
    # the square is 12 px wide, so 144 px. Edges snap to quarter pixels when
    # supersampled, so the tolerance is one quarter pixel around the outline.
    coverage = (128.0 - image[..., 1]) / (128.0 - 35.0)
    assert coverage.sum() == pytest.approx(144.0, abs=4 * 12 * 0.25)


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_render_shape_area_at_64px(shape):
    obj = shapes.ShapeObject(shape, "white", (0.5, 0.5), 0.375)
    spec = shapes_prompts.make_spec("single_object", (shape,))
    image = shapes.render(shapes.Scene((obj,), spec), 64)
    coverage = (image[..., 0].astype(np.float64) - 128.0) / (250.0 - 128.0)
    side = 0.375 * 64
    # Reference: the analytic area of the shape in a 24 px box. Supersampling
    # snaps each edge by up to 1/8 px, so the area is off by at most 1/8 px
    # times the outline (under 4 * 24 px). The tolerance doubles that, because
    # PIL also fills the pixels on the outline.
    assert coverage.sum() == pytest.approx(shapes.SHAPE_AREA[shape] * side**2, abs=24.0)


# ---------------------------------------------------------------- captions, QA, held-out


def test_train_scenes_satisfy_captions(train_scenes):
    for scene in train_scenes:
        assert geneval.score_image(scene.spec, oracle_detections(scene)), scene.caption


def test_counting_scenes_have_exact_count(train_scenes):
    for scene in train_scenes:
        if scene.spec.tag == "counting":
            words = scene.caption.split()
            assert len(scene.objects) == shapes.NUMBER_WORDS.index(words[3])
            assert {obj.shape + "s" for obj in scene.objects} == {words[4]}


def test_train_tasks_balanced(train_scenes):
    counts = collections.Counter(scene.spec.tag for scene in train_scenes)
    assert set(counts.values()) == {NUM_SCENES // len(geneval.TASKS)}


def test_question_answers(train_scenes):
    rng = np.random.default_rng(0)
    for scene in train_scenes[:300]:
        for question, answer in shapes.questions(scene, rng):
            words = question.rstrip("?").split()
            if question.startswith("what color is the"):
                assert answer == next(o.color for o in scene.objects if o.shape == words[-1])
            elif question.startswith("how many"):
                count = sum(o.shape + "s" == words[2] for o in scene.objects)
                assert answer == shapes.NUMBER_WORDS[count]
            else:
                a = next(o for o in scene.objects if o.shape == words[3])
                b = next(o for o in scene.objects if o.shape == words[-1])
                dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
                expected = {"left": dx < 0, "right": dx > 0, "above": dy < 0, "below": dy > 0}
                assert expected[answer], (question, answer)


def test_train_never_shows_held_out(train_scenes, eval_specs):
    """Check the evaluation prompts against what the training scenes show."""
    seen_colors, seen_pairs, seen_counts, seen_captions = set(), set(), set(), set()
    seen_color_pairs = set()
    for scene in train_scenes:
        seen_captions.add(scene.caption)
        seen_colors |= {(o.color, o.shape) for o in scene.objects}
        counts = collections.Counter(o.shape for o in scene.objects)
        seen_counts |= set(counts.items())
        if len(counts) == 2:
            a, b = scene.objects
            seen_pairs.add(frozenset((a.shape, b.shape)))
            seen_color_pairs.add(frozenset(((a.color, a.shape), (b.color, b.shape))))
    for spec in eval_specs:
        include = spec.include
        if spec.tag == "single_object":
            assert spec.prompt in seen_captions
            continue
        assert spec.prompt not in seen_captions
        if spec.tag == "two_object":
            assert frozenset(c.class_name for c in include) not in seen_pairs
        elif spec.tag == "counting":
            assert (include[0].class_name, include[0].count) not in seen_counts
        elif spec.tag == "colors":
            assert (include[0].color, include[0].class_name) not in seen_colors
        elif spec.tag == "color_attr":
            combination = frozenset((c.color, c.class_name) for c in include)
            assert combination not in seen_color_pairs


def test_train_position_mirror_not_held_out(train_scenes, eval_specs):
    # "a left of b" and "b right of a" are the same arrangement, so neither
    # wording of a held-out one appears in training.
    mirror = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    held_out_positions = set()
    for spec in eval_specs:
        if spec.tag == "position":
            b, a = spec.include[0].class_name, spec.include[1].class_name
            relation = spec.include[1].position[0]
            held_out_positions |= {(a, relation, b), (b, mirror[relation], a)}
    for scene in train_scenes:
        if scene.spec.tag == "position":
            b, a = scene.spec.include[0].class_name, scene.spec.include[1].class_name
            assert (a, scene.spec.include[1].position[0], b) not in held_out_positions


def test_eval_prompts_per_tag(eval_specs):
    counts = collections.Counter(spec.tag for spec in eval_specs)
    # 4 shapes; 2 held-out pairs x 2 orders; 3 (shape, count); 8 (colour, shape);
    # 6 arrangements x 2 wordings; a quarter of the 128 seen colour pairs.
    assert counts == {
        "single_object": 4,
        "two_object": 4,
        "counting": 3,
        "colors": 8,
        "position": 12,
        "color_attr": 32,
    }


def test_write_evaluation_metadata(tmp_path):
    path = str(tmp_path / "prompts.jsonl")
    shapes_prompts.write_evaluation_metadata(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    expected = shapes_prompts.evaluation_metadata()
    assert [json.loads(line) for line in lines] == expected
    assert lines[0] == json.dumps(expected[0])
    assert len(geneval.load_metadata(path)) == len(expected)


# ---------------------------------------------------------------- determinism and build


def test_load_splits_deterministic():
    first = list(shapes.load_splits(IMAGE_SIZE, limit=12)["train"].examples())
    second = list(shapes.load_splits(IMAGE_SIZE, limit=12)["train"].examples())
    other = list(shapes.load_splits(IMAGE_SIZE, limit=12, seed=1)["train"].examples())
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.image, b.image)
        assert (a.caption, a.qa, a.label) == (b.caption, b.qa, b.label)
    assert [a.caption for a in first] != [c.caption for c in other]
    assert shapes_prompts.evaluation_metadata(0) == shapes_prompts.evaluation_metadata(0)
    assert shapes_prompts.held_out_combinations(0) != shapes_prompts.held_out_combinations(1)


def test_load_splits_sizes_and_labels():
    plans = shapes.load_splits(IMAGE_SIZE)
    assert plans["train"].num_examples == 20_000
    assert plans["test"].num_examples == 1_000
    examples = list(shapes.load_splits(IMAGE_SIZE, limit=6)["test"].examples())
    assert [example.label for example in examples] == list(range(6))
    with pytest.raises(ValueError, match="image_size=8"):
        shapes.load_splits(8)


def test_build_writes_prompts(tmp_path):
    root = str(tmp_path)
    manifest = build.build_dataset("shapes", root, IMAGE_SIZE, 128, limit=12)
    directory = records.dataset_path(root, "shapes", IMAGE_SIZE)
    assert manifest.source_versions["shapes-generator"] == str(shapes.GENERATOR_VERSION)
    assert manifest.source_versions["seed"] == str(shapes.DEFAULT_SEED)
    specs = geneval.load_metadata(shapes_prompts.geneval_prompts_path(directory))
    assert [spec.to_dict() for spec in specs] == shapes_prompts.evaluation_metadata()
    example = records.RecordSource(directory, manifest, "train")[1]
    assert example.caption.startswith("a photo of a")
    assert example.label == 1

    # A build from another generator version is replaced, not reused.
    path = os.path.join(directory, records.MANIFEST_FILE)
    with open(path, encoding="utf-8") as f:
        fields = json.load(f)
    fields["source_versions"]["shapes-generator"] = "0"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(fields, f)
    rebuilt = build.build_dataset("shapes", root, IMAGE_SIZE, 128, limit=12)
    assert rebuilt.source_versions["shapes-generator"] == str(shapes.GENERATOR_VERSION)


def test_scene_for_spec_rejects_impossible():
    rng = np.random.default_rng(0)
    dog = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "p"}
    with pytest.raises(ValueError, match="requests 'dog', but this data set draws only"):
        shapes.scene_for_spec(dog, rng)
    five = {"tag": "counting", "include": [{"class": "circle", "count": 5}], "prompt": "p"}
    with pytest.raises(ValueError, match="needs 5 objects, above 4"):
        shapes.scene_for_spec(five, rng)
    spec = {
        "tag": "counting",
        "include": [{"class": "circle", "count": 2}],
        "exclude": [{"class": "circle", "count": 2}],
        "prompt": "p",
    }
    with pytest.raises(ValueError, match="includes and excludes"):
        shapes.scene_for_spec(spec, rng)


# ---------------------------------------------------------------- detector


def add_noise(image, rng):
    return np.clip(image + rng.normal(0.0, 8.0, image.shape), 0, 255).astype(np.uint8)


def blur(image, rng):
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.7)))


def detector_accuracy(eval_specs, corrupt, seed):
    """GenEval accuracy per task of ground-truth renders of the evaluation prompts."""
    rng = np.random.default_rng(seed)
    by_tag = collections.defaultdict(list)
    for spec in eval_specs:
        by_tag[spec.tag].append(spec)
    specs, images = [], []
    for tag, tag_specs in by_tag.items():
        per_spec = math.ceil(IMAGES_PER_TASK / len(tag_specs))
        for spec in tag_specs:
            renders = [shapes.render_ground_truth(spec, IMAGE_SIZE, rng) for _ in range(per_spec)]
            specs.append(spec)
            images.append([corrupt(image, rng) for image in renders])
    result = geneval.evaluate(specs, images, detector_lib.ShapeDetector())
    return {tag: task["accuracy"] for tag, task in result["tasks"].items()}


@pytest.mark.parametrize(
    "corrupt",
    [lambda image, rng: image, add_noise, blur],
    ids=["clean", "noise", "blur"],
)
def test_detector_accuracy_per_task(eval_specs, corrupt):
    accuracy = detector_accuracy(eval_specs, corrupt, seed=1)
    assert set(accuracy) == set(geneval.TASKS)
    for tag, value in accuracy.items():
        # Required floor for a detector that GenEval scores can be trusted with.
        assert value >= 0.98, (tag, accuracy)


def test_detector_boxes_match_scene():
    rng = np.random.default_rng(2)
    detector = detector_lib.ShapeDetector()
    for index in range(40):
        shape = shapes.SHAPES[index % len(shapes.SHAPES)]
        scene = shapes.scene_for_spec(shapes_prompts.make_spec("counting", (shape, 3)), rng)
        detections = detector.detect(shapes.render(scene, IMAGE_SIZE))
        assert len(detections) == 3
        for expected in oracle_detections(scene):
            got = min(detections, key=lambda d: math.dist(d.center, expected.center))
            assert got.class_name == expected.class_name
            assert got.color == expected.color
            # The renderer snaps every edge to a quarter pixel (its supersampling
            # step), so the template box may sit up to a quarter pixel off per
            # side, plus estimation error: half a pixel in all.
            np.testing.assert_allclose(got.box, expected.box, atol=0.5)
            # Area: the same snapping moves each edge by up to 1/8 px, which
            # changes the area by at most perimeter / 8 <= side / 2; 3/4 px per
            # side of box leaves room for PIL filling pixels on the outline.
            side = expected.box[2] - expected.box[0]
            assert got.area == pytest.approx(expected.area, abs=0.75 * side)


def wrong_cases():
    """(rendered spec, scored spec) pairs where every image must be scored incorrect."""
    make = shapes_prompts.make_spec
    return [
        (make("colors", ("blue", "circle")), make("colors", ("red", "circle"))),
        (make("counting", ("triangle", 2)), make("counting", ("triangle", 3))),
        (make("counting", ("triangle", 4)), make("counting", ("triangle", 3))),
        (make("single_object", ("diamond",)), make("single_object", ("triangle",))),
        (make("single_object", ("circle",)), make("single_object", ("square",))),
        (
            make("position", ("circle", "left of", "square")),
            make("position", ("circle", "right of", "square")),
        ),
        (
            make("color_attr", (("red", "circle"), ("blue", "square"))),
            make("color_attr", (("blue", "circle"), ("red", "square"))),
        ),
    ]


@pytest.mark.parametrize("rendered, scored", wrong_cases(), ids=lambda spec: spec.prompt)
def test_detector_rejects_wrong_scene(rendered, scored):
    rng = np.random.default_rng(3)
    detector = detector_lib.ShapeDetector()
    for _ in range(20):
        image = add_noise(blur(shapes.render_ground_truth(rendered, IMAGE_SIZE, rng), rng), rng)
        assert not geneval.score_image(scored, detector.detect(image))


def test_detector_ignores_unknown_colors_and_specks():
    detector = detector_lib.ShapeDetector()
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), shapes.BACKGROUND, np.uint8)
    assert detector.detect(image) == []
    image[4:14, 4:14] = (0, 230, 230)  # cyan, far from every palette colour
    image[20, 20] = shapes.COLORS["red"]  # one pixel, below the minimum area
    assert detector.detect(image) == []
    image[18:28, 18:28] = shapes.COLORS["green"]
    assert [(d.class_name, d.color) for d in detector.detect(image)] == [("square", "green")]


def test_detector_rejects_bad_images():
    detector = detector_lib.ShapeDetector()
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[32, 32\]"):
        detector.detect(np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8))
