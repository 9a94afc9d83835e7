"""`freevlm reproduce`: the paper's tables and figures as a report folder."""

from __future__ import annotations

from pathlib import Path

from freevlm import validate as check
from freevlm.errors import FreeVLMError
from freevlm.outputs import claim_output


def reproduce(out: Path | None = None, quick: bool = False, full: bool = False, real: bool = False, seeds: int = 3,
              methods: list[str] | None = None, plan: bool = True, overwrite: bool = False,
              progress: bool = True) -> None:
    """Reproduce the paper's tables and figures on the embedded default; write a Markdown + PNG report folder.

    out: report and run folder (default runs/reproduce; with --real, runs/real, which `demo --real` shares)
    quick: a few-minute version (1 seed, smaller evaluation sets), as CI runs it
    full: also the other backbones and the full sweeps
    real: on the real embedded VLM (SmolLM2-135M-Instruct, as `demo --real`): one seed; FREE, the baselines, the
        adversarial ablation and the per-layer study (about an hour on 2 CPU cores)
    seeds: seeds per experiment (spread is reported as mean ± std)
    methods: methods compared with FREE (default: DeeBLIP PABEE-BLIP LeeBLIP LeeBERT MuE; --quick: DeeBLIP MuE)
    plan: run `freevlm plan` on each seed's FREE exits (its dev split) and report "FREE + plan" rows (Table 4,
        Fig. 4b) and the exit-plan section; --no-plan leaves it out (a plan file does not apply here: every seed
        trains its own exits, and a plan is made for one set of exits)
    overwrite: replace the report already in `out` (trained runs in `out` are reused either way)
    progress: show progress bars
    """
    from freevlm.reproduce import check_methods
    from freevlm.reproduce import reproduce as run

    check.positive_int("seeds", seeds)
    if methods is not None:
        check_methods(methods)  # before the output is claimed
    if real:
        from freevlm.backbones.smollm import gguf_path

        if quick or full:
            raise FreeVLMError("--real runs its own configuration: drop --quick / --full")
        gguf_path()  # a missing package is one line before any work
    out = out or Path("runs/real" if real else "runs/reproduce")
    with claim_output(out, results=("report",), overwrite=overwrite):
        run(out, quick=quick, full=full, seeds=seeds, progress=progress, methods=methods, plan=plan, real=real)
