"""Image grids and image files."""

import io
import os

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError


def make_grid(images, columns=None, padding=2, background=255):
    """Tile uint8 images [n, h, w, 3] into one uint8 image [rows*h', cols*w', 3]."""
    images = np.asarray(images)
    count, height, width, channels = images.shape
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    grid = np.full(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
        background,
        np.uint8,
    )
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def save_png(image, path, scale=1):
    """Write a uint8 image [h, w, 3] as PNG, enlarged `scale` times with nearest neighbours.

    `path` may be local or on a bucket (gs://...).
    """
    picture = Image.fromarray(np.asarray(image, np.uint8))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())


def load_image(path, size):
    """Read an image file as uint8 [size, size, 3], transparent areas on white.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty or not a readable image.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"Image file {path} does not exist.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"Image file {path} is empty (0 bytes); pass a PNG or JPEG image.")
    try:
        with Image.open(path) as picture:
            picture.load()
            rgba = picture.convert("RGBA")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(
            f"Image file {path} could not be decoded ({error}); pass a valid PNG or JPEG image."
        ) from error
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    rgb = canvas.convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(rgb, np.uint8)
