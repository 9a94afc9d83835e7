from __future__ import annotations

import math

import numpy as np
import pytest

from freevlm.errors import FreeVLMError
from freevlm.eval.vqa import (
    aggregate_vqa,
    gqa_accuracy,
    normalize_answer,
    process_punctuation,
    vizwiz_answerability,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),  # number word -> digit, lowercased
        ("a dog.", "dog"),  # article dropped, trailing period stripped
        ("The Cat, dog", "cat dog"),  # ", " touches a space -> comma deleted
        ("1,000", "1000"),  # digit,digit comma -> all punctuation deleted, not spaced
        ("3.5", "3.5"),  # a period before a digit stays
        ("3.", "3"),
        ("black/white", "black white"),  # "/" touches no space -> becomes a space
        ("yes!", "yes"),
        ("Dont", "don't"),
        ("isnt", "isn't"),
        ("whats up", "what's up"),
        ("none", "0"),  # official: "none" is a number word
        ("  ten\tapples\n", "10 apples"),
        ("Im", "im"),  # official map's capitalised keys never match after lowercasing
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_process_punctuation_checks_the_input_text_not_the_partial_output():
    # "-" touches no space in "t-shirt (red)" but "(" does; each mark is decided on its own: "-" -> " ",
    # "(" deleted (it follows a space), ")" -> " " (no space next to it) -> "t shirt red ".
    assert process_punctuation("t-shirt (red)") == "t shirt red "


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        # k of 10 humans said "yes". Leave-one-out over the 10 subsets of 9:
        (0, 0.0),
        (1, 0.3),  # drop the "yes": 0 matches -> 0 (1 subset); drop another: 1/3 (9 subsets) -> 3/10
        (2, 0.6),  # drop a "yes": 1/3 (2 subsets); drop another: 2/3 (8 subsets) -> (2/3 + 16/3) / 10 = 0.6
        (3, 0.9),  # drop a "yes": 2/3 (3 subsets); drop another: 3/3 = 1 (7 subsets) -> (2 + 7) / 10 = 0.9
        (4, 1.0),  # drop a "yes": still 3 matches -> 1 everywhere
        (10, 1.0),
    ],
)
def test_vqa_accuracy_k_of_10(k, expected):
    answers = ["yes"] * k + ["no"] * (10 - k)
    assert vqa_accuracy("yes", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalises_the_prediction():
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("a dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("1,000", ["1000"] * 6 + ["100"] * 4) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("Isnt", ["isn't"] * 2 + ["is"] * 8) == pytest.approx(0.6)


def test_vqa_accuracy_follows_official_gt_handling():
    # Disagreeing human answers get processPunctuation: "t-shirt" -> "t shirt", matching the normalised prediction.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 4 + ["shirt"] * 6) == 1.0
    # Unanimous answers are left as given (official quirk), and answers never get number-word mapping.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    assert vqa_accuracy("2", ["two"] * 10) == 0.0


def test_vqa_accuracy_other_answer_counts():
    # n = 3, all "2": each 2-answer subset has 2 matches, threshold min(3, 2) = 2 -> 1.0 (not the capped 2/3).
    assert vqa_accuracy("Two", ["2"] * 3) == 1.0
    # n = 2: drop "2" -> ["3"]: 0; drop "3" -> ["2"]: 1/min(3, 1) = 1 -> mean 0.5.
    assert vqa_accuracy("2", ["2", "3"]) == 0.5
    # n = 1: exact match.
    assert vqa_accuracy("the dog", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    # n = 5, 1 match: drop it -> 0; drop any of the 4 others -> 1/3 -> (4/3) / 5.
    assert vqa_accuracy("red", ["red", "blue", "blue", "green", "pink"]) == pytest.approx(4 / 15)


def test_vqa_accuracy_rejects_no_answers():
    with pytest.raises(FreeVLMError):
        vqa_accuracy("yes", [])
    with pytest.raises(FreeVLMError):
        vqa_accuracy("yes", "yes")  # a bare string is not a list of answers


def test_gqa_accuracy():
    assert gqa_accuracy("The Table.", "table") == 1.0
    assert gqa_accuracy("two", "2") == 1.0  # both sides normalised
    assert gqa_accuracy("tables", "table") == 0.0
    assert gqa_accuracy("left", "right") == 0.0


def test_vizwiz_answerability_from_booleans():
    # truth unanswerable = [T, F, F, T, F]; pred = [T, T, F, F, F] -> TP 1 (idx 0), FP 1 (idx 1), FN 1 (idx 3),
    # TN 2 -> accuracy 3/5, precision 1/2, recall 1/2, F1 1/2.
    got = vizwiz_answerability([True, True, False, False, False], [False, True, True, False, True])
    assert got == pytest.approx({"accuracy": 0.6, "precision": 0.5, "recall": 0.5, "f1": 0.5})


def test_vizwiz_answerability_average_precision():
    answerable = [False, True, True, False, True]  # positives (unanswerable) at indices 0 and 3
    # Ranked by score: 0.9 (pos) 0.8 (neg) 0.6 (pos) 0.3 (neg) 0.1 (neg):
    # P/R at each cut: 1/0.5, 0.5/0.5, 2/3/1, ... -> AP = 0.5 * 1 + 0 + 0.5 * 2/3 = 5/6.
    got = vizwiz_answerability(
        [True, True, False, False, False], answerable, unanswerable_scores=[0.9, 0.8, 0.3, 0.6, 0.1]
    )
    assert got["average_precision"] == pytest.approx(5 / 6)
    # All scores tied: one threshold, precision 2/5 at recall 1 -> AP 0.4 whatever the order.
    tied = vizwiz_answerability([False] * 5, answerable, unanswerable_scores=np.full(5, 0.5))
    assert tied["average_precision"] == pytest.approx(0.4)
    # Nothing predicted unanswerable: precision/recall/F1 are 0/0 -> 0.0 by our rule.
    assert tied["precision"] == 0.0 and tied["f1"] == 0.0
    # No unanswerable question at all: AP undefined -> NaN.
    assert math.isnan(vizwiz_answerability([False], [True], unanswerable_scores=[0.2])["average_precision"])


def test_vizwiz_answerability_rejects_bad_lengths():
    with pytest.raises(FreeVLMError):
        vizwiz_answerability([True], [True, False])
    with pytest.raises(FreeVLMError):
        vizwiz_answerability([True], [False], unanswerable_scores=[0.1, 0.2])
    with pytest.raises(FreeVLMError):
        vizwiz_answerability([True], [False], unanswerable_scores=[float("nan")])


def test_aggregate_vqa():
    records = [
        {"accuracy": 1.0, "answer_type": "yes/no"},
        {"accuracy": 0.0, "answer_type": "yes/no"},
        {"accuracy": 0.6, "answer_type": "number"},
        {"accuracy": 0.3},  # no type: counts only towards "overall"
    ]
    got = aggregate_vqa(records)
    assert got["overall"] == pytest.approx(1.9 / 4)
    assert got["per_answer_type"] == pytest.approx({"number": 0.6, "yes/no": 0.5})
    assert got["count"] == 4
    with pytest.raises(FreeVLMError):
        aggregate_vqa([])
