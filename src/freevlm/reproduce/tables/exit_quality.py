"""Exits one by one, FREE vs no adversarial term: each exit's agreement with the final layer (teacher-forced) and the
dev CIDEr when every token leaves at it."""

from __future__ import annotations

import torch

from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.losses import IGNORE
from freevlm.reproduce.seed import forced_exit
from freevlm.reproduce.tables.base import Report, Table, markdown_table, ms, section
from freevlm.train.batches import Collator, caption_examples
from freevlm.train.forward import teacher_forced

COMPARED = ("FREE", "no-adversarial")


def measure(run, core) -> dict:
    return {name: exit_quality(run, core.backbone, core.trained[name]) for name in COMPARED if name in core.trained}


@torch.no_grad()
def exit_quality(run, bb, exits) -> dict:
    """Per exit: agreement of its argmax with the final layer's (teacher-forced, on the dev captions' label
    positions) and the dev CIDEr when every token leaves at that exit."""
    examples = caption_examples(run.dev, every_caption=False)
    batch = Collator(bb)(examples)
    tf = teacher_forced(bb, batch, keep=set(exits.layers), logits=True)
    final = tf.logits.argmax(-1)
    mask = tf.targets != IGNORE
    out = {}
    for layer, exit_ in zip(exits.layers, exits.exits):
        pred = exit_.logits(bb.lm, exit_.state(bb.lm, tf.states[layer], tf.ctx, None)).argmax(-1)
        agreement = float(((pred == final) & mask).sum() / mask.sum())
        r = run.captions(EarlyExitVLM(bb, forced_exit(exits, layer)), run.dev, DecodeOptions(threshold=1e-9))
        out[layer] = {"agreement": agreement, "CIDEr": 100 * r.metrics["CIDEr"]}
    return out


def render(report: Report) -> list[str]:
    runs = report.runs
    if not runs[0].get("exit_quality"):
        return []
    names = list(runs[0]["exit_quality"])
    rows = []
    for layer in runs[0]["exit_quality"][names[0]]:
        row = [layer]
        for name in names:
            row += [ms([r["exit_quality"][name][layer]["agreement"] for r in runs], 100),
                    ms([r["exit_quality"][name][layer]["CIDEr"] for r in runs])]
        rows.append(row)
    headers = ["exit layer"] + [f"{n} {m}" for n in names for m in ("agreement %", "CIDEr")]
    return section("Exits one by one — agreement with the final layer, and quality when decoding from it alone",
                   "Agreement: share of dev label positions where the exit's top token equals the final layer's "
                   "(teacher-forced). CIDEr: the dev split decoded with every token leaving at that exit.",
                   markdown_table(headers, rows))


TABLE = Table(render, measure, key=("exit_quality",))
