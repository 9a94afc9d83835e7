"""Speedup accounting on hand-computed cases."""

from __future__ import annotations

import math

import torch

from freevlm.eval.efficiency import CostModel, compute_speedup, exit_fractions, parameter_speedup
from freevlm.generation.engine import StepRecord


def test_parameter_speedup_counts_the_exit_layer():
    # 12-layer LM; tokens at exit 3 (uses 3 + 1), exit 9 (9 + 1) and the final layer (12): mean 26 / 3
    assert math.isclose(parameter_speedup([3, 9, 12], 12), 12 / (26 / 3))
    assert parameter_speedup([12, 12], 12) == 1.0
    assert parameter_speedup([], 12) == 1.0


def test_compute_speedup_pays_for_checks_and_fills():
    cost = CostModel(num_layers=4, layer=10.0, exit_layer=10.0, head=5.0, kv_projection=2.0)
    prefill = StepRecord.zeros(2, 4, "cpu", prefill=True)
    step = StepRecord.zeros(2, 4, "cpu", prefill=False)
    # row 0: ran 2 layers, 1 exit transformer, 1 head, propagated 2 skipped layers; row 1: full depth + 1 check
    step.layers = torch.tensor([2.0, 4.0])
    step.exit_layers = torch.tensor([1.0, 1.0])
    step.heads = torch.tensor([1.0, 2.0])
    step.kv_projections = torch.tensor([2.0, 0.0])
    actual = (20 + 10 + 5 + 4) + (40 + 10 + 10)
    full = 2 * (4 * 10 + 5)
    live = [torch.arange(2), torch.arange(2)]
    assert math.isclose(compute_speedup([prefill, step], live, cost), full / actual)
    # a row no longer in use (finished) does not count
    assert math.isclose(compute_speedup([prefill, step], [torch.arange(2), torch.tensor([0])], cost), 45 / 39)


def test_exit_fractions_include_the_final_layer():
    assert exit_fractions([3, 3, 9, 12], [3, 9], 12) == {3: 0.5, 9: 0.25, 12: 0.25}
