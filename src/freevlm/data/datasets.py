"""One entry point from command-line dataset arguments to samples: `load_dataset(name, ...)`.

Each name maps to the loader of its official format and the task it is scored as. `synthetic-*` read the embedded
default from its root folder; the others read local copies of the real datasets.

| name               | files                                                   | task     |
|--------------------|---------------------------------------------------------|----------|
| synthetic          | --data ROOT (captions of the split)                     | caption  |
| synthetic-vqa      | --data ROOT                                             | vqa      |
| synthetic-nocaps   | --data ROOT [--domain]                                  | caption  |
| synthetic-visdial  | --data ROOT                                             | visdial  |
| coco               | --data dataset_coco.json (Karpathy) --images ROOT       | caption  |
| nocaps             | --data nocaps_val_4500_captions.json --images DIR       | caption  |
| vqav2 / okvqa      | --questions Q.json [--data ANNOTATIONS.json] --images D | vqa      |
| gqa                | --questions *_balanced_questions.json --images DIR      | gqa      |
| vizwiz             | --data val.json --images DIR                            | vizwiz   |
| visdial            | --data visdial_1.0_val.json --images DIR                | visdial  |
"""

from __future__ import annotations

from pathlib import Path

from freevlm.data import synthetic
from freevlm.data.coco import load_coco_karpathy
from freevlm.data.gqa import load_gqa
from freevlm.data.nocaps import load_nocaps
from freevlm.data.visdial import load_visdial
from freevlm.data.vizwiz import load_vizwiz
from freevlm.data.vqa import load_vqa
from freevlm.errors import FreeVLMError

DATASETS = ("synthetic", "synthetic-vqa", "synthetic-nocaps", "synthetic-visdial", "coco", "nocaps", "vqav2",
            "okvqa", "gqa", "vizwiz", "visdial")


def _need(value, flag: str, name: str):
    if value is None:
        raise FreeVLMError(f"dataset {name!r} needs {flag}")
    return value


def load_dataset(name: str, split: str = "test", data: str | Path | None = None, images: str | Path | None = None,
                 questions: str | Path | None = None, domain: str | None = None) -> tuple[str, list]:
    """(task, samples) for a dataset name (see the table above). task: caption | vqa | gqa | vizwiz | visdial."""
    if name not in DATASETS:
        raise FreeVLMError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name.startswith("synthetic"):
        root = _need(data, "--data (the synthetic root folder)", name)
        if name == "synthetic":
            return "caption", synthetic.load_synthetic_captions(root, split)
        if name == "synthetic-vqa":
            return "vqa", synthetic.load_synthetic_vqa(root, split)
        if name == "synthetic-nocaps":
            return "caption", synthetic.load_synthetic_nocaps(root, domain)
        return "visdial", synthetic.load_synthetic_visdial(root)
    if name == "coco":
        return "caption", load_coco_karpathy(_need(data, "--data", name), _need(images, "--images", name), split)
    if name == "nocaps":
        return "caption", load_nocaps(_need(data, "--data", name), _need(images, "--images", name), domain)
    if name in ("vqav2", "okvqa"):
        return "vqa", load_vqa(_need(questions, "--questions", name), _need(images, "--images", name), data)
    if name == "gqa":
        return "gqa", load_gqa(_need(questions, "--questions", name), _need(images, "--images", name))
    if name == "vizwiz":
        return "vizwiz", load_vizwiz(_need(data, "--data", name), _need(images, "--images", name))
    return "visdial", load_visdial(_need(data, "--data", name), _need(images, "--images", name))
