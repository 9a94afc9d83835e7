"""`freevlm pretrain`: the embedded default VLM and its tiny CLIP, pretrained on the synthetic train split."""

from __future__ import annotations

import json
from pathlib import Path

from freevlm import validate as check
from freevlm.outputs import claim_output


def pretrain(out: Path = Path("runs/default"), seed: int = 0, progress: bool = True) -> None:
    """Build and pretrain the embedded default VLM (tiny BLIP-2, OPT LM) and its tiny CLIP on the synthetic train split.

    out: folder for the data and the pretrained backbone (out/pretrain-s<seed>/backbone)
    seed: model and data-order seed
    progress: show progress bars
    """
    from freevlm.default import DefaultConfig, default_clip_path, describe_default, pretrained_default

    check.non_negative_int("seed", seed)
    with claim_output(out):
        _, backbone = pretrained_default(out, DefaultConfig(), seed=seed, progress=progress)
    print(json.dumps(describe_default(backbone), indent=2))
    print(f"backbone: {Path(out) / f'pretrain-s{seed}' / 'backbone'}")
    print(f"CapFilt ranker (tiny CLIP, for train-exits --ranker): {default_clip_path(out, seed=seed)}")
