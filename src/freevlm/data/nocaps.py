"""NoCaps val/test: COCO-format caption files whose images carry a "domain" (how far from COCO's classes they are).

The test file has no "annotations" (its captions are hidden on the evaluation server), so its samples are unlabelled.
"""

from __future__ import annotations

from pathlib import Path

from freevlm.data.coco import parse_coco_captions
from freevlm.data.images import read_json, require
from freevlm.data.records import CaptionSample
from freevlm.errors import FreeVLMError

NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


def load_nocaps(annotation_file: str | Path, image_root: str | Path, domain: str | None = None) -> list[CaptionSample]:
    """The images of a NoCaps file (only those of `domain` if given), with CaptionSample.domain set."""
    if domain is not None and domain not in NOCAPS_DOMAINS:
        raise FreeVLMError(f"unknown NoCaps domain {domain!r}: expected one of {', '.join(NOCAPS_DOMAINS)}")
    path = Path(annotation_file)
    data = read_json(path)
    samples = parse_coco_captions(data, path, image_root, annotations_required=False)
    kept = []
    for i, (entry, sample) in enumerate(zip(data["images"], samples)):
        image_domain = require(entry, "domain", path, f"images[{i}]")
        if image_domain not in NOCAPS_DOMAINS:
            raise FreeVLMError(f"{path}: images[{i}] has unknown domain {image_domain!r}")
        sample.domain = image_domain
        if "open_images_id" in entry:
            sample.extra["open_images_id"] = entry["open_images_id"]
        if domain is None or image_domain == domain:
            kept.append(sample)
    return kept
