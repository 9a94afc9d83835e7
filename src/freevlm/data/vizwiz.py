"""VizWiz VQA: a JSON list of {"image", "question", "answers": [{"answer", "answer_confidence"}] x 10, "answer_type",
"answerable"}; the test split has no "answers"/"answer_type"/"answerable".

VizWiz has no question ids: one question per image, so the image's file stem ("VizWiz_val_00000000") serves as both
question_id and image_id, which is also the key its evaluation server expects.
"""

from __future__ import annotations

from pathlib import Path

from freevlm.data.images import absolute_root, read_json, require
from freevlm.data.records import VQASample
from freevlm.errors import FreeVLMError


def load_vizwiz(annotation_file: str | Path, image_root: str | Path) -> list[VQASample]:
    """One sample per entry, in file order; image_path = image_root / image."""
    path = Path(annotation_file)
    data = read_json(path)
    if not isinstance(data, list):
        raise FreeVLMError(f"{path}: expected a JSON list of questions, found {type(data).__name__}")
    root = absolute_root(image_root)
    samples = []
    for i, entry in enumerate(data):
        where = f"entry [{i}]"
        image = require(entry, "image", path, where, kind=str)
        answers = entry.get("answers", [])
        stem = Path(image).stem
        samples.append(
            VQASample(
                question_id=stem,
                image_id=stem,
                image_path=root / image,
                question=require(entry, "question", path, where, kind=str),
                answers=[require(a, "answer", path, f"{where}.answers[{k}]", kind=str) for k, a in enumerate(answers)],
                answer_type=entry.get("answer_type"),
                answerable=bool(entry["answerable"]) if "answerable" in entry else None,
                extra={"answer_confidences": [a.get("answer_confidence") for a in answers]} if answers else {},
            )
        )
    return samples
