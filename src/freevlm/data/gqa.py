"""GQA balanced questions: a JSON object mapping question id -> {"imageId", "question", "answer", "fullAnswer", ...}.

Images are `{imageId}.jpg` in GQA's flat images folder. The challenge/submission files have no "answer"; their samples
are unlabelled.
"""

from __future__ import annotations

from pathlib import Path

from freevlm.data.images import absolute_root, read_json, require
from freevlm.data.records import VQASample
from freevlm.errors import FreeVLMError


def load_gqa(questions_file: str | Path, image_root: str | Path) -> list[VQASample]:
    """One sample per question, in file order; answers = [answer] (GQA has a single reference answer)."""
    path = Path(questions_file)
    data = read_json(path, "questions file")
    if not isinstance(data, dict):
        found = type(data).__name__
        raise FreeVLMError(f"{path}: expected a JSON object mapping question ids to questions, found {found}")
    root = absolute_root(image_root)
    samples = []
    for question_id, entry in data.items():
        where = f"question {question_id}"
        image_id = str(require(entry, "imageId", path, where))
        extra = {}
        if "fullAnswer" in entry:
            extra["full_answer"] = entry["fullAnswer"]
        if "types" in entry:
            extra["types"] = entry["types"]  # structural/semantic/detailed, for per-type breakdowns
        samples.append(
            VQASample(
                question_id=str(question_id),
                image_id=image_id,
                image_path=root / f"{image_id}.jpg",
                question=require(entry, "question", path, where, kind=str),
                answers=[entry["answer"]] if "answer" in entry else [],
                extra=extra,
            )
        )
    return samples
