from __future__ import annotations

import math
import shutil

import pytest

from freevlm.errors import FreeVLMError
from freevlm.eval import captioning
from freevlm.eval.captioning import (
    CAPTION_METRICS,
    caption_metrics,
    fast_caption_metrics,
    shared_meteor,
    simple_tokenize,
    to_percent,
)

# Hand-checkable set: lowercase, no punctuation, so PTB tokenisation is the identity and fast == official.
HAND_REFS = {
    "1": ["a man rides a blue bike"],
    "2": ["a man rides a blue bike"],
    "3": ["two dogs play in the snow", "dogs in snow"],
}
HAND_PREDS = {
    "1": "a man rides a red bike",
    "2": "a man rides a bike",
    "3": "two dogs play in the snow",
}
# Clipped n-gram matches / hypothesis n-grams per image (n = 1..4):
#   1: "a man rides a red bike" vs "a man rides a blue bike": 1g a,a,man,rides,bike = 5/6; 2g "a man","man rides",
#      "rides a" = 3/5; 3g "a man rides","man rides a" = 2/4; 4g "a man rides a" = 1/3. len 6, ref len 6.
#   2: "a man rides a bike": 1g 5/5; 2g "a man","man rides","rides a" = 3/4 ("a bike" is not in the ref);
#      3g "a man rides","man rides a" = 2/3; 4g "a man rides a" = 1/2. len 5, ref len 6.
#   3: identical to its first ref: 6/6, 5/5, 4/4, 3/3; len 6, closest ref length 6 (not 3), so no brevity penalty.
# Corpus BLEU pools the counts: 16/17, 11/14, 8/11, 5/8; hyp length 17, ref length 18 -> BP = exp(1 - 18/17).
_P = [16 / 17, 11 / 14, 8 / 11, 5 / 8]
_BP = math.exp(1 - 18 / 17)
HAND_BLEU = {f"BLEU-{n}": math.prod(_P[:n]) ** (1 / n) * _BP for n in range(1, 5)}
# ROUGE-L = mean over images of F_beta (beta = 1.2) of LCS precision/recall (max over refs):
#   1: LCS 5, P = R = 5/6 -> F = 5/6; 2: LCS 5, P = 1, R = 5/6 -> F = 2.44 * 5/6 / (5/6 + 1.44); 3: P = R = 1 -> 1.
HAND_ROUGE_L = (5 / 6 + 2.44 * (5 / 6) / (5 / 6 + 1.44) + 1.0) / 3


def test_hand_bleu_values_are_what_we_computed():
    # Pin the hand arithmetic itself: BLEU-1 = 16/17 * exp(-1/17) = 0.9412 * 0.9429 = 0.8874.
    assert HAND_BLEU["BLEU-1"] == pytest.approx(0.88745, abs=1e-4)
    assert HAND_BLEU["BLEU-4"] == pytest.approx((16 / 17 * 11 / 14 * 8 / 11 * 5 / 8) ** 0.25 * _BP)
    assert abs(HAND_ROUGE_L - 0.90926) < 1e-4


def test_fast_bleu4_matches_hand_computation():
    got = fast_caption_metrics(HAND_PREDS, HAND_REFS)
    assert set(got) == {"BLEU-4", "CIDEr"}
    # pycocoevalcap adds 1e-15 / 1e-9 to every ratio; far below this tolerance.
    assert got["BLEU-4"] == pytest.approx(HAND_BLEU["BLEU-4"], abs=1e-8)


@pytest.fixture
def meteor_jvms(monkeypatch) -> list:
    """Every METEOR scorer (one JVM each) started while the test runs, in order."""
    from pycocoevalcap.meteor.meteor import Meteor

    started = []
    original_init = Meteor.__init__

    def spy_init(self):
        original_init(self)
        started.append(self)

    monkeypatch.setattr(Meteor, "__init__", spy_init)
    return started


@pytest.mark.java
@pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH")
def test_official_matches_hand_values_and_fast_path(meteor_jvms):
    started = meteor_jvms
    got = caption_metrics(HAND_PREDS, HAND_REFS)

    assert set(got) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    for k, v in HAND_BLEU.items():
        assert got[k] == pytest.approx(v, abs=1e-8), k
    assert got["ROUGE-L"] == pytest.approx(HAND_ROUGE_L, abs=1e-12)
    assert 0.3 < got["METEOR"] < 1.0  # one perfect caption, two near misses
    fast = fast_caption_metrics(HAND_PREDS, HAND_REFS)
    assert got["BLEU-4"] == pytest.approx(fast["BLEU-4"], abs=1e-12)
    assert got["CIDEr"] == pytest.approx(fast["CIDEr"], abs=1e-12)
    assert got["CIDEr"] > 0.0
    # Exactly one METEOR JVM per call, killed and reaped (returncode set => not a zombie).
    assert len(started) == 1
    assert started[0].meteor_p.returncode is not None


@pytest.mark.java
@pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH")
def test_shared_meteor_keeps_one_jvm_for_every_call_in_the_block(meteor_jvms):
    started = meteor_jvms
    alone, started[:] = caption_metrics(HAND_PREDS, HAND_REFS), []
    with shared_meteor():
        first = caption_metrics(HAND_PREDS, HAND_REFS)
        second = caption_metrics(HAND_PREDS, HAND_REFS)
        assert len(started) == 1 and started[0].meteor_p.poll() is None  # still running between calls
    assert first == second == alone  # the warm JVM scores exactly as a fresh one
    assert started[0].meteor_p.returncode is not None  # closed and reaped when the block ends
    caption_metrics(HAND_PREDS, HAND_REFS)
    assert len(started) == 2 and started[1].meteor_p.returncode is not None  # outside: one per call again


@pytest.mark.java
@pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH")
def test_official_identical_captions_score_perfectly_after_ptb_tokenisation():
    # Predictions differ from the references only in case and punctuation, which PTB tokenisation removes.
    refs = {
        "a": ["a man rides a red bike"],
        "b": ["two dogs play in the snow"],
        "c": ["a bowl of fruit on a wooden table"],
    }
    preds = {
        "a": "A man rides a red bike.",
        "b": "Two dogs play in the snow!",
        "c": "A bowl of fruit, on a wooden table.",
    }
    got = caption_metrics(preds, refs)
    # pycocoevalcap's BLEU is (matches + 1e-15) / (ngrams + 1e-9) per order, so 1 - O(1e-10), not exactly 1.
    for n in range(1, 5):
        assert got[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-8)
    assert got["METEOR"] == pytest.approx(1.0, abs=1e-9)
    assert got["ROUGE-L"] == 1.0
    # CIDEr: cosine 1 for each n = 1..4 (every caption has 4-grams and a non-shared n-gram), x10 -> 10.
    assert got["CIDEr"] == pytest.approx(10.0, abs=1e-9)


CIDER_REFS = {
    "a": ["a man rides a red bike"],
    "b": ["two dogs play in the snow"],
    "c": ["a bowl of fruit on a wooden table"],
}


def test_cider_orders_perfect_partial_wrong():
    perfect = fast_caption_metrics({k: v[0] for k, v in CIDER_REFS.items()}, CIDER_REFS)["CIDEr"]
    partial = fast_caption_metrics(
        {"a": "a man rides a blue bike", "b": "two cats play in the snow", "c": "a bowl of apples on a table"},
        CIDER_REFS,
    )["CIDEr"]
    # No predicted n-gram occurs in any reference -> every cosine is 0.
    wrong = fast_caption_metrics({"a": "zebra", "b": "purple sky", "c": "old clock tower"}, CIDER_REFS)["CIDEr"]
    assert perfect == pytest.approx(10.0, abs=1e-9)
    assert wrong == 0.0
    assert perfect > partial > wrong
    assert 1.0 < partial < 9.0


def test_cider_is_zero_on_a_single_image_because_idf_comes_from_the_set():
    # One image: IDF = log(1) - log(df = 1) = 0 for every n-gram, so even a perfect caption scores 0 (documented).
    got = fast_caption_metrics({"a": "a man rides a red bike"}, {"a": ["a man rides a red bike"]})
    assert got["CIDEr"] == 0.0
    assert got["BLEU-4"] == pytest.approx(1.0, abs=1e-8)


def test_simple_tokenize():
    assert simple_tokenize("A dog's  T-shirt.\n") == "a dogs tshirt"
    assert simple_tokenize("two dogs play") == "two dogs play"


def test_fast_path_ignores_case_and_punctuation():
    plain = fast_caption_metrics(HAND_PREDS, HAND_REFS)
    noisy = fast_caption_metrics({k: v.upper() + "." for k, v in HAND_PREDS.items()}, HAND_REFS)
    assert noisy == plain


def test_to_percent_matches_paper_scale():
    got = to_percent({"BLEU-4": 0.417, "CIDEr": 1.398})
    assert got["BLEU-4"] == pytest.approx(41.7)
    assert got["CIDEr"] == pytest.approx(139.8)


def test_metric_info_metadata():
    assert CAPTION_METRICS["CIDEr"].higher_is_better
    assert CAPTION_METRICS["CIDEr"].aggregation == "corpus"  # IDF over the set: never average shard values
    assert CAPTION_METRICS["ROUGE-L"].aggregation == "mean"
    assert set(CAPTION_METRICS) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"}


def test_missing_java_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FreeVLMError) as exc:
        caption_metrics(HAND_PREDS, HAND_REFS)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "Java" in msg
    assert msg == captioning.JAVA_MISSING


@pytest.mark.parametrize("fn", [caption_metrics, fast_caption_metrics])
def test_key_mismatch_names_the_missing_id(fn, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # must fail on the keys before looking for Java
    refs = dict(HAND_REFS)
    del refs["2"]
    with pytest.raises(FreeVLMError, match=r"'2' has a prediction but no references"):
        fn(HAND_PREDS, refs)
    preds = dict(HAND_PREDS)
    del preds["3"]
    with pytest.raises(FreeVLMError, match=r"'3' has references but no prediction"):
        fn(preds, HAND_REFS)


@pytest.mark.parametrize(
    ("preds", "refs", "match"),
    [
        ({}, {}, "at least one prediction"),
        ({"a": "x y"}, {"a": "x y"}, "non-empty list of str"),  # a bare string, not a list
        ({"a": "x y"}, {"a": []}, "non-empty list of str"),
        ({"a": "x y"}, {"a": ["  "]}, "empty or non-str"),
        ({"a": None}, {"a": ["x y"]}, "expected str"),
    ],
)
def test_bad_inputs(preds, refs, match):
    with pytest.raises(FreeVLMError, match=match):
        fast_caption_metrics(preds, refs)


def test_spice_without_models_fails_fast_offline(monkeypatch, tmp_path):
    import pycocoevalcap.spice.get_stanford_models as gsm
    from pycocoevalcap.meteor.meteor import Meteor

    def no_download(*args, **kwargs):
        raise AssertionError("attempted to download Stanford CoreNLP")

    monkeypatch.setattr(gsm, "urlretrieve", no_download)
    monkeypatch.setattr(captioning, "_spice_lib_dir", lambda: tmp_path)  # an empty lib dir: models absent
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/java")  # get past the Java check without a JVM

    def no_jvm(*args, **kwargs):
        raise AssertionError("a JVM was started before the SPICE check")

    monkeypatch.setattr(captioning, "_ptb_tokenize", no_jvm)
    monkeypatch.setattr(Meteor, "__init__", no_jvm)
    with pytest.raises(FreeVLMError) as exc:
        caption_metrics(HAND_PREDS, HAND_REFS, spice=True)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("SPICE is unavailable offline")
    assert "stanford-corenlp-3.6.0.jar" in msg
