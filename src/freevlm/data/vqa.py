"""VQAv2 and OK-VQA, which share the official VQA file format.

A questions file ({"data_subtype": "val2014", "questions": [{"image_id", "question", "question_id"}]}) and, for
labelled splits, an annotations file ({"annotations": [{"question_id", "answers": [{"answer", ...}] x 10,
"multiple_choice_answer", "answer_type", "question_type"}]}). OK-VQA's files
(`OpenEnded_mscoco_val2014_questions.json`, `mscoco_val2014_annotations.json`) load with the same `load_vqa`; its
"answer" field is already the processed answer (the raw one is in "raw_answer"), which is what is returned.
"""

from __future__ import annotations

from pathlib import Path

from freevlm.data.images import absolute_root, check_image_pattern, format_image_name, read_json, require
from freevlm.data.records import VQASample
from freevlm.errors import FreeVLMError


def load_vqa(
    questions_file: str | Path,
    image_root: str | Path,
    annotations_file: str | Path | None = None,
    image_pattern: str | None = None,
) -> list[VQASample]:
    """One sample per question, in file order; answers are empty without `annotations_file`.

    `image_pattern` is a str.format pattern with `{image_id}` (an int), e.g. "COCO_val2014_{image_id:012d}.jpg";
    None builds exactly that from the questions file's "data_subtype" (present in VQAv2 and OK-VQA files).
    """
    qpath = Path(questions_file)
    data = read_json(qpath, "questions file")
    questions = require(data, "questions", qpath, kind=list)
    if image_pattern is None:
        if "data_subtype" not in data:
            raise FreeVLMError(f"{qpath}: no 'data_subtype' to name images by; pass image_pattern")
        image_pattern = "COCO_" + str(data["data_subtype"]) + "_{image_id:012d}.jpg"
    check_image_pattern(image_pattern)

    labels: dict = {}
    apath = None
    if annotations_file is not None:
        apath = Path(annotations_file)
        for i, ann in enumerate(require(read_json(apath), "annotations", apath, kind=list)):
            labels[require(ann, "question_id", apath, f"annotations[{i}]")] = (i, ann)

    root = absolute_root(image_root)
    samples = []
    for i, q in enumerate(questions):
        where = f"questions[{i}]"
        question_id = require(q, "question_id", qpath, where)
        image_id = require(q, "image_id", qpath, where)
        sample = VQASample(
            question_id=str(question_id),
            image_id=str(image_id),
            image_path=root / format_image_name(image_pattern, image_id, qpath),
            question=require(q, "question", qpath, where, kind=str),
            answers=[],
        )
        if apath is not None:
            if question_id not in labels:
                raise FreeVLMError(f"{apath}: no annotation for question_id {question_id} of {qpath}")
            j, ann = labels[question_id]
            awhere = f"annotations[{j}]"
            answers = require(ann, "answers", apath, awhere, kind=list)
            sample.answers = [require(a, "answer", apath, f"{awhere}.answers[{k}]", kind=str)
                              for k, a in enumerate(answers)]
            sample.answer_type = ann.get("answer_type")
            sample.extra = {
                "multiple_choice_answer": ann.get("multiple_choice_answer"),
                "question_type": ann.get("question_type"),
                "answer_confidences": [a.get("answer_confidence") for a in answers],
            }
        samples.append(sample)
    return samples
