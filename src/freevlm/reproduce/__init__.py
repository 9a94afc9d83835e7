"""`freevlm reproduce`: the paper's experiments on the embedded default, as a report folder of tables and figures.

Per seed (`seed.SeedRun`; the pretrained backbone is shared, as a released checkpoint would be; each seed draws its
own 80/20 split, stage-1 fine-tune, exit initialisation and data order), the method loop trains the full-depth
backbone's competitors (FREE, every baseline, the ablations), chooses each one's setting on the development split
and scores it on the test split with the official COCO scorer and the three speedups. Then each table in
`tables.TABLES` measures what it needs and renders its section (`report.write_report`):

- captioning, semi-supervised (Table 4: the method loop's rows); zero-shot transfer to the held-out shapes/colours
  (Table 1, NoCaps-style in/near/out-domain); ablations (Fig. 4a); per-exit agreement; Gaussian image noise
  (Table 6); exit fractions (Table 11); speedup vs quality curves (Fig. 4b) and quality vs alpha;
- per-layer quality (Fig. 3): every LM layer decoded through the frozen head, through a trained linear head per
  layer (vanilla early exit), and FREE's exits;
- unsupervised exits from knowledge distillation vs CapFilt pseudo-labels (Table 9).

`--full` adds VQA (Tables 2 and 3), VisDial MRR, the remaining ablations, and the other backbones (Tables 5, 7, 8:
MiniGPT-4-shaped BLIP-2 with a Llama LM, and InstructBLIP). `--quick` runs a tiny version in a few minutes (CI).
The report ends with whether each of the paper's qualitative claims holds here, with the spread over seeds
(`claims.py`).
"""

from __future__ import annotations

import time
from pathlib import Path

from freevlm.baselines import METHODS
from freevlm.errors import FreeVLMError
from freevlm.eval.captioning import shared_meteor
from freevlm.reproduce.config import ReproduceConfig, quick_config, real_config
from freevlm.reproduce.report import tree_state, write_report
from freevlm.reproduce.run import run_seeds
from freevlm.reproduce.tables import REAL_TABLES, TABLES


def _run_seeds(cfg: ReproduceConfig, out: Path, full: bool, progress: bool,
               tables=TABLES) -> tuple[list[dict], dict]:
    return run_seeds(cfg, out, full, progress, tables)


def reproduce(out: str | Path = "runs/reproduce", quick: bool = False, full: bool = False, seeds: int = 3,
              progress: bool = True, config: ReproduceConfig | None = None,
              methods: list[str] | tuple[str, ...] | None = None, plan: bool = True, real: bool = False) -> Path:
    """Run the experiments and write `out/report`. `methods`: the methods compared with FREE (FREE is always run);
    None keeps the configuration's (by default every baseline). `real`: the real embedded VLM (`real_config`: one
    seed, `REAL_TABLES`)."""
    out = Path(out)
    start = time.perf_counter()
    provenance = tree_state()  # the code that runs is the code at launch, whatever happens to the tree meanwhile
    if real and (quick or full):
        raise FreeVLMError("--real runs its own configuration: drop --quick / --full")
    cfg = config or (real_config() if real else quick_config() if quick else ReproduceConfig(seeds=seeds))
    tables = REAL_TABLES if cfg.real is not None else TABLES
    if methods is not None:
        check_methods(methods)
        cfg.methods = ("FREE", *dict.fromkeys(m for m in methods if m != "FREE"))
    if full:
        cfg.ablations = ("no-adversarial", "no-ce", "no-kd")
    cfg.plan = cfg.plan and plan
    with shared_meteor():  # one METEOR JVM for every official score of the run
        per_seed, model_info = _run_seeds(cfg, out, full, progress, tables)
    report_dir = out / "report"
    write_report(report_dir, cfg, per_seed, model_info, time.perf_counter() - start, quick=quick, full=full,
                 provenance=provenance, tables=tables)
    print(f"report: {report_dir / 'README.md'}")
    return report_dir


def check_methods(methods) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FreeVLMError(f"unknown method {', '.join(map(repr, unknown))} for --methods; choose from "
                           f"{', '.join(m for m in METHODS if m != 'FREE')}")


__all__ = ["FreeVLMError", "ReproduceConfig", "check_methods", "quick_config", "real_config", "reproduce"]
