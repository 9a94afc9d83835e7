"""Paired bootstrap intervals (`eval/bootstrap.py`): per-image CIDEr adds up to the corpus CIDEr, intervals on known
differences, and the planner's bound built on them."""

from __future__ import annotations

import pytest

from freevlm.eval.bootstrap import cider_difference, format_interval, paired_bootstrap, per_image_cider
from freevlm.eval.captioning import fast_caption_metrics
from freevlm.eval.planning import drop_bound

REFS = {"a": ["a red circle", "one red circle"], "b": ["a blue square", "a small blue square"],
        "c": ["two green triangles", "a pair of green triangles"], "d": ["a yellow star", "one yellow star"]}


def test_per_image_cider_averages_to_the_corpus_cider():
    preds = {"a": "a red circle", "b": "a blue circle", "c": "two triangles", "d": "a star"}
    per = per_image_cider(preds, REFS)
    assert set(per) == set(REFS)
    assert sum(per.values()) / len(per) == pytest.approx(fast_caption_metrics(preds, REFS)["CIDEr"], rel=1e-12)
    assert per["a"] > per["d"] > 0


def test_a_constant_difference_has_a_degenerate_interval():
    a = {i: float(i) for i in range(50)}
    b = {i: i + 0.25 for i in range(50)}
    d = paired_bootstrap(a, b, scale=100)
    assert d["difference"] == pytest.approx(25.0) and d["low"] == pytest.approx(25.0) == d["high"]
    assert d["items"] == 50


def test_the_interval_covers_the_mean_and_shrinks_with_more_items():
    import random

    rng = random.Random(0)
    small = {i: rng.gauss(0, 1) for i in range(30)}
    big = {i: rng.gauss(0, 1) for i in range(3000)}
    zero_s, zero_b = dict.fromkeys(small, 0.0), dict.fromkeys(big, 0.0)
    ds, db = paired_bootstrap(zero_s, small), paired_bootstrap(zero_b, big)
    assert ds["low"] < ds["difference"] < ds["high"] and db["low"] < db["difference"] < db["high"]
    assert db["high"] - db["low"] < (ds["high"] - ds["low"]) / 4  # ~ 1/sqrt(n): 10x the items, ~1/10 the width
    assert paired_bootstrap(zero_s, small, seed=3) == paired_bootstrap(zero_s, small, seed=3)  # seeded


def test_pairing_removes_the_shared_variation():
    """Two systems whose per-image scores move together: the paired interval is tight though each side varies."""
    a = {i: float(i % 7) for i in range(100)}
    b = {i: v + (0.1 if i % 2 else -0.05) for i, v in a.items()}
    d = paired_bootstrap(a, b)
    assert 0.0 < d["low"] <= d["difference"] <= d["high"] < 0.1


def test_mismatched_items_are_refused():
    with pytest.raises(ValueError, match="one side only"):
        paired_bootstrap({"a": 1.0, "b": 2.0}, {"a": 1.0})
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap({"a": 1.0}, {"b": 1.0})


def test_cider_difference_of_identical_predictions_is_zero():
    preds = {"a": "a red circle", "b": "a blue circle", "c": "two triangles", "d": "a star"}
    d = cider_difference(preds, dict(preds), REFS)
    assert (d["difference"], d["low"], d["high"]) == (0.0, 0.0, 0.0)
    assert format_interval(d) == "+0.00 [+0.00, +0.00]"
    worse = cider_difference(preds, {**preds, "a": "a star"}, REFS)
    assert worse["difference"] < 0 and worse["low"] <= worse["difference"] <= worse["high"] <= 0


def test_the_planner_bound_is_the_upper_end_of_the_drop_interval():
    full = {i: 1.0 + (i % 5) / 10 for i in range(40)}
    cand = {i: v - (0.02 if i % 2 else 0.0) for i, v in full.items()}  # mean drop 1.0 (x100), never a gain
    point, none = drop_bound(full, cand, "point")
    assert point == pytest.approx(1.0) and none is None
    upper, interval = drop_bound(full, cand, "bootstrap")
    assert upper == pytest.approx(-interval["low"]) and upper > point  # stricter than the point estimate
    assert interval["difference"] == pytest.approx(-1.0)
