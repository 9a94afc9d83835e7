"""A tiny labelled task for training tests: solid-colour images whose caption names the colour."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from freevlm.backbones.tiny import TinySize, build_tiny, tiny_processor
from freevlm.data.tokenizer import build_word_tokenizer
from freevlm.train.batches import Example

COLOURS = ["red", "green", "blue", "yellow"]


def colour_task(root: Path, family: str = "blip2-opt", layers: int = 6, seed: int = 0):
    """(backbone with processor, examples): 4 colours x 2 shapes, prompt 'a photo of', caption 'a <colour> <shape>'."""
    tok = build_word_tokenizer(["a photo of square circle " + " ".join(COLOURS)])
    size = TinySize(lm_layers=layers, image_size=32, lm_hidden=32)
    processor = tiny_processor(family, tok, size)  # before sizing the vocabulary: SmolVLM's adds layout tokens
    backbone = build_tiny(family, replace(size, vocab_size=len(tok)), processor=processor, seed=seed)
    examples = []
    root.mkdir(parents=True, exist_ok=True)
    for c in COLOURS:
        for shape in ("square", "circle"):
            path = root / f"{c}-{shape}.png"
            img = Image.new("RGB", (32, 32), "white")
            if shape == "square":
                img.paste(c, (4, 4, 28, 28))
            else:
                from PIL import ImageDraw

                ImageDraw.Draw(img).ellipse((4, 4, 28, 28), fill=c)
            img.save(path)
            examples.append(Example(f"{c}-{shape}", path, "a photo of", f"a {c} {shape}"))
    return backbone, examples


@pytest.fixture
def task(tmp_path):
    return colour_task(tmp_path / "images")
