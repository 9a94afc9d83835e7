"""VQA metrics: the official VQAv2 accuracy (also used for OK-VQA and VizWiz), GQA exact match, VizWiz answerability.

Scale: accuracies are fractions in [0, 1]; the official script and the paper's tables print x100 (64.9 = 0.649), see
`freevlm.eval.captioning.to_percent`.

The normalisation is a line-by-line port of the official VQA evaluation script (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py), quirks included, so that numbers match LAVIS and the leaderboards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from freevlm.errors import FreeVLMError
from freevlm.eval.captioning import MetricInfo

VQA_METRICS: dict[str, MetricInfo] = {
    "vqa_accuracy": MetricInfo("vqa_accuracy", True, "mean", "[0, 1]; paper prints x100"),
    "gqa_accuracy": MetricInfo("gqa_accuracy", True, "mean", "[0, 1]; paper prints x100"),
    # Answerability: positive class = unanswerable. Precision/recall/F1/AP pool the whole set, accuracy is a mean.
    "answerability_accuracy": MetricInfo("answerability_accuracy", True, "mean", "[0, 1]"),
    "answerability_precision": MetricInfo("answerability_precision", True, "corpus", "[0, 1]"),
    "answerability_recall": MetricInfo("answerability_recall", True, "corpus", "[0, 1]"),
    "answerability_f1": MetricInfo("answerability_f1", True, "corpus", "[0, 1]"),
    "answerability_average_precision": MetricInfo("answerability_average_precision", True, "corpus", "[0, 1]"),
}

# Verbatim from vqaEval.py, oddities kept: the capitalised keys ("Im", "Ive", ...) can never match because words are
# lowercased first, and "somebody'd" maps to "somebodyd". Changing either would change official scores.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = ("a", "an", "the")
# The official pattern: "(?!<=\d)" is a typo'd lookbehind (it is a lookahead for the text "<=" + digit), so in effect
# a period is removed unless a digit follows it: "dog." -> "dog", "1.5" stays, "3." -> "3".
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Official quirk: it calls periodStrip.sub("", text, re.UNICODE), passing re.UNICODE (= 32) as `count`.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: drop or space out punctuation; a period is kept only before a digit.

    A punctuation mark is deleted if it touches a space anywhere in the text, or if the text has a digit,digit comma
    ("1,000" -> "1000", and then *all* marks are deleted); otherwise it becomes a space ("black/white" ->
    "black white"). The test looks at the input text, not the partly processed one, exactly as the official code.
    """
    out = text
    has_number_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lowercase, number words -> digits, drop articles, restore contractions."""
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The official normalisation of a predicted answer: "Two dogs." -> "2 dogs", "a dog." -> "dog", "dont" -> "don't".

    Newlines/tabs -> spaces, strip, `process_punctuation`, then `process_digit_article`. Note "none" -> "0" (official).
    """
    return process_digit_article(process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the human answers, in [0, 1].

    With the standard 10 answers: for each of the 10 leave-one-out subsets of 9 answers, acc = min(#matches / 3, 1);
    the result is the mean over subsets. So a prediction given by k humans scores
    (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10: k=1 -> 0.3, k=2 -> 0.6, k=3 -> 0.9, k>=4 -> 1.0.

    Normalisation follows vqaEval.py exactly: the prediction always goes through `normalize_answer`; the human answers
    are taken as the annotation files give them (already normalised by VQA's collection pipeline) and only get
    `process_punctuation`, and only when they are not all identical. So a raw human answer "two" is not mapped to "2";
    pass answers from the official annotation files.

    Other answer counts n (not defined by the official metric): the same leave-one-out mean over the n subsets of n-1
    answers, with the full-credit threshold lowered to min(3, n-1) so that unanimous answers still score 1.0 (the
    unchanged formula would cap 3 identical answers at 2/3); with n = 1 it is exact match against that answer. For
    n = 10 this is the official metric unchanged. An empty list raises FreeVLMError (unlabelled question).
    """
    if isinstance(answers, str) or not answers:
        raise FreeVLMError(f"vqa_accuracy needs a non-empty list of human answers, got {answers!r}")
    pred = normalize_answer(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    n = len(gts)
    if n == 1:
        return float(gts[0] == pred)
    threshold = min(3, n - 1)
    matches = sum(a == pred for a in gts)
    # Leaving out a matching answer leaves matches-1 matches; leaving out any other leaves all of them.
    total = sum(min(1.0, (matches - (a == pred)) / threshold) for a in gts)
    return total / n


def gqa_accuracy(prediction: str, answer: str) -> float:
    """GQA accuracy: 1.0 if prediction and the single answer are equal after `normalize_answer` (both sides), else 0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def _average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Non-interpolated AP (as sklearn's average_precision_score): sum over thresholds of (R_k - R_{k-1}) * P_k.

    Tied scores form one threshold, so their order does not matter. NaN when there is no positive.
    """
    n_pos = int(positive.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positive[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp, fp = tp[last_of_tie], fp[last_of_tie]
    precision, recall = tp / (tp + fp), tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def vizwiz_answerability(
    pred_unanswerable: Sequence[bool],
    answerable: Sequence[bool],
    *,
    unanswerable_scores: Sequence[float] | None = None,
) -> dict[str, float]:
    """VizWiz answerability, reported separately from VQA accuracy. Positive class = unanswerable.

    From the boolean predictions: "accuracy", and "precision" / "recall" / "f1" of detecting unanswerable questions
    (0.0 where the ratio is 0/0, e.g. precision when nothing is predicted unanswerable). VizWiz's challenge ranks
    answerability by average precision, which needs a score rather than a decision: pass `unanswerable_scores` (higher
    = more likely unanswerable, e.g. the model's probability of answering "unanswerable") to also get
    "average_precision" (NaN when no question in the set is unanswerable). All values in [0, 1].
    """
    n = len(answerable)
    if n == 0 or len(pred_unanswerable) != n:
        raise FreeVLMError(
            f"vizwiz_answerability needs equal, non-zero lengths, got {len(pred_unanswerable)} predictions "
            f"and {n} labels"
        )
    pred = np.asarray(pred_unanswerable, dtype=bool)
    truth = ~np.asarray(answerable, dtype=bool)
    tp = int(np.sum(pred & truth))
    fp = int(np.sum(pred & ~truth))
    fn = int(np.sum(~pred & truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    out = {
        "accuracy": float(np.mean(pred == truth)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }
    if unanswerable_scores is not None:
        scores = np.asarray(unanswerable_scores, dtype=float)
        if scores.shape != (n,) or not np.all(np.isfinite(scores)):
            raise FreeVLMError(f"vizwiz_answerability: unanswerable_scores must be {n} finite numbers")
        out["average_precision"] = _average_precision(scores, truth)
    return out


def aggregate_vqa(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean accuracy overall and per answer type, like the official script's "overall" / "perAnswerType".

    Each record maps "accuracy" to a per-question value in [0, 1] and, optionally, "answer_type" to a string (VQAv2
    "yes/no" / "number" / "other"); records without a type count only towards "overall". Returns
    {"overall": float, "per_answer_type": {type: float}, "count": int}, unrounded and on the [0, 1] scale (the official
    script rounds x100 to 2 decimals).
    """
    total, count = 0.0, 0
    by_type: dict[str, list[float]] = {}
    for r in records:
        acc = float(r["accuracy"])
        total += acc
        count += 1
        t = r.get("answer_type")
        if t is not None:
            by_type.setdefault(t, []).append(acc)
    if count == 0:
        raise FreeVLMError("aggregate_vqa got no records")
    return {
        "overall": total / count,
        "per_answer_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
        "count": count,
    }
