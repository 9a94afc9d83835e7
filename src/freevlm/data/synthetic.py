"""The embedded default dataset: coloured shapes on a light background, with captions, VQA, NoCaps-style domains and
VisDial-style dialogues, written to disk in the real datasets' formats so that the real loaders read it back.

It stands in for COCO/VQAv2 where nothing can be downloaded: a tiny VLM learns to caption it in CPU minutes, yet
every caption is fully determined by a few attributes per object, so a generated caption is scored exactly
(`caption_is_correct`) and a shallow exit that confuses a colour or a count is caught, not averaged away by n-grams.

Grammar (lowercase, single spaces, no punctuation, so a word-level tokenizer is trivial):
  caption   = [prefix] mention [position] {"and" mention [position]}   e.g. "there is a large red circle on the left
              and two small blue squares"; position only follows a single object ("a ..."), never a group.
  mention   = count size colour shape[s]      count: "a" for one, else "two", "three", ...
  questions = "what color is the [size] <shape>" | "what shape is the <colour> object" | "how many <shape>s are there"
              | "is there a <colour> <shape>" | "where is the [colour] <shape>"
Every question is asked only when its answer is unambiguous for that image. Randomness comes from `random.Random` /
`numpy.random.Generator` streams seeded per (split, purpose) from `SyntheticConfig.seed`, never global state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from freevlm.data.coco import load_coco_captions
from freevlm.data.images import read_json
from freevlm.data.nocaps import NOCAPS_DOMAINS, load_nocaps
from freevlm.data.records import CaptionSample, DialogSample, VQASample
from freevlm.data.visdial import load_visdial
from freevlm.data.vqa import load_vqa
from freevlm.errors import FreeVLMError

GENERATOR_VERSION = 1  # part of the config hash: bump whenever the same config would now produce different files
SPLITS = ("train", "val", "test")
IMAGE_PATTERN = "{image_id:012d}.png"  # file name of every synthetic image, inside images/<split>/

# Everything the renderer can draw; a config picks its seen and held-out words from these.
COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (225, 195, 20),
    "purple": (140, 60, 180),
    "orange": (245, 135, 20),
    "pink": (240, 120, 190),
    "brown": (130, 80, 40),
    "black": (30, 30, 30),
}
SHAPE_NAMES = ("circle", "square", "triangle", "star", "diamond")
SIZE_RADIUS = {"small": 0.1, "medium": 0.14, "large": 0.18}  # half-extent of an object, as a fraction of image_size
BACKGROUND_RGB = (235, 235, 230)
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_PREFIXES = ("", "there is", "the image shows", "this picture contains", "we can see")
# The words of every template below that are not attribute words, so corpus_text covers them without parsing code.
_TEMPLATE_WORDS = (
    "a and there is are the image shows this picture contains we can see on at in "
    "what color shape object how many where it yes no"
)


@dataclass
class SyntheticConfig:
    seed: int = 0  # every random choice derives from this
    image_size: int = 64  # pixels per side
    n_train: int = 2000  # images (with captions and VQA) per split
    n_val: int = 500  # the split exits are trained on; its 80/20 train/dev cut happens elsewhere
    n_test: int = 300
    min_objects: int = 1  # objects per image, inclusive range
    max_objects: int = 3
    shapes: tuple[str, ...] = ("circle", "square", "triangle")  # in-domain shapes (from SHAPE_NAMES)
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")  # in-domain colours (from COLOUR_RGB)
    sizes: tuple[str, ...] = ("small", "large")  # from SIZE_RADIUS
    heldout_shapes: tuple[str, ...] = ("star",)  # appear only in the NoCaps-style near/out-domain images
    heldout_colours: tuple[str, ...] = ("orange",)
    n_nocaps: int = 100  # NoCaps-style images per domain
    captions_per_image: int = 5  # reference captions; the first is the canonical one
    questions_per_image: int = 3  # VQA questions, of distinct types where the image allows
    answers_per_question: int = 10  # human answers per question, as in VQAv2
    answer_noise: float = 0.1  # chance that one human answer is a variant ("2" for "two") or a mistake
    background_noise: float = 0.03  # std of Gaussian noise on the background, as a fraction of 255 (difficulty)
    colour_jitter: int = 16  # max per-channel offset added to an object's colour (difficulty)
    n_dialogs: int = 100  # VisDial-style dialogues, on the first test images
    rounds_per_dialog: int = 3  # question/answer rounds per dialogue
    n_candidates: int = 100  # candidate answers per round, ground truth included

    def __post_init__(self) -> None:
        # YAML and JSON give lists: store tuples so a config compares and hashes the same wherever it came from.
        for name in ("shapes", "colours", "sizes", "heldout_shapes", "heldout_colours"):
            setattr(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class SyntheticPaths:
    """Where write_synthetic puts each file under `root` (a fixed layout, so it is derived, not stored)."""

    root: Path  # the dataset directory

    def images(self, split: str) -> Path:  # split: train / val / test / nocaps
        return self.root / "images" / split

    def captions(self, split: str) -> Path:
        return self.root / "annotations" / f"captions_{split}.json"

    def vqa_questions(self, split: str) -> Path:
        return self.root / "annotations" / f"vqa_questions_{split}.json"

    def vqa_annotations(self, split: str) -> Path:
        return self.root / "annotations" / f"vqa_annotations_{split}.json"

    @property
    def karpathy(self) -> Path:
        return self.root / "annotations" / "dataset_coco.json"

    @property
    def nocaps(self) -> Path:
        return self.root / "annotations" / "nocaps_val.json"

    @property
    def visdial(self) -> Path:
        return self.root / "annotations" / "visdial_test.json"

    @property
    def attributes(self) -> Path:
        return self.root / "attributes.json"

    @property
    def config(self) -> Path:
        return self.root / "synthetic_config.json"

    def annotation_files(self) -> list[Path]:
        per_split = [f(s) for s in SPLITS for f in (self.captions, self.vqa_questions, self.vqa_annotations)]
        return [*per_split, self.karpathy, self.nocaps, self.visdial, self.attributes, self.config]


# ---------------------------------------------------------------------------------------------------------- config


def config_hash(config: SyntheticConfig) -> str:
    """sha256 of the config and GENERATOR_VERSION: equal hashes mean byte-identical datasets."""
    blob = json.dumps({"generator_version": GENERATOR_VERSION, "config": asdict(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _validate(c: SyntheticConfig) -> None:
    def bad(message: str) -> FreeVLMError:
        return FreeVLMError(f"bad SyntheticConfig: {message}")

    for name in ("shapes", "heldout_shapes"):
        unknown = set(getattr(c, name)) - set(SHAPE_NAMES)
        if unknown:
            raise bad(f"{name} has {sorted(unknown)}; drawable shapes are {', '.join(SHAPE_NAMES)}")
    for name in ("colours", "heldout_colours"):
        unknown = set(getattr(c, name)) - set(COLOUR_RGB)
        if unknown:
            raise bad(f"{name} has {sorted(unknown)}; known colours are {', '.join(COLOUR_RGB)}")
    if set(c.sizes) - set(SIZE_RADIUS) or not c.sizes:
        raise bad(f"sizes {c.sizes} must be a non-empty subset of {', '.join(SIZE_RADIUS)}")
    if not c.shapes or not c.colours:
        raise bad("shapes and colours must be non-empty")
    if set(c.shapes) & set(c.heldout_shapes) or set(c.colours) & set(c.heldout_colours):
        raise bad("held-out shapes/colours must not also be in-domain")
    if c.n_nocaps and not (c.heldout_shapes and c.heldout_colours):
        raise bad("n_nocaps > 0 needs both heldout_shapes and heldout_colours (out-domain uses only held-out words)")
    if not 1 <= c.min_objects <= c.max_objects < len(COUNT_WORDS):
        raise bad(f"need 1 <= min_objects <= max_objects <= {len(COUNT_WORDS) - 1}")
    if min(c.n_train, c.n_val, c.n_test, c.n_nocaps, c.n_dialogs, c.questions_per_image) < 0:
        raise bad("counts must be >= 0")
    if c.n_dialogs > c.n_test:
        raise bad(f"n_dialogs={c.n_dialogs} exceeds n_test={c.n_test} (dialogues use test images)")
    if min(c.captions_per_image, c.answers_per_question, c.rounds_per_dialog, c.n_candidates - 1) < 1:
        raise bad("captions_per_image, answers_per_question, rounds_per_dialog must be >= 1 and n_candidates >= 2")
    if not 0.0 <= c.answer_noise <= 1.0 or c.background_noise < 0 or c.colour_jitter < 0:
        raise bad("answer_noise must be in [0, 1]; background_noise and colour_jitter must be >= 0")
    if c.image_size < 16:
        raise bad(f"image_size={c.image_size} is too small to draw shapes (need >= 16)")


def _config_from_dict(d: dict) -> SyntheticConfig:
    return SyntheticConfig(**{f.name: d[f.name] for f in fields(SyntheticConfig)})


# ---------------------------------------------------------------------------------------------------------- images


def _position(cx: float, cy: float, size: int) -> str:
    dx, dy = cx - (size - 1) / 2, cy - (size - 1) / 2
    if max(abs(dx), abs(dy)) < size / 6:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _clear_position(cx: float, cy: float, size: int) -> bool:
    """False near the borders between position words, so that every position answer is visually unambiguous."""
    dx, dy = abs(cx - (size - 1) / 2), abs(cy - (size - 1) / 2)
    margin = size / 24
    return abs(max(dx, dy) - size / 6) > margin and (max(dx, dy) < size / 6 or abs(dx - dy) > margin)


def _place(rng: random.Random, radii: list[float], size: int) -> list[tuple[int, int]]:
    """Non-overlapping integer centres (bounding circles 2 px apart), by rejection sampling."""
    for _ in range(200):
        centres: list[tuple[int, int]] = []
        for r in radii:
            lo, hi = math.ceil(r) + 1, size - 2 - math.ceil(r)
            for _ in range(100):
                cx, cy = rng.randint(lo, hi), rng.randint(lo, hi)
                if _clear_position(cx, cy, size) and all(
                    math.hypot(cx - px, cy - py) > r + pr + 2 for (px, py), pr in zip(centres, radii)
                ):
                    centres.append((cx, cy))
                    break
            else:
                break
        else:
            return centres
    raise FreeVLMError(f"cannot place {len(radii)} non-overlapping objects in a {size}px image; raise image_size")


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r  # a square of half-width r looks much bigger than a circle of radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        return [
            (cx + rr * math.cos(a), cy + rr * math.sin(a))
            for k in range(10)
            for rr, a in [(r if k % 2 == 0 else 0.45 * r, -math.pi / 2 + k * math.pi / 5)]
        ]
    # circle: its bounding polygon, used for the bbox only (drawn as an ellipse)
    return [(cx - r, cy - r), (cx + r, cy + r)]


def _layout(
    rng: random.Random, attrs: list[tuple[str, str, str]], c: SyntheticConfig
) -> tuple[list[dict], list[tuple[int, int]]]:
    """Objects {shape, colour, size, position, bbox} for (size, colour, shape) triples, and their centres.

    bbox = [x0, y0, x1, y1] in pixels, the drawn shape's extent rounded outwards.
    """
    radii = [SIZE_RADIUS[size] * c.image_size for size, _, _ in attrs]
    centres = _place(rng, radii, c.image_size)
    objects = []
    for (size, colour, shape), r, (cx, cy) in zip(attrs, radii, centres):
        xs, ys = zip(*_outline(shape, cx, cy, r))
        bbox = [math.floor(min(xs)), math.floor(min(ys)), math.ceil(max(xs)), math.ceil(max(ys))]
        objects.append(
            {"shape": shape, "colour": colour, "size": size, "position": _position(cx, cy, c.image_size), "bbox": bbox}
        )
    return objects, centres


def _render(
    objects: list[dict], centres: list[tuple[int, int]], c: SyntheticConfig, gen: np.random.Generator
) -> Image.Image:
    s = c.image_size
    pixels = np.empty((s, s, 3), dtype=np.float32)  # (H, W, 3)
    pixels[:] = BACKGROUND_RGB
    if c.background_noise > 0:
        pixels += gen.normal(0.0, c.background_noise * 255, pixels.shape).astype(np.float32)
    img = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for obj, (cx, cy) in zip(objects, centres):
        jitter = gen.integers(-c.colour_jitter, c.colour_jitter + 1, 3) if c.colour_jitter else np.zeros(3, int)
        fill = tuple(int(v) for v in np.clip(np.array(COLOUR_RGB[obj["colour"]]) + jitter, 0, 255))
        r = SIZE_RADIUS[obj["size"]] * s
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_outline(obj["shape"], cx, cy, r), fill=fill)
    return img


# -------------------------------------------------------------------------------------------------------- captions


def _groups(objects: list[dict]) -> list[tuple[int, str, str, str, str | None]]:
    """(count, size, colour, shape, position) per set of identical-looking objects; position only for a single one."""
    counts = Counter((o["size"], o["colour"], o["shape"]) for o in objects)  # insertion order = first appearance
    position = {(o["size"], o["colour"], o["shape"]): o["position"] for o in objects}
    return [(n, *key, position[key] if n == 1 else None) for key, n in counts.items()]


def _mention(count: int, size: str, colour: str, shape: str) -> str:
    return f"a {size} {colour} {shape}" if count == 1 else f"{COUNT_WORDS[count]} {size} {colour} {shape}s"


def _caption(groups: list[tuple[int, str, str, str, str | None]], prefix: str, with_positions: bool) -> str:
    parts = []
    for count, size, colour, shape, position in groups:
        phrase = _mention(count, size, colour, shape)
        parts.append(f"{phrase} {POSITION_PHRASE[position]}" if with_positions and position else phrase)
    if prefix == "there is" and groups[0][0] > 1:
        prefix = "there are"
    body = " and ".join(parts)
    return f"{prefix} {body}" if prefix else body


def canonical_caption(objects: list[dict]) -> str:
    """The one caption a set of objects determines: groups by count (most first), then shape, colour, size."""
    groups = sorted(_groups(objects), key=lambda g: (-g[0], g[3], g[2], g[1]))
    return _caption(groups, "", with_positions=False)


def _reference_captions(objects: list[dict], rng: random.Random, k: int) -> list[str]:
    refs = [canonical_caption(objects)]
    groups = _groups(objects)
    for _ in range(20 * k):
        if len(refs) >= k:
            break
        caption = _caption(rng.sample(groups, len(groups)), rng.choice(CAPTION_PREFIXES), rng.random() < 0.5)
        if caption not in refs:
            refs.append(caption)
    # Only a config with very few phrasings runs out of distinct captions; repeat rather than return fewer.
    return refs + [refs[i % len(refs)] for i in range(k - len(refs))]


def wrong_captions(objects: list[dict], rng: random.Random, c: SyntheticConfig, k: int = 1) -> list[str]:
    """`k` near-miss captions for `objects`: each changes one thing (an object's size, colour or shape to another seen
    value, or one object more or fewer) and is phrased like a reference caption (random prefix, order and positions).
    `caption_is_correct` is False for every one. They are the hard negatives of the tiny CLIP's contrastive training
    and the wrong captions a ranker is tested against: a sampled caption is usually wrong in one attribute, rarely in
    everything."""
    key = lambda o: (o["size"], o["colour"], o["shape"])  # noqa: E731
    truth = Counter(key(o) for o in objects)
    pools = {"size": c.sizes, "colour": c.colours, "shape": c.shapes}
    out = []
    while len(out) < k:
        objs = [dict(o) for o in objects]
        kinds = [kind for kind in pools if len(pools[kind]) > 1]
        kinds += ["add"] if len(objs) < c.max_objects else []
        kinds += ["remove"] if len(objs) > max(1, c.min_objects) else []
        if not kinds:
            raise FreeVLMError("this synthetic config allows no wrong caption (one size, colour, shape and count)")
        kind = rng.choice(kinds)
        if kind == "add":
            objs.append({"size": rng.choice(c.sizes), "colour": rng.choice(c.colours), "shape": rng.choice(c.shapes),
                         "position": rng.choice(list(POSITION_PHRASE))})
        elif kind == "remove":
            objs.pop(rng.randrange(len(objs)))
        else:
            o = rng.choice(objs)
            o[kind] = rng.choice([v for v in pools[kind] if v != o[kind]])
        if Counter(key(o) for o in objs) == truth:  # e.g. an added twin of a removed object: draw again
            continue
        groups = _groups(objs)
        out.append(_caption(rng.sample(groups, len(groups)), rng.choice(CAPTION_PREFIXES), rng.random() < 0.5))
    return out


# ------------------------------------------------------------------------------------------------------- questions

QUESTION_KINDS = ("colour", "shape", "count", "yesno", "position")


@dataclass
class _QA:
    kind: str  # one of QUESTION_KINDS
    question: str
    answer: str  # the true short answer (VQA)
    answer_type: str  # VQAv2's "yes/no" / "number" / "other"
    question_type: str  # VQAv2's question prefix, e.g. "what color is the"
    dialog_answer: str  # the sentence a VisDial answerer would give


def _count_sentence(n: int, shape: str) -> str:
    if n == 0:
        return f"there are no {shape}s"
    return f"there is one {shape}" if n == 1 else f"there are {COUNT_WORDS[n]} {shape}s"


def _candidate_questions(objects: list[dict], c: SyntheticConfig) -> dict[str, list[_QA]]:
    """Every question of each kind whose answer is unambiguous for these objects (seen vocabulary only)."""
    by_shape = Counter(o["shape"] for o in objects)
    by_colour = Counter(o["colour"] for o in objects)
    by_size_shape = Counter((o["size"], o["shape"]) for o in objects)
    by_colour_shape = Counter((o["colour"], o["shape"]) for o in objects)
    qs: dict[str, list[_QA]] = {kind: [] for kind in QUESTION_KINDS}
    for o in objects:
        size, colour, shape, pos = o["size"], o["colour"], o["shape"], o["position"]
        # "the circle" must pick out one object; fall back to a longer description when it does not
        unique_shape = by_shape[shape] == 1
        colour_of = shape if unique_shape else f"{size} {shape}" if by_size_shape[size, shape] == 1 else None
        where_of = shape if unique_shape else f"{colour} {shape}" if by_colour_shape[colour, shape] == 1 else None
        if colour_of:
            question = f"what color is the {colour_of}"
            qs["colour"].append(_QA("colour", question, colour, "other", "what color is the", f"it is {colour}"))
        if where_of:
            question, reply = f"where is the {where_of}", f"it is {POSITION_PHRASE[pos]}"
            qs["position"].append(_QA("position", question, pos, "other", "where is the", reply))
        if by_colour[colour] == 1:
            question = f"what shape is the {colour} object"
            qs["shape"].append(_QA("shape", question, shape, "other", "what shape is the", f"it is a {shape}"))
    for shape in c.shapes:
        n = by_shape[shape]
        question = f"how many {shape}s are there"
        qs["count"].append(_QA("count", question, COUNT_WORDS[n], "number", "how many", _count_sentence(n, shape)))
    for colour in c.colours:
        for shape in c.shapes:
            question = f"is there a {colour} {shape}"
            if by_colour_shape[colour, shape]:
                size = next(o["size"] for o in objects if (o["colour"], o["shape"]) == (colour, shape))
                reply = f"yes there is a {size} {colour} {shape}"
                qs["yesno"].append(_QA("yesno", question, "yes", "yes/no", "is there a", reply))
            else:
                reply = f"no there is no {colour} {shape}"
                qs["yesno"].append(_QA("yesno", question, "no", "yes/no", "is there a", reply))
    return qs


def _pick_questions(qs: dict[str, list[_QA]], n: int, rng: random.Random) -> list[_QA]:
    """n distinct questions, of distinct kinds while the image allows; yes/no balanced, counts mostly of present
    shapes (otherwise "zero" would dominate the count answers)."""
    kinds = [kind for kind in QUESTION_KINDS if qs[kind]]
    rng.shuffle(kinds)
    picked = []
    for kind in kinds[:n]:
        pool = qs[kind]
        if kind == "yesno":
            want = "yes" if rng.random() < 0.5 else "no"
            pool = [q for q in pool if q.answer == want] or pool
        elif kind == "count" and rng.random() < 0.75:
            pool = [q for q in pool if q.answer != "zero"] or pool
        picked.append(rng.choice(pool))
    rest = [q for kind in kinds for q in qs[kind] if q not in picked]
    while len(picked) < n and rest:
        picked.append(rest.pop(rng.randrange(len(rest))))
    return picked


def _variant(qa: _QA, c: SyntheticConfig, rng: random.Random) -> str:
    """A human's other answer: a digit for a number word, an off-by-one count, a wrong colour/shape/position, a flip."""
    if qa.kind == "count":
        n = COUNT_WORDS.index(qa.answer)
        if rng.random() < 0.5:
            return str(n)
        step = rng.choice((-1, 1)) if 0 < n < c.max_objects else (1 if n == 0 else -1)
        return COUNT_WORDS[n + step]
    if qa.kind == "yesno":
        return "no" if qa.answer == "yes" else "yes"
    words = {"colour": c.colours, "shape": c.shapes, "position": tuple(POSITION_PHRASE)}[qa.kind]
    others = [w for w in words if w != qa.answer]
    return rng.choice(others) if others else qa.answer


def _human_answers(qa: _QA, c: SyntheticConfig, rng: random.Random) -> list[tuple[str, str]]:
    """(answer, answer_confidence) x answers_per_question; a noisy answer is given with confidence "maybe"."""
    return [
        (_variant(qa, c, rng), "maybe") if rng.random() < c.answer_noise else (qa.answer, "yes")
        for _ in range(c.answers_per_question)
    ]


def _dialog_answer_pool(c: SyntheticConfig) -> list[str]:
    """Every answer a dialogue can have (short forms too), held-out words included: VisDial's shared answer list,
    from which each round's distractors are drawn. The default config gives 124, enough for 99 distinct ones."""
    colours, shapes = c.colours + c.heldout_colours, c.shapes + c.heldout_shapes
    pool = [*colours, *shapes, *COUNT_WORDS[: c.max_objects + 1], "yes", "no", *POSITION_PHRASE]
    pool += [f"it is {x}" for x in colours] + [f"it is a {s}" for s in shapes]
    pool += [f"it is {phrase}" for phrase in POSITION_PHRASE.values()]
    pool += [_count_sentence(n, s) for s in shapes for n in range(c.max_objects + 1)]
    pool += [f"yes there is a {z} {x} {s}" for z in c.sizes for x in colours for s in shapes]
    pool += [f"no there is no {x} {s}" for x in colours for s in shapes]
    return sorted(set(pool))


# ------------------------------------------------------------------------------------------------------ generation


@dataclass
class _Image:
    image_id: int
    split: str  # train / val / test / nocaps
    objects: list[dict]
    captions: list[str]
    domain: str | None = None
    qas: list[_QA] = field(default_factory=list)
    answers: list[list[tuple[str, str]]] = field(default_factory=list)  # per question: (answer, confidence) pairs

    @property
    def file_name(self) -> str:
        return IMAGE_PATTERN.format(image_id=self.image_id)


def _rng(c: SyntheticConfig, *keys: str) -> random.Random:
    # One independent stream per (split, purpose): changing questions_per_image leaves the images as they were.
    # A str seed is hashed with sha512 by `random`, so this is stable across runs and PYTHONHASHSEED.
    return random.Random(":".join(["freevlm-synthetic", str(c.seed), *keys]))


def _domain_attrs(rng: random.Random, domain: str, n: int, c: SyntheticConfig) -> list[tuple[str, str, str]]:
    """(size, colour, shape) x n: in-domain only seen words, out-domain only held-out ones, near-domain one object
    with exactly one held-out attribute among otherwise seen objects."""
    colours, shapes = (c.heldout_colours, c.heldout_shapes) if domain == "out-domain" else (c.colours, c.shapes)
    attrs = [(rng.choice(c.sizes), rng.choice(colours), rng.choice(shapes)) for _ in range(n)]
    if domain == "near-domain":
        size, colour, shape = attrs[0]
        if rng.random() < 0.5:
            attrs[0] = (size, rng.choice(c.heldout_colours), shape)
        else:
            attrs[0] = (size, colour, rng.choice(c.heldout_shapes))
    return attrs


def _make_images(
    c: SyntheticConfig, key: str, split: str, first_id: int, n: int, domain: str, directory: Path
) -> list[_Image]:
    layout_rng, caption_rng = _rng(c, key, "layout"), _rng(c, key, "captions")
    gen = np.random.default_rng(_rng(c, key, "pixels").getrandbits(64))
    directory.mkdir(parents=True, exist_ok=True)
    images = []
    for image_id in range(first_id, first_id + n):
        attrs = _domain_attrs(layout_rng, domain, layout_rng.randint(c.min_objects, c.max_objects), c)
        objects, centres = _layout(layout_rng, attrs, c)
        image = _Image(image_id, split, objects, _reference_captions(objects, caption_rng, c.captions_per_image))
        _render(objects, centres, c, gen).save(directory / image.file_name, format="PNG")
        images.append(image)
    return images


def _dump(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")


def _coco_caption_json(images: list[_Image], c: SyntheticConfig, description: str, first_ann_id: int) -> dict:
    annotations = [
        {"image_id": im.image_id, "id": first_ann_id + k, "caption": caption}
        for k, (im, caption) in enumerate((im, cap) for im in images for cap in im.captions)
    ]
    entries = []
    for im in images:
        entry = {"id": im.image_id, "file_name": im.file_name, "width": c.image_size, "height": c.image_size}
        if im.domain is not None:
            entry["domain"] = im.domain
        entries.append(entry)
    info = {"description": description, "version": str(GENERATOR_VERSION), "seed": c.seed}
    return {"info": info, "licenses": [], "type": "captions", "images": entries, "annotations": annotations}


def _karpathy_json(splits: dict[str, list[_Image]]) -> dict:
    entries, sent_id = [], 0
    for imgid, im in enumerate(im for split in SPLITS for im in splits[split]):
        sentences = []
        for caption in im.captions:
            sentences.append({"tokens": caption.split(), "raw": caption, "imgid": imgid, "sentid": sent_id})
            sent_id += 1
        entries.append(
            {
                "filepath": im.split,
                "filename": im.file_name,
                "imgid": imgid,
                "split": im.split,
                "sentences": sentences,
                "sentids": [s["sentid"] for s in sentences],
                "cocoid": im.image_id,
            }
        )
    return {"dataset": "coco", "images": entries}


def _vqa_jsons(images: list[_Image], split: str) -> tuple[dict, dict]:
    questions, annotations = [], []
    for im in images:
        for k, (qa, answers) in enumerate(zip(im.qas, im.answers)):
            question_id = im.image_id * 1000 + k  # VQAv2's own numbering scheme
            questions.append({"image_id": im.image_id, "question": qa.question, "question_id": question_id})
            counts = Counter(a for a, _ in answers)
            majority = max(counts, key=lambda a: (counts[a], a == qa.answer))  # ties go to the true answer
            annotations.append(
                {
                    "question_id": question_id,
                    "image_id": im.image_id,
                    "question_type": qa.question_type,
                    "answer_type": qa.answer_type,
                    "multiple_choice_answer": majority,
                    "answers": [
                        {"answer": a, "answer_confidence": conf, "answer_id": j + 1}
                        for j, (a, conf) in enumerate(answers)
                    ],
                }
            )
    head = {"info": {"description": "freevlm synthetic shapes"}, "license": {}, "data_type": "synthetic"}
    return (
        {**head, "task_type": "Open-Ended", "data_subtype": split, "questions": questions},
        {**head, "data_subtype": split, "annotations": annotations},
    )


def _visdial_json(images: list[_Image], c: SyntheticConfig) -> dict:
    rng = _rng(c, "visdial")
    answers = _dialog_answer_pool(c)
    answer_index = {a: i for i, a in enumerate(answers)}
    questions: list[str] = []
    question_index: dict[str, int] = {}
    dialogs = []
    for im in images[: c.n_dialogs]:
        rounds = []
        for qa in _pick_questions(_candidate_questions(im.objects, c), c.rounds_per_dialog, rng):
            if qa.question not in question_index:
                question_index[qa.question] = len(questions)
                questions.append(qa.question)
            others = [answer_index[a] for a in answers if a != qa.dialog_answer]
            k = c.n_candidates - 1
            # sample() keeps distractors distinct; a config with a tiny vocabulary has to repeat some
            distractors = rng.sample(others, k) if len(others) >= k else rng.choices(others, k=k)
            gt_index = rng.randrange(c.n_candidates)
            options = distractors[:gt_index] + [answer_index[qa.dialog_answer]] + distractors[gt_index:]
            rounds.append(
                {
                    "question": question_index[qa.question],
                    "answer": answer_index[qa.dialog_answer],
                    "answer_options": options,
                    "gt_index": gt_index,
                }
            )
        dialogs.append({"image_id": im.image_id, "caption": im.captions[0], "dialog": rounds})
    return {"version": "1.0", "split": "test", "data": {"questions": questions, "answers": answers, "dialogs": dialogs}}


def _build(c: SyntheticConfig, out: Path, digest: str) -> None:
    """Generate every image and file of the dataset into the empty directory `out`."""
    paths = SyntheticPaths(out)
    (out / "annotations").mkdir()
    splits: dict[str, list[_Image]] = {}
    next_id = 1
    for split, n in zip(SPLITS, (c.n_train, c.n_val, c.n_test)):
        splits[split] = _make_images(c, split, split, next_id, n, "in-domain", paths.images(split))
        next_id += n
        vqa_rng = _rng(c, split, "vqa")
        for im in splits[split]:
            im.qas = _pick_questions(_candidate_questions(im.objects, c), c.questions_per_image, vqa_rng)
            im.answers = [_human_answers(qa, c, vqa_rng) for qa in im.qas]
    nocaps = []
    for domain in NOCAPS_DOMAINS:
        images = _make_images(c, f"nocaps-{domain}", "nocaps", next_id, c.n_nocaps, domain, paths.images("nocaps"))
        for im in images:
            im.domain = domain
        nocaps += images
        next_id += c.n_nocaps

    ann_id = 1
    for split in SPLITS:
        _dump(_coco_caption_json(splits[split], c, f"freevlm synthetic shapes, {split}", ann_id), paths.captions(split))
        ann_id += len(splits[split]) * c.captions_per_image
        questions, annotations = _vqa_jsons(splits[split], split)
        _dump(questions, paths.vqa_questions(split))
        _dump(annotations, paths.vqa_annotations(split))
    _dump(_coco_caption_json(nocaps, c, "freevlm synthetic shapes, nocaps val", ann_id), paths.nocaps)
    _dump(_karpathy_json(splits), paths.karpathy)
    _dump(_visdial_json(splits["test"], c), paths.visdial)
    every = [im for split in SPLITS for im in splits[split]] + nocaps
    _dump({str(im.image_id): im.objects for im in every}, paths.attributes)
    # Written last: its presence marks a complete dataset.
    record = {"generator_version": GENERATOR_VERSION, "hash": digest, "config": asdict(c)}
    paths.config.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _existing_matches(paths: SyntheticPaths, digest: str) -> bool:
    """True if `paths.root` already holds this exact dataset, False if it is absent or an empty directory; raises
    rather than let anything else be overwritten."""
    root = paths.root
    if not root.exists():
        return False
    if not root.is_dir():
        raise FreeVLMError(f"synthetic dataset root {root} is a file, not a directory")
    if paths.config.is_file():
        stored = read_json(paths.config)
        stored_hash = str(stored.get("hash")) if isinstance(stored, dict) else "?"
        if stored_hash != digest:
            raise FreeVLMError(
                f"{root} holds a synthetic dataset written with a different config or generator version "
                f"(hash {stored_hash[:12]}, wanted {digest[:12]}); pass another root or delete it"
            )
        missing = [p for p in paths.annotation_files() if not p.is_file()]
        if missing:
            raise FreeVLMError(f"synthetic dataset at {root} is incomplete ({missing[0]} is missing); delete it")
        return True
    if any(root.iterdir()):
        raise FreeVLMError(f"{root} is not empty and holds no synthetic dataset; refusing to overwrite it")
    return False


def write_synthetic(config: SyntheticConfig, root: str | Path) -> SyntheticPaths:
    """Generate the dataset under `root`, or reuse the one already there if it was written with the same config.

    Refuses (FreeVLMError) to touch a root holding a different config's dataset or unrelated files. Everything is
    written into a temporary directory beside `root` and renamed into place, so a crash leaves no half dataset.
    """
    _validate(config)
    paths = SyntheticPaths(Path(root).expanduser().absolute())
    digest = config_hash(config)
    if _existing_matches(paths, digest):
        return paths
    paths.root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{paths.root.name}.partial-", dir=paths.root.parent))
    try:
        _build(config, tmp, digest)
        tmp.chmod(0o755)  # mkdtemp makes it private to this user
        if paths.root.is_dir():
            paths.root.rmdir()  # empty, checked above; a rename over a directory is not portable
        os.rename(tmp, paths.root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _existing_matches(paths, digest):  # a concurrent writer of the same config got there first
            return paths
        raise FreeVLMError(f"cannot write synthetic dataset to {paths.root}: {' '.join(str(e).split())}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths


# --------------------------------------------------------------------------------------------------------- loading


def synthetic_paths(root: str | Path) -> SyntheticPaths:
    """The layout of the dataset written at `root`, which must exist."""
    paths = SyntheticPaths(Path(root).expanduser().absolute())
    if not paths.config.is_file():
        raise FreeVLMError(f"no synthetic dataset at {paths.root} (no {paths.config.name}); run write_synthetic first")
    return paths


def read_synthetic_config(root: str | Path) -> SyntheticConfig:
    """The config the dataset at `root` was written with (e.g. to build its tokenizer from corpus_text)."""
    paths = synthetic_paths(root)
    stored = read_json(paths.config)
    try:
        return _config_from_dict(stored["config"])
    except (KeyError, TypeError) as e:
        raise FreeVLMError(f"{paths.config}: not a synthetic config record (missing {e})") from e


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise FreeVLMError(f"unknown synthetic split {split!r}: expected one of {', '.join(SPLITS)}")


def _attach_objects(samples: list, paths: SyntheticPaths) -> None:
    attributes = read_json(paths.attributes)
    for sample in samples:
        if sample.image_id not in attributes:
            raise FreeVLMError(f"{paths.attributes}: missing key '{sample.image_id}' (image of a loaded sample)")
        sample.extra["objects"] = attributes[sample.image_id]


def load_synthetic_captions(root: str | Path, split: str) -> list[CaptionSample]:
    """One split's images and reference captions (via load_coco_captions), true objects in extra["objects"]."""
    _check_split(split)
    paths = synthetic_paths(root)
    samples = load_coco_captions(paths.captions(split), paths.images(split))
    _attach_objects(samples, paths)
    return samples


def load_synthetic_vqa(root: str | Path, split: str) -> list[VQASample]:
    """One split's questions with 10 answers each (via load_vqa), true objects in extra["objects"]."""
    _check_split(split)
    paths = synthetic_paths(root)
    samples = load_vqa(paths.vqa_questions(split), paths.images(split), paths.vqa_annotations(split), IMAGE_PATTERN)
    _attach_objects(samples, paths)
    return samples


def load_synthetic_nocaps(root: str | Path, domain: str | None = None) -> list[CaptionSample]:
    """The NoCaps-style images (of one domain if given) via load_nocaps, true objects in extra["objects"]."""
    paths = synthetic_paths(root)
    samples = load_nocaps(paths.nocaps, paths.images("nocaps"), domain)
    _attach_objects(samples, paths)
    return samples


def load_synthetic_visdial(root: str | Path) -> list[DialogSample]:
    """One sample per dialogue round on the test images (via load_visdial), true objects in extra["objects"]."""
    paths = synthetic_paths(root)
    samples = load_visdial(paths.visdial, paths.images("test"), IMAGE_PATTERN)
    _attach_objects(samples, paths)
    return samples


# --------------------------------------------------------------------------------------------------------- scoring

_COUNT_OF = {"a": 1, "an": 1} | {w: n for n, w in enumerate(COUNT_WORDS)} | {str(n): n for n in range(10)}
_SHAPE_OF = {s: s for s in SHAPE_NAMES} | {f"{s}s": s for s in SHAPE_NAMES}


def parse_caption(caption: str) -> list[tuple[int, str | None, str | None, str | None]]:
    """The object mentions of a caption in this grammar: (count, size, colour, shape), None where a mention leaves an
    attribute out and "?" where it names two. Words outside the grammar (prefixes, positions) are skipped."""
    mentions = []
    current: list | None = None
    for word in re.findall(r"[a-z0-9]+", caption.lower()):
        if word in _COUNT_OF:
            if current is not None:
                mentions.append(current)
            current = [_COUNT_OF[word], None, None, None]
            continue
        slot = 1 if word in SIZE_RADIUS else 2 if word in COLOUR_RGB else 3 if word in _SHAPE_OF else 0
        if not slot:
            continue
        if current is None:
            current = [1, None, None, None]  # "red circle" without an article still names one object
        value = _SHAPE_OF[word] if slot == 3 else word
        current[slot] = value if current[slot] is None else "?"
        if slot == 3:  # the shape noun closes a mention
            mentions.append(current)
            current = None
    if current is not None:
        mentions.append(current)
    return [tuple(m) for m in mentions]


def caption_is_correct(caption: str, objects: list[dict]) -> bool:
    """True iff the caption mentions exactly the true objects: the multiset of (size, colour, shape) it states,
    counts expanded, equals the truth. Order and position phrases are ignored; a mention missing an attribute, an
    invented object or an omitted one makes it wrong."""
    truth = Counter((o["size"], o["colour"], o["shape"]) for o in objects)
    return _stated(caption) == truth


def _stated(caption: str) -> Counter:
    said: Counter = Counter()
    for count, size, colour, shape in parse_caption(caption):
        said[size, colour, shape] += count
    return +said


def caption_meaning(caption: str) -> tuple:
    """What a caption states, independent of phrasing: the sorted (size, colour, shape) -> count multiset. Two
    captions with equal meanings are both correct or both wrong for any image (`caption_is_correct`)."""
    return tuple(sorted(_stated(caption).items(), key=str))


def caption_attribute_recall(caption: str, objects: list[dict]) -> float:
    """Fraction of the true objects' size, colour and shape words that the caption states, with multiplicity (two
    red objects need "two red ..." or two red mentions): partial credit where caption_is_correct is all or nothing.
    Recall only: invented objects cost nothing here."""
    said: dict[int, Counter] = {slot: Counter() for slot in (1, 2, 3)}
    for mention in parse_caption(caption):
        for slot in (1, 2, 3):
            if mention[slot] is not None:
                said[slot][mention[slot]] += mention[0]
    hits = 0
    for slot, key in ((1, "size"), (2, "colour"), (3, "shape")):
        hits += sum(min(n, said[slot][value]) for value, n in Counter(o[key] for o in objects).items())
    return hits / (3 * len(objects)) if objects else 1.0


def corpus_text(config: SyntheticConfig) -> list[str]:
    """Every word the dataset's captions, questions, answers and dialogues can contain, held-out words included,
    sorted: the complete vocabulary for a word-level tokenizer."""
    colours, shapes = config.colours + config.heldout_colours, config.shapes + config.heldout_shapes
    words = set(_TEMPLATE_WORDS.split()) | set(config.sizes) | set(colours) | set(shapes) | {f"{s}s" for s in shapes}
    words |= set(COUNT_WORDS[: config.max_objects + 1]) | {str(n) for n in range(config.max_objects + 1)}
    words |= {w for phrase in POSITION_PHRASE.values() for w in phrase.split()}
    return sorted(words)
