"""`freevlm make-data`: the synthetic dataset of the embedded default, written to a folder."""

from __future__ import annotations

from pathlib import Path

from freevlm import validate as check


def make_data(out: Path, seed: int = 0) -> None:
    """Write the synthetic dataset (images, COCO/VQAv2/NoCaps/VisDial-format JSON) to a folder.

    out: target folder (reused if it holds the same dataset; refused if it holds anything else)
    seed: dataset seed
    """
    from freevlm.data.synthetic import SyntheticConfig, write_synthetic

    check.non_negative_int("seed", seed)
    paths = write_synthetic(SyntheticConfig(seed=seed), out)
    print(f"synthetic dataset in {paths.root}")
