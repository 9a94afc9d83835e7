"""The static-shape decode step (what runs as CUDA graphs on a GPU) gives the dynamic engine's tokens, exit layers,
work counts and caches. On CPU its segment functions run eagerly, so this checks everything but the capture."""

from __future__ import annotations

import pytest
import torch

from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.kv import SkipPolicy
from tests.generation.regression_cases import CASES, build_case

STATIC_CASES = [c for c in CASES if c["policy"] != "catch_up"][::2]  # catch-up always runs dynamically


@pytest.mark.parametrize("case", STATIC_CASES, ids=[c["id"] for c in STATIC_CASES])
def test_static_step_equals_the_dynamic_engine(case):
    bb, exits, _, lm_inputs = build_case(case)
    runs = {}
    for static in (False, True):
        _, _, criterion, _ = build_case(case)  # a fresh criterion (some keep state)
        with torch.no_grad():
            runs[static] = generate_from_inputs(
                bb.lm, exits, lm_inputs, criterion=criterion, policy=SkipPolicy(case["policy"], case["source"]),
                max_new_tokens=case["max_new_tokens"], num_beams=case["num_beams"], static=static,
                generation_config=bb.model.generation_config, keep_cache=True)
    dynamic, static = runs[False], runs[True]
    assert static.work.static, "the static step must have run"
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    assert static.exit_layers == dynamic.exit_layers
    for a, b in zip(static.records, dynamic.records):
        assert torch.equal(a.layers, b.layers) and torch.equal(a.heads, b.heads)
    cs, cd = static.caches(), dynamic.caches()
    width = int(cd.lengths.max())
    torch.testing.assert_close(cs.keys[:, :, :, :width], cd.keys[:, :, :, :width], atol=1e-5, rtol=0)
    if cd.exit_keys is not None:
        torch.testing.assert_close(cs.exit_keys[:, :, :, :width], cd.exit_keys[:, :, :, :width], atol=1e-5, rtol=0)
