"""VisDial retrieval metrics over the candidate answers: MRR (the paper's Table 3 metric), R@k and mean rank.

A model scores each of a question's candidates (VisDial v1.0: 100); the ground truth's 1-based rank among them is
the per-question quantity, and every aggregate below takes a sequence of such ranks.

Scale: MRR and R@k are fractions in [0, 1] (the paper prints MRR x100: 45.9 = 0.459); mean rank is in
[1, #candidates].

Ties: pessimistic. The ground truth ranks below every candidate scored >= it (rank = #candidates with score >= the
ground truth's), so a scorer that gives all candidates the same value gets the worst rank, not the best. Early-exit
heads in low precision can produce exact ties; the official starter code breaks them by torch.sort's arbitrary order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

from freevlm.errors import FreeVLMError
from freevlm.eval.captioning import MetricInfo

VISDIAL_METRICS: dict[str, MetricInfo] = {
    "MRR": MetricInfo("MRR", True, "mean", "[0, 1]; paper prints x100"),
    **{f"R@{k}": MetricInfo(f"R@{k}", True, "mean", "[0, 1]") for k in (1, 5, 10)},
    "mean_rank": MetricInfo("mean_rank", False, "mean", "[1, #candidates]"),
}


def gt_rank(scores: Sequence[float], gt_index: int) -> int:
    """1-based rank of scores[gt_index], highest score first; ties pessimistic (see the module docstring).

    Example: scores [0.1, 0.7, 0.7, 0.2], gt_index 1 -> rank 2 (candidates 1 and 2 both score >= 0.7).
    """
    n = len(scores)
    if n == 0:
        raise FreeVLMError("gt_rank needs at least one candidate score")
    if isinstance(gt_index, bool) or not isinstance(gt_index, Integral) or not 0 <= gt_index < n:
        raise FreeVLMError(f"gt_index {gt_index!r} is out of range for {n} candidates")
    values = [float(s) for s in scores]
    nan_at = next((i for i, v in enumerate(values) if math.isnan(v)), None)
    if nan_at is not None:
        raise FreeVLMError(f"candidate score {nan_at} is NaN; cannot rank the ground truth")
    gt = values[gt_index]
    return sum(v >= gt for v in values)


def reciprocal_rank(scores: Sequence[float], gt_index: int) -> float:
    """1 / gt_rank(scores, gt_index): 1.0 when the ground truth is scored strictly highest."""
    return 1.0 / gt_rank(scores, gt_index)


def _check_ranks(ranks: Sequence[int]) -> list[int]:
    if len(ranks) == 0:
        raise FreeVLMError("VisDial metrics need at least one rank")
    for r in ranks:
        # Reject floats so that reciprocal ranks (0.5, 1.0, ...) passed by mistake fail loudly instead of scoring.
        if isinstance(r, bool) or not isinstance(r, Integral) or r < 1:
            raise FreeVLMError(f"VisDial metrics take 1-based integer ranks (see gt_rank), got {r!r}")
    return [int(r) for r in ranks]


def mrr(ranks: Sequence[int]) -> float:
    """Mean reciprocal rank: mean of 1 / rank over questions. Takes ranks (from `gt_rank`), not reciprocal ranks."""
    rs = _check_ranks(ranks)
    return sum(1.0 / r for r in rs) / len(rs)


def recall_at_k(ranks: Sequence[int], k: int) -> float:
    """Fraction of questions whose ground truth ranks in the top k (rank <= k)."""
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise FreeVLMError(f"recall_at_k needs an integer k >= 1, got {k!r}")
    rs = _check_ranks(ranks)
    return sum(r <= k for r in rs) / len(rs)


def mean_rank(ranks: Sequence[int]) -> float:
    """Mean 1-based rank of the ground truth (lower is better)."""
    rs = _check_ranks(ranks)
    return sum(rs) / len(rs)


def visdial_metrics(ranks: Sequence[int]) -> dict[str, float]:
    """The standard VisDial retrieval set: {"MRR", "R@1", "R@5", "R@10", "mean_rank"} (no NDCG: needs dense labels)."""
    return {
        "MRR": mrr(ranks),
        **{f"R@{k}": recall_at_k(ranks, k) for k in (1, 5, 10)},
        "mean_rank": mean_rank(ranks),
    }
