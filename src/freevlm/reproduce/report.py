"""The report folder: README.md (a header, each table's section in `TABLES` order, the claims, what is not shown),
results.json (every number, per seed), config.json and the figures."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from freevlm.machine import system_info
from freevlm.outputs import replace_folder, write_json, write_text
from freevlm.reproduce.claims import claims
from freevlm.reproduce.config import ReproduceConfig
from freevlm.reproduce.tables import TABLES, Report, Table


def tree_state() -> dict:
    """The code that runs: the src tree hash, the commit, and whether src has uncommitted changes."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    status = git("status", "--porcelain", "src")
    return {"src_tree": git("rev-parse", "HEAD:src"), "commit": git("rev-parse", "HEAD"),
            "dirty": bool(status), "status": status}


def header(cfg: ReproduceConfig, runs: list[dict], model: dict, seconds: float, quick: bool,
           provenance: dict) -> list[str]:
    title = ("FREE on the real SmolLM2-135M VLM: reproduction report (--real)" if cfg.real is not None else
             f"FREE on the embedded default: reproduction report ({'quick' if quick else 'default'} mode)")
    spread = ("one seed; differences carry paired-bootstrap 95% intervals over test images" if len(runs) == 1 else
              "mean ± std over seeds")
    return [
        f"# {title}", "",
        f"- src tree: `{provenance['src_tree']}` (commit `{provenance['commit'][:12]}`"
        f"{', **dirty**: uncommitted changes in src' if provenance['dirty'] else ', clean'})",
        f"- machine: {json.dumps(system_info())}; wall time {seconds / 60:.1f} min "
        f"(including the backbone's pretraining unless it was cached)",
        f"- software: torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"accelerate {__import__('accelerate').__version__}, python {platform.python_version()}",
        f"- seeds: {len(runs)} (split, stage 1, exit initialisation and data order; the pretrained backbone is shared)",
        f"- model: {json.dumps(model)}",
        "- configuration: `results.json` holds every number; the run configuration is `config.json`.",
        f"- quality is x100 (as the paper prints); {spread}; 'param', 'compute' = the parameter and "
        "compute speedups, 'wall' = measured tokens/s ratio vs full-depth decoding (batch 1).",
        "",
    ]


def write_report(folder: Path, cfg: ReproduceConfig, runs: list[dict], model: dict, seconds: float, quick: bool,
                 full: bool, provenance: dict | None = None, tables: Sequence[Table] = TABLES) -> None:
    """The report is built in a temporary sibling folder and renamed into place (see freevlm.outputs), so an
    earlier report is replaced only by a complete new one."""
    final = Path(folder)
    folder = final.with_name(f".{final.name}.tmp")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_json(folder / "results.json", runs, default=str)
    lines = header(cfg, runs, model, seconds, quick, provenance or tree_state())
    write_json(folder / "config.json", asdict(cfg), default=str)
    report = Report(runs, cfg, folder)
    for table in tables:
        lines += table.render(report)
    lines += ["## The paper's claims, here", "", *claims(runs, cfg), ""]
    if cfg.real is not None:
        lines += ["Not in this mode: NoCaps-style transfer (Table 1), image noise (Table 6), CapFilt vs KD (Table 9), "
                  "the exit plan and speculative tables, VQA and the other backbones: `freevlm reproduce` runs them "
                  "on the embedded default; `freevlm demo --real` runs the plan and speculative mode on this VLM.", ""]
    elif not full:
        lines += ["Not in this mode: VQA (Tables 2, 3), VisDial MRR, the no-CE / no-KD ablations and the other "
                  "backbones (Tables 5, 7, 8) run with `freevlm reproduce --full`; real-dataset tables run on real "
                  "data with `freevlm evaluate`.", ""]
    lines += ["Real data only: the paper's absolute numbers (COCO, NoCaps, VQAv2, OK-VQA, GQA, VizWiz, VisDial on "
              "BLIP-2 OPT-2.7B / FlanT5-XL) need the real checkpoints and datasets; every table here is on the "
              "synthetic stand-ins and a small model, so only the qualitative claims can be compared.", ""]
    write_text(folder / "README.md", "\n".join(lines))
    replace_folder(folder, final)
