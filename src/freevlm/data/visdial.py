"""VisDial v1.0: {"version", "split", "data": {"questions": [str], "answers": [str], "dialogs": [{"image_id",
"caption", "dialog": [{"question": int, "answer": int, "answer_options": [int] x 100, "gt_index": int}]}]}}.

Questions and answers are indices into the shared string pools. In train/val every round carries its 100 options; in
test only the last given round does (and has no "answer"/"gt_index"), the earlier ones are history only. So a sample
is made for every round that has "answer_options": 10 per dialogue in train/val, 1 in test.
"""

from __future__ import annotations

from pathlib import Path

from freevlm.data.images import absolute_root, check_image_pattern, format_image_name, read_json, require
from freevlm.data.records import DialogSample
from freevlm.errors import FreeVLMError


def load_visdial(
    dialog_file: str | Path, image_root: str | Path, image_pattern: str | None = None
) -> list[DialogSample]:
    """One DialogSample per answerable round; history = the earlier rounds' (question, answer) strings, kept raw
    (VisDial stores questions without "?"; adding it is the prompt builder's job).

    `image_pattern` is a str.format pattern with `{image_id}` (an int), e.g. "VisualDialog_val2018_{image_id:012d}.jpg".
    None derives exactly that from the file's "split" for val2018/test2018; train uses COCO images from two folders,
    so it needs an explicit pattern.
    """
    path = Path(dialog_file)
    raw = read_json(path, "dialog file")
    data = require(raw, "data", path, kind=dict)
    if image_pattern is None:
        split = raw.get("split")
        if split not in ("val2018", "test2018"):
            raise FreeVLMError(f"{path}: cannot name images of split {split!r} by default; pass image_pattern")
        image_pattern = f"VisualDialog_{split}_{{image_id:012d}}.jpg"
    check_image_pattern(image_pattern)
    questions = require(data, "questions", path, "'data'", kind=list)
    answers = require(data, "answers", path, "'data'", kind=list)
    root = absolute_root(image_root)

    def pooled(pool: list[str], index: object, name: str, where: str) -> str:
        if not isinstance(index, int) or not 0 <= index < len(pool):
            raise FreeVLMError(f"{path}: {where} has {name} index {index!r} outside the {len(pool)} {name}s")
        return pool[index]

    samples = []
    for d, dialog in enumerate(require(data, "dialogs", path, "'data'", kind=list)):
        dwhere = f"dialogs[{d}]"
        image_id = require(dialog, "image_id", path, dwhere)
        image_path = root / format_image_name(image_pattern, image_id, path)
        caption = require(dialog, "caption", path, dwhere, kind=str)
        history: list[tuple[str, str]] = []
        for r, turn in enumerate(require(dialog, "dialog", path, dwhere, kind=list)):
            where = f"{dwhere}.dialog[{r}]"
            question = pooled(questions, require(turn, "question", path, where), "question", where)
            if "answer_options" in turn:
                options = require(turn, "answer_options", path, where, kind=list)
                gt_index = turn.get("gt_index")
                if gt_index is not None and not 0 <= gt_index < len(options):
                    raise FreeVLMError(f"{path}: {where} has gt_index {gt_index} outside its {len(options)} options")
                samples.append(
                    DialogSample(
                        image_id=str(image_id),
                        image_path=image_path,
                        caption=caption,
                        history=list(history),
                        question=question,
                        candidates=[pooled(answers, k, "answer", where) for k in options],
                        gt_index=gt_index,
                        round_id=r,
                    )
                )
            if "answer" in turn:
                history.append((question, pooled(answers, turn["answer"], "answer", where)))
    return samples
