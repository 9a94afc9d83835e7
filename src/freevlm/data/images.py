"""Reading dataset files from disk: images, and the annotation JSON every loader parses.

Both live here so that every loader fails the same way on bad input: one FreeVLMError whose single line names the
file and, for JSON, the missing key and where it was expected.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from freevlm.errors import FreeVLMError


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB image, with 16-bit greyscale scaled to 8 bits (value / 257). PIL's `convert("RGB")` clips 16-bit
    values at 255, so a 16-bit PNG would come out (almost) all white; transformers' `load_image` does just that, and
    freevlm deliberately does not follow it there (docs/design.md, "Images")."""
    if img.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """The image at `path` as an RGB PIL image, fully decoded, turned upright by its EXIF orientation (as
    transformers' `load_image` does: `ImageOps.exif_transpose`), 16-bit greyscale scaled to 8 bits (`to_rgb`)."""
    path = Path(path)
    if not path.is_file():
        raise FreeVLMError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            # Decode every pixel now: PIL decodes lazily, and a truncated file would otherwise fail deep inside a
            # data-loader worker, far from the file's name.
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FreeVLMError(f"corrupt image {path}: {_one_line(e) or type(e).__name__}") from e


def check_images(samples: Iterable[Any]) -> None:
    """Raise one FreeVLMError naming the first sample whose `image_path` does not exist (and how many are missing).

    Loaders never open images, so this is the cheap up-front check before a long run; it stats each file once.
    """
    seen: set[Path] = set()
    missing: list[Path] = []
    total = 0
    for sample in samples:
        path = Path(sample.image_path)
        if path in seen:
            continue  # VQA and dialogue samples share images
        seen.add(path)
        total += 1
        if not path.is_file():
            missing.append(path)
    if missing:
        raise FreeVLMError(f"image not found: {missing[0]} ({len(missing)} of {total} images missing)")


def read_json(path: str | Path, what: str = "annotation file") -> Any:
    """Parse the JSON file at `path`; `what` names it in the error when it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise FreeVLMError(f"{what} not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise FreeVLMError(f"invalid JSON in {path}: {e.msg} at line {e.lineno} column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise FreeVLMError(f"invalid JSON in {path}: not UTF-8 text ({_one_line(e)})") from e


def require(obj: Any, key: str, path: Path, where: str = "the top level", kind: type | None = None) -> Any:
    """`obj[key]`, or a FreeVLMError naming the file, the key and `where` (e.g. "images[3]") if it is absent.

    `kind` additionally checks the value's JSON type (list, dict, str), which catches a file of the wrong dataset.
    """
    if not isinstance(obj, dict):
        raise FreeVLMError(f"{path}: expected a JSON object at {where}, found {type(obj).__name__}")
    if key not in obj:
        raise FreeVLMError(f"{path}: missing key '{key}' at {where}")
    value = obj[key]
    if kind is not None and not isinstance(value, kind):
        raise FreeVLMError(f"{path}: key '{key}' at {where} should be a {kind.__name__}, found {type(value).__name__}")
    return value


def absolute_root(image_root: str | Path) -> Path:
    """`image_root` made absolute, so every sample's `image_path` is absolute as records.py promises."""
    return Path(image_root).expanduser().absolute()


def check_image_pattern(image_pattern: str) -> None:
    """Fail early on an image-name pattern that is not a str.format pattern over `{image_id}` alone."""
    try:
        image_pattern.format(image_id=0)
    except (KeyError, IndexError, ValueError) as e:
        raise FreeVLMError(f"bad image_pattern {image_pattern!r}: it may use only {{image_id}} ({_one_line(e)})") from e


def format_image_name(image_pattern: str, image_id: Any, path: Path) -> str:
    """`image_pattern` filled with `image_id` from annotation file `path` (named in the error if the id's type does
    not fit the pattern, e.g. a string id with `{image_id:012d}`)."""
    try:
        return image_pattern.format(image_id=image_id)
    except (KeyError, IndexError, ValueError) as e:
        raise FreeVLMError(f"{path}: image_id {image_id!r} does not fit image_pattern {image_pattern!r}") from e
