"""Exit criteria on hand-made distributions."""

from __future__ import annotations

import math

import pytest
import torch

from freevlm.errors import FreeVLMError
from freevlm.generation.criteria import Confidence, Entropy, Patience, Similarity, make_criterion


def _logits(probs):
    return torch.log(torch.tensor(probs))


def test_confidence_exits_strictly_above_alpha():
    c = Confidence(0.8)
    rows = torch.arange(3)
    logits = _logits([[0.9, 0.1], [0.8, 0.2], [0.5, 0.5]])
    assert c(c.new_step(3, "cpu"), rows, logits, None, None).tolist() == [True, False, False]
    assert Confidence(1.0).never_exits() and not Confidence(0.99).never_exits()
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(FreeVLMError, match="alpha must lie in"):
            Confidence(bad)


def test_entropy_exits_below_threshold():
    e = Entropy(0.5)
    logits = _logits([[0.95, 0.05], [0.5, 0.5]])  # entropies 0.199 and log 2 = 0.693 nats
    assert e(e.new_step(2, "cpu"), torch.arange(2), logits, None, None).tolist() == [True, False]
    assert math.isclose(-(0.95 * math.log(0.95) + 0.05 * math.log(0.05)), 0.1985, abs_tol=1e-3)


def test_patience_counts_consecutive_agreements_per_row():
    p = Patience(2)
    state = p.new_step(2, "cpu")
    rows = torch.arange(2)
    seq = [[0, 1], [0, 2], [0, 2], [1, 2]]  # row 0 agrees at exits 2 and 3; row 1 at exits 3 and 4
    decisions = []
    for argmax in seq:
        logits = torch.nn.functional.one_hot(torch.tensor(argmax), 3).float()
        decisions.append(p(state, rows, logits, None, None).tolist())
    assert decisions == [[False, False], [False, False], [True, False], [False, True]]


def test_similarity_uses_the_layer_input_and_output():
    s = Similarity(0.9)
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    prev = torch.tensor([[1.0, 0.1], [0.0, 1.0]])
    assert s(s.new_step(2, "cpu"), torch.arange(2), None, h, prev).tolist() == [True, False]
    assert not s.needs_logits


def test_make_criterion_by_name():
    assert make_criterion("patience", 3) == Patience(3)
    with pytest.raises(FreeVLMError, match="unknown exit criterion"):
        make_criterion("depth", 1)
