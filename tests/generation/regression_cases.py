"""The decoding cases of the engine regression test (shared with the script that recorded the old engine's outputs).

Random tiny models barely ever pass a confidence threshold, so most cases exit by `SignRule` (a rule on the row's own
hidden state that gives a mix of exits whatever the model's calibration); the real criteria run on a few families.
"""

from __future__ import annotations

import itertools

import torch

from freevlm.backbones.tiny import FAMILIES, TinySize, build_tiny
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.criteria import Confidence, Entropy, Patience, Similarity
from tests.conftest import tiny_batch

SIZE = TinySize(lm_layers=6)
# the families the old engine's outputs were recorded for (later families are checked against transformers)
LEGACY_FAMILIES = FAMILIES[:6]
EXIT_LAYERS = [2, 4]
POLICIES = [("propagate", "hidden"), ("propagate", "exit"), ("copy", "hidden"), ("catch_up", "hidden")]


class SignRule:
    """Leave when one half of the hidden state's first 16 coordinates outweighs the other."""

    needs_logits = True

    def never_exits(self):
        return False

    def new_step(self, batch, device):
        return {}

    def __call__(self, state, rows, logits, hidden, prev):
        return hidden[:, :8].sum(-1) > hidden[:, 8:16].sum(-1)


CRITERIA = {"sign": SignRule, "patience": lambda: Patience(1), "similarity": lambda: Similarity(0.0),
            "confidence": lambda: Confidence(0.06), "entropy": lambda: Entropy(4.0)}


def _cases():
    cases = []
    for fam, (pol, src), (batch, beams) in itertools.product(LEGACY_FAMILIES, POLICIES, [(1, 1), (3, 1), (3, 3)]):
        cases.append(dict(family=fam, kind="transformer", criterion="sign", policy=pol, source=src, batch=batch,
                          num_beams=beams))
    for fam, crit, (pol, src) in itertools.product(["blip2-opt", "blip2-t5", "llava-llama"], list(CRITERIA)[1:],
                                                   POLICIES):
        cases.append(dict(family=fam, kind="transformer", criterion=crit, policy=pol, source=src, batch=3,
                          num_beams=1))
    for fam, kind, pol in itertools.product(["blip2-opt", "blip2-t5", "llava-llama"], ["linear", "frozen-head"],
                                            ["propagate", "copy", "catch_up"]):
        cases.append(dict(family=fam, kind=kind, criterion="sign", policy=pol, source="hidden", batch=3,
                          num_beams=1))
    for c in cases:
        c["max_new_tokens"] = 7
        c["id"] = "/".join(str(c[k]) for k in ("family", "kind", "criterion", "policy", "source", "batch",
                                               "num_beams"))
    return cases


CASES = _cases()
_MODELS: dict = {}


def build_case(case):
    """(backbone, exits, criterion, LM inputs) of a case; models are built once per (family, exit kind)."""
    key = (case["family"], case["kind"])
    if key not in _MODELS:
        bb = build_tiny(case["family"], SIZE, seed=0)
        torch.manual_seed(1)
        _MODELS[key] = (bb, build_exits(bb.lm, ExitSpec(case["kind"], list(EXIT_LAYERS))))
    bb, exits = _MODELS[key]
    pixels, ids, mask, extra = tiny_batch(case["family"], SIZE, case["batch"], seed=3)
    return bb, exits, CRITERIA[case["criterion"]](), bb.prepare(pixels, ids, mask, **extra)
