from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from freevlm.data.images import (
    check_image_pattern,
    check_images,
    format_image_name,
    load_image,
    read_json,
    require,
)
from freevlm.errors import FreeVLMError


def _write(path: Path, mode: str = "RGB", size=(6, 4), fmt: str = "PNG") -> Path:
    colour = {"RGB": (10, 200, 30), "L": 77, "RGBA": (10, 200, 30, 128)}[mode]
    Image.new(mode, size, colour).save(path, format=fmt)
    return path


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_load_image_returns_rgb_with_the_files_pixels(tmp_path):
    rgb = load_image(_write(tmp_path / "a.png"))
    assert rgb.mode == "RGB" and rgb.size == (6, 4)
    assert rgb.getpixel((5, 3)) == (10, 200, 30)
    grey = load_image(_write(tmp_path / "g.png", mode="L"))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (77, 77, 77)
    rgba = load_image(_write(tmp_path / "t.png", mode="RGBA"))
    assert rgba.mode == "RGB" and rgba.getpixel((1, 1)) == (10, 200, 30)


def test_load_image_accepts_str_paths_and_jpeg(tmp_path):
    img = load_image(str(_write(tmp_path / "a.jpg", size=(16, 16), fmt="JPEG")))
    assert img.size == (16, 16)
    assert np.abs(np.asarray(img, dtype=int) - (10, 200, 30)).max() <= 3  # JPEG is lossy


def test_missing_image_names_the_path(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(FreeVLMError) as excinfo:
        load_image(path)
    assert _one_line_error(excinfo) == f"image not found: {path}"


def test_garbage_bytes_are_a_corrupt_image(tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"this is not an image\nat all\n")
    with pytest.raises(FreeVLMError) as excinfo:
        load_image(path)
    assert _one_line_error(excinfo).startswith(f"corrupt image {path}: ")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_caught_by_the_full_decode(tmp_path, fmt):
    # Noise so that the compressed stream is long; cutting it leaves a valid header that Image.open accepts.
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = tmp_path / f"whole.{fmt.lower()}"
    Image.fromarray(pixels).save(whole, format=fmt)
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with Image.open(cut) as lazy:
        assert lazy.size == (64, 64)  # opening alone does not notice
    with pytest.raises(FreeVLMError) as excinfo:
        load_image(cut)
    assert _one_line_error(excinfo).startswith(f"corrupt image {cut}: ")


def test_check_images_names_the_first_missing_and_counts_unique_paths(tmp_path):
    a, b = _write(tmp_path / "a.png"), _write(tmp_path / "b.png")
    present = [SimpleNamespace(image_path=p) for p in (a, b, a)]
    assert check_images(present) is None
    missing = [SimpleNamespace(image_path=p) for p in (a, tmp_path / "x.png", tmp_path / "y.png", tmp_path / "x.png")]
    with pytest.raises(FreeVLMError) as excinfo:
        check_images(missing)
    assert _one_line_error(excinfo) == f"image not found: {tmp_path / 'x.png'} (2 of 3 images missing)"


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(FreeVLMError) as excinfo:
        read_json(tmp_path / "q.json", "questions file")
    assert _one_line_error(excinfo) == f"questions file not found: {tmp_path / 'q.json'}"
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [\n1,\n')
    with pytest.raises(FreeVLMError) as excinfo:
        read_json(broken)
    assert _one_line_error(excinfo).startswith(f"invalid JSON in {broken}: ")
    assert "line 3" in str(excinfo.value)


def test_require_names_file_key_and_place(tmp_path):
    path = tmp_path / "f.json"
    assert require({"a": [1]}, "a", path, kind=list) == [1]
    with pytest.raises(FreeVLMError, match=r"f\.json: missing key 'b' at images\[2\]$"):
        require({"a": 1}, "b", path, "images[2]")
    with pytest.raises(FreeVLMError, match=r"key 'a' at the top level should be a list, found int"):
        require({"a": 1}, "a", path, kind=list)
    with pytest.raises(FreeVLMError, match=r"expected a JSON object at images\[0\], found list"):
        require([1], "a", path, "images[0]")


def test_image_patterns(tmp_path):
    assert format_image_name("COCO_val2014_{image_id:012d}.jpg", 42, tmp_path) == "COCO_val2014_000000000042.jpg"
    check_image_pattern("{image_id}.jpg")
    with pytest.raises(FreeVLMError, match=r"bad image_pattern 'COCO_\{split\}_\{image_id\}.jpg'"):
        check_image_pattern("COCO_{split}_{image_id}.jpg")
    with pytest.raises(FreeVLMError, match=r"image_id 'abc' does not fit image_pattern"):
        format_image_name("{image_id:012d}.jpg", "abc", tmp_path / "q.json")
