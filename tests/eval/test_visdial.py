from __future__ import annotations

import numpy as np
import pytest

from freevlm.errors import FreeVLMError
from freevlm.eval.visdial import gt_rank, mean_rank, mrr, recall_at_k, reciprocal_rank, visdial_metrics


def test_gt_rank_highest_first():
    assert gt_rank([0.1, 0.9, 0.3], 1) == 1
    assert gt_rank([0.1, 0.9, 0.3], 2) == 2
    assert gt_rank([5.0, 4.0, 3.0, 2.0, 1.0], 4) == 5
    assert gt_rank([-1.0, float("-inf"), -3.0], 1) == 3  # log-probs, -inf included


def test_gt_rank_ties_are_pessimistic():
    # 0.7 is tied between candidates 1 and 2: both count as ranked ahead of (or with) the ground truth -> rank 2.
    assert gt_rank([0.1, 0.7, 0.7, 0.2], 1) == 2
    assert gt_rank([0.1, 0.7, 0.7, 0.2], 2) == 2
    # A constant scorer gets the worst rank, so it cannot reach MRR 1.
    assert gt_rank([0.0] * 100, 37) == 100


def test_reciprocal_rank():
    assert reciprocal_rank([0.2, 0.5, 0.9, 0.1], 1) == 0.5  # 0.9 ahead -> rank 2
    assert reciprocal_rank(np.array([3.0, 1.0]), 0) == 1.0


def test_aggregates_on_hand_ranks():
    ranks = [1, 2, 4, 10, 20]
    # MRR = (1 + 1/2 + 1/4 + 1/10 + 1/20) / 5 = 1.9 / 5 = 0.38
    assert mrr(ranks) == pytest.approx(0.38)
    assert recall_at_k(ranks, 1) == pytest.approx(0.2)  # {1}
    assert recall_at_k(ranks, 5) == pytest.approx(0.6)  # {1, 2, 4}
    assert recall_at_k(ranks, 10) == pytest.approx(0.8)  # {1, 2, 4, 10}
    assert mean_rank(ranks) == pytest.approx(37 / 5)
    assert visdial_metrics(ranks) == pytest.approx({"MRR": 0.38, "R@1": 0.2, "R@5": 0.6, "R@10": 0.8, "mean_rank": 7.4})
    assert mrr(np.array([1, 4], dtype=np.int64)) == pytest.approx(0.625)  # numpy ints are ranks too


@pytest.mark.parametrize(
    "call",
    [
        lambda: gt_rank([0.1, 0.2], 2),  # index out of range
        lambda: gt_rank([0.1, 0.2], -1),
        lambda: gt_rank([], 0),
        lambda: gt_rank([0.1, float("nan")], 0),
        lambda: mrr([]),
        lambda: mrr([1.0, 0.5]),  # reciprocal ranks passed where ranks are expected
        lambda: mrr([0, 1]),  # ranks are 1-based
        lambda: recall_at_k([1, 2], 0),
    ],
)
def test_bad_inputs_raise(call):
    with pytest.raises(FreeVLMError):
        call()
