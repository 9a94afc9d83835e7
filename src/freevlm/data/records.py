"""The sample types every dataset loader returns, real or synthetic.

Loaders read the official file formats and return lists of these records; nothing downstream knows which dataset a
record came from except through `domain` (NoCaps in/near/out-domain, synthetic in/out-domain) and `extra`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class CaptionSample:
    image_id: str  # dataset's image id, as a string (COCO ids are ints in the JSON)
    image_path: Path  # absolute path of the image file
    captions: list[str]  # reference captions (empty for an unlabelled split)
    domain: str | None = None  # NoCaps: "in-domain" / "near-domain" / "out-domain"; None elsewhere
    extra: dict = field(default_factory=dict)  # anything else a loader keeps (e.g. synthetic true attributes)


@dataclass
class VQASample:
    question_id: str
    image_id: str
    image_path: Path
    question: str
    answers: list[str]  # the human answers (10 for VQAv2/OK-VQA/VizWiz, 1 for GQA); empty if unlabelled
    answer_type: str | None = None  # VQAv2 "yes/no" / "number" / "other"; VizWiz "unanswerable" etc.
    answerable: bool | None = None  # VizWiz only
    extra: dict = field(default_factory=dict)


@dataclass
class DialogSample:
    image_id: str
    image_path: Path
    caption: str  # VisDial's image caption, the first turn of context
    history: list[tuple[str, str]]  # earlier (question, answer) rounds
    question: str  # the question being answered
    candidates: list[str]  # the 100 candidate answers
    gt_index: int | None  # index of the ground-truth answer in `candidates` (None if unlabelled)
    round_id: int = 0  # 0-based round of the dialogue this question belongs to
    extra: dict = field(default_factory=dict)
