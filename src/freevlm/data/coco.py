"""COCO captions, in both formats the field uses.

- Karpathy's `dataset_coco.json`: one entry per image with its split (train/restval/val/test) and its sentences. This
  is the split every captioning paper (BLIP-2 included) reports on.
- The official COCO caption annotations (`captions_train2014.json` etc.): "images" plus "annotations" joined on
  image id. NoCaps uses the same layout, so `parse_coco_captions` is shared with nocaps.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from freevlm.data.images import absolute_root, read_json, require
from freevlm.data.records import CaptionSample
from freevlm.errors import FreeVLMError

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def load_coco_karpathy(
    annotation_file: str | Path, image_root: str | Path, split: str, restval_in_train: bool = True
) -> list[CaptionSample]:
    """The images of one Karpathy split; image_path = image_root / filepath / filename.

    `restval_in_train`: "train" also returns the 30k "restval" images (the usual 113k-image training set).
    image_id is the COCO id ("cocoid"), so predictions line up with the official annotations; Karpathy's own index
    ("imgid") is used only when a file has no cocoid (Flickr-style files).
    """
    if split not in KARPATHY_SPLITS:
        raise FreeVLMError(f"unknown Karpathy split {split!r}: expected one of {', '.join(KARPATHY_SPLITS)}")
    path = Path(annotation_file)
    data = read_json(path)
    wanted = {split, "restval"} if split == "train" and restval_in_train else {split}
    root = absolute_root(image_root)
    samples = []
    for i, entry in enumerate(require(data, "images", path, kind=list)):
        where = f"images[{i}]"
        entry_split = require(entry, "split", path, where)
        if entry_split not in wanted:
            continue
        image_id = entry["cocoid"] if "cocoid" in entry else require(entry, "imgid", path, where)
        filename = require(entry, "filename", path, where, kind=str)
        sentences = require(entry, "sentences", path, where, kind=list)
        captions = [require(s, "raw", path, f"{where}.sentences[{j}]", kind=str).strip()
                    for j, s in enumerate(sentences)]
        samples.append(
            CaptionSample(
                image_id=str(image_id),
                image_path=root / entry.get("filepath", "") / filename,
                captions=captions,
                extra={"split": entry_split},
            )
        )
    return samples


def load_coco_captions(annotation_file: str | Path, image_root: str | Path) -> list[CaptionSample]:
    """Every image of an official COCO caption file, in file order; image_path = image_root / file_name."""
    path = Path(annotation_file)
    return parse_coco_captions(read_json(path), path, image_root)


def parse_coco_captions(
    data: Any, path: Path, image_root: str | Path, annotations_required: bool = True
) -> list[CaptionSample]:
    """One sample per entry of data["images"] (same order), captions joined from data["annotations"].

    Captions keep their original text minus surrounding whitespace (COCO has trailing newlines); an image without
    annotations gets no captions. With `annotations_required=False` a file without "annotations" (NoCaps test, COCO
    test image info) is accepted and every sample is unlabelled.
    """
    root = absolute_root(image_root)
    samples = []
    by_id: dict[Any, CaptionSample] = {}
    for i, entry in enumerate(require(data, "images", path, kind=list)):
        where = f"images[{i}]"
        image_id = require(entry, "id", path, where)
        sample = CaptionSample(
            image_id=str(image_id), image_path=root / require(entry, "file_name", path, where, kind=str), captions=[]
        )
        samples.append(sample)
        by_id[image_id] = sample
    if annotations_required or "annotations" in data:
        for i, ann in enumerate(require(data, "annotations", path, kind=list)):
            where = f"annotations[{i}]"
            image_id = require(ann, "image_id", path, where)
            if image_id not in by_id:
                raise FreeVLMError(f"{path}: {where} refers to image_id {image_id!r}, which is not in 'images'")
            by_id[image_id].captions.append(require(ann, "caption", path, where, kind=str).strip())
    return samples
