"""Object detection for GenEval scoring of generated shape images.

`ShapeDetector` reads images of the `shapes` data set with plain image
analysis, no learned weights:

1. Foreground: pixels farther than `foreground_threshold` (RGB distance on
   0..255) from the background colour, grouped into 8-connected components.
2. Colour: the mean of a component's most saturated pixels (those within 85%
   of its 95th-percentile distance from the background) is matched to the
   nearest palette colour. Components farther than `color_threshold` from every
   palette colour are rejected as unknown.
3. Coverage: each pixel's fraction of object colour (alpha) is its projection
   onto the line from the background to the palette colour, so anti-aliased,
   blurred and noisy edges count by how much of the pixel the object covers.
4. Shape: for each shape, a template with the component's covered area and
   centroid is rendered the way the data set draws it. The template closest to
   the coverage in squared error wins, and its box is the detection's box.
   Components below `min_area_fraction` of the image are dropped.

The score of a detection is 1 - the normalised squared error of the template,
from 0 (no overlap) to 1 (exact). Detections below `min_score` are dropped.
"""

import dataclasses
from typing import Protocol

import numpy as np
from PIL import Image
from PIL import ImageDraw
import scipy.ndimage

from rf_jax.data import shapes

# Template supersampling per pixel, and the margin in pixels around a
# component that its coverage and templates are compared over.
_TEMPLATE_SUPERSAMPLE = 8
_WINDOW_MARGIN = 3


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        class_name: shape name, e.g. "circle".
        color: colour name, e.g. "red".
        box: (x0, y0, x1, y1) in pixels, pixel i covering [i, i + 1), y down.
        area: covered area in pixels (sum of the object's coverage).
        score: confidence in [0, 1]; GenEval checks the highest-scored first.
    """

    class_name: str
    color: str
    box: tuple[float, float, float, float]
    area: float
    score: float = 1.0

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


class Detector(Protocol):
    """Anything that finds objects in an RGB image."""

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Return the objects in uint8 [height, width, 3] `image`."""


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"Expected a uint8 [height, width, 3] RGB image, got {image.dtype} "
            f"{list(image.shape)}. Convert generated images with np.uint8 and drop alpha."
        )
    return image


def _template(shape: str, box: tuple, window_shape: tuple[int, int]) -> np.ndarray:
    """Render the coverage of `shape` filling `box` (window pixels); returns float [h, w]."""
    height, width = window_shape
    scale = _TEMPLATE_SUPERSAMPLE
    canvas = Image.new("L", (width * scale, height * scale), 0)
    shapes.draw_shape(ImageDraw.Draw(canvas), shape, [v * scale for v in box], 255)
    return np.asarray(canvas.resize((width, height), Image.BOX), np.float32) / 255.0


class ShapeDetector:
    """Detector for the `shapes` data set (see the module doc).

    Args:
        palette: colour name -> RGB on 0..255.
        background: RGB of the background.
        foreground_threshold: RGB distance from the background above which a
            pixel is foreground. 40 is about 3 times the typical distance that
            Gaussian noise of sigma 8 adds, and under half the distance of the
            dullest palette colour (purple, 97).
        color_threshold: maximum RGB distance between a component's colour and
            its palette colour; the closest palette colours (orange and
            yellow) are 88 apart.
        min_area_fraction: minimum covered area, as a fraction of the image. At
            0.01 (10 px at 32 px) it is a third of the smallest drawn object.
        min_score: minimum template score.
        blur_sigmas: Gaussian blur standard deviations in pixels that each
            template is also tried with, so blurred images match blurred
            templates.
    """

    def __init__(
        self,
        palette: dict[str, tuple[int, int, int]] | None = None,
        background: tuple[int, int, int] = shapes.BACKGROUND,
        foreground_threshold: float = 40.0,
        color_threshold: float = 70.0,
        min_area_fraction: float = 0.01,
        min_score: float = 0.5,
        blur_sigmas: tuple[float, ...] = (0.0, 0.5, 0.8, 1.1, 1.4),
    ):
        palette = dict(shapes.COLORS if palette is None else palette)
        if not palette:
            raise ValueError("palette is empty; pass colour name -> RGB pairs.")
        self._color_names = list(palette)
        self._palette = np.asarray([palette[name] for name in self._color_names], np.float32)
        self._background = np.asarray(background, np.float32)
        self.foreground_threshold = foreground_threshold
        self.color_threshold = color_threshold
        self.min_area_fraction = min_area_fraction
        self.min_score = min_score
        self.blur_sigmas = blur_sigmas

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Return the shapes in uint8 [height, width, 3] `image`, ordered by score."""
        image = _check_image(image)
        difference = image.astype(np.float32) - self._background  # [height, width, 3]
        distance = np.linalg.norm(difference, axis=-1)
        labels, _ = scipy.ndimage.label(
            distance > self.foreground_threshold, structure=np.ones((3, 3), bool)
        )
        min_area = self.min_area_fraction * image.shape[0] * image.shape[1]
        detections = []
        for index, window in enumerate(scipy.ndimage.find_objects(labels), start=1):
            detection = self._detect_component(difference, distance, labels, index, window)
            if detection is not None and detection.area >= min_area:
                if detection.score >= self.min_score:
                    detections.append(detection)
        return sorted(detections, key=lambda detection: -detection.score)

    def _component_color(self, difference, distance, mask) -> int | None:
        """Return the palette index of the component in `mask`, or None if unknown."""
        distances = distance[mask]
        core = distances >= 0.85 * np.percentile(distances, 95)
        color = self._background + difference[mask][core].mean(axis=0)
        errors = np.linalg.norm(self._palette - color, axis=-1)
        best = int(np.argmin(errors))
        return best if errors[best] <= self.color_threshold else None

    def _detect_component(self, difference, distance, labels, index, window):
        # Window: the component's bounding box plus a margin, clipped to the image.
        height, width = labels.shape
        top = max(window[0].start - _WINDOW_MARGIN, 0)
        left = max(window[1].start - _WINDOW_MARGIN, 0)
        bottom = min(window[0].stop + _WINDOW_MARGIN, height)
        right = min(window[1].stop + _WINDOW_MARGIN, width)
        crop = np.s_[top:bottom, left:right]
        mask = labels[crop] == index
        color = self._component_color(difference[crop], distance[crop], mask)
        if color is None:
            return None

        # Coverage over the component and a one-pixel ring around it, leaving
        # out pixels of other components.
        direction = self._palette[color] - self._background
        alpha = difference[crop] @ direction / float(direction @ direction)
        region = scipy.ndimage.binary_dilation(mask, np.ones((3, 3), bool), iterations=2)
        region &= (labels[crop] == 0) | mask
        alpha = np.where(region, np.clip(alpha, 0.0, 1.25), 0.0)
        area = float(alpha.sum())
        if area <= 0:
            return None
        rows, cols = np.indices(alpha.shape)
        center_y = float((alpha * (rows + 0.5)).sum()) / area
        center_x = float((alpha * (cols + 0.5)).sum()) / area

        best = None
        for shape in shapes.SHAPES:
            side = float(np.sqrt(area / shapes.SHAPE_AREA[shape]))
            box_y = center_y - shapes.SHAPE_CENTROID_OFFSET[shape] * side
            box = (center_x - side / 2, box_y - side / 2, center_x + side / 2, box_y + side / 2)
            sharp = _template(shape, box, alpha.shape)
            for sigma in self.blur_sigmas:
                template = scipy.ndimage.gaussian_filter(sharp, sigma, mode="constant")
                error = float(((alpha - template) ** 2).sum())
                score = 1.0 - error / max(float((alpha**2).sum() + (template**2).sum()), 1e-6)
                if best is None or score > best[0]:
                    best = (score, shape, box)
        score, shape, box = best
        image_box = (box[0] + left, box[1] + top, box[2] + left, box[3] + top)
        return Detection(shape, self._color_names[color], image_box, area, score)
