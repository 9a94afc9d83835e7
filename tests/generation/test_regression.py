"""The lean engine reproduces the engine it replaced: tokens, per-token exit layers and work counts.

`data/legacy_engine.json` holds what freevlm's previous engine (transformers' `generate` driving a layer-by-layer
step over `DynamicCache`, commit 46bb8c6) produced for every case of `regression_cases.py`: every family, every KV
policy, batch 1 / padded batches / beams, FREE exit transformers and the baselines' linear and frozen-head exits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.kv import SkipPolicy
from tests.generation.regression_cases import CASES, build_case

LEGACY = json.loads((Path(__file__).parent / "data" / "legacy_engine.json").read_text())["cases"]
FIELDS = ("layers", "exit_layers", "heads", "kv_projections", "kv_copies")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_tokens_exit_layers_and_work_equal_the_previous_engine(case):
    bb, exits, criterion, lm_inputs = build_case(case)
    with torch.no_grad():
        res = generate_from_inputs(bb.lm, exits, lm_inputs, criterion=criterion,
                                   policy=SkipPolicy(case["policy"], case["source"]),
                                   max_new_tokens=case["max_new_tokens"], num_beams=case["num_beams"],
                                   generation_config=bb.model.generation_config)
    want = LEGACY[case["id"]]
    assert [res.sequences[i, : len(t)].tolist() for i, t in enumerate(res.trace)] == want["tokens"]
    assert res.exit_layers == want["exit_layers"]
    got = [[float(getattr(r, f).sum()) for f in FIELDS] for r in res.records]
    assert got == want["records"]


def test_the_cases_exit_at_a_mix_of_layers():
    """The regression only means something if tokens leave at different layers."""
    seen = {layer for case in LEGACY.values() for seq in case["exit_layers"] for layer in seq}
    assert {2, 4, 6} <= seen
