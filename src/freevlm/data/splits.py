"""The paper's data protocol (§4): exits (and the stage-1 fine-tune) train on 80% of a dataset's validation split,
the remaining 20% is the development split on which the threshold is chosen, and results are reported on the test
split. The 80/20 split is drawn by image, so no image's captions or questions land on both sides."""

from __future__ import annotations

import hashlib
import random
from typing import TypeVar

T = TypeVar("T")


def split_by_image(samples: list[T], seed: int, train_fraction: float = 0.8) -> tuple[list[T], list[T]]:
    """(train, development) parts of `samples`, seeded, grouped by `image_id`, order-independent."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    images = sorted({str(s.image_id) for s in samples})
    random.Random(seed).shuffle(images)
    n_train = round(len(images) * train_fraction)
    train_images = set(images[:n_train])
    train = [s for s in samples if str(s.image_id) in train_images]
    dev = [s for s in samples if str(s.image_id) not in train_images]
    return train, dev


def split_record(train: list, dev: list, seed: int, train_fraction: float) -> dict:
    """What a run records about its split: sizes, seed, and a hash of the image ids on each side."""

    def digest(part):
        ids = "\n".join(sorted({str(s.image_id) for s in part}))
        return hashlib.sha256(ids.encode()).hexdigest()[:16]

    return {"seed": seed, "train_fraction": train_fraction, "train_samples": len(train), "dev_samples": len(dev),
            "train_images_sha": digest(train), "dev_images_sha": digest(dev)}
