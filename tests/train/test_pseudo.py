"""Pseudo-labels for the unsupervised variants: greedy KD targets, and CapFilt's sampling, ranking and keeping
mechanics on built cases (ties, empty and duplicate samples)."""

from __future__ import annotations

import torch

from freevlm.generation.api import EarlyExitVLM
from freevlm.rankers import LikelihoodRanker
from freevlm.train.batches import Example
from freevlm.train.loop import LoopConfig, OptimConfig
from freevlm.train.pseudo import (
    capfilt_targets,
    distinct_captions,
    greedy_targets,
    rank_captions,
    rank_samples,
)
from freevlm.train.stage1 import Stage1Config, train_backbone
from tests.train.conftest import colour_task


def test_likelihood_ranker_prefers_the_caption_the_model_was_trained_on(tmp_path):
    backbone, examples = colour_task(tmp_path / "data")
    cfg = Stage1Config(train_parts=("vision", "qformer", "projection", "lm"), optim=OptimConfig(name="adam", lr=3e-3),
                       loop=LoopConfig(epochs=8, batch_size=4, progress=False))
    train_backbone(backbone, examples, cfg, tmp_path / "run")
    red = examples[0]  # "a red square"
    cands = [Example(red.key, red.image_path, red.prompt, t) for t in ("a red square", "circle circle circle")]
    scores = LikelihoodRanker()(backbone, cands)
    assert scores[0] > scores[1]


class ByTable:
    """A built ranker: each caption's score from a table (unknown captions score 0); records what it was asked."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def __call__(self, backbone, cands):
        self.asked.append([(c.key, c.target) for c in cands])
        return torch.tensor([float(self.table.get(c.target, 0.0)) for c in cands])


def test_duplicates_count_once_empty_samples_are_dropped_and_ties_go_to_the_more_sampled_caption():
    samples = ["a red circle", "", "a  blue square", "a red circle", "a blue square", "a green star", "  ",
               "a red circle"]
    assert distinct_captions(samples) == [("a red circle", 3), ("a blue square", 2), ("a green star", 1)]
    cands = [("x", 1), ("y", 3), ("z", 3), ("w", 1)]
    assert rank_captions(cands, [1.0, 1.0, 1.0, 2.0]) == [3, 1, 2, 0]  # score, then times sampled, then first


def test_rank_samples_scores_each_distinct_caption_once_and_keeps_the_best_two_distinct(tmp_path):
    a, b, c = (Example(k, tmp_path / f"{k}.png", "a photo of", None) for k in "abc")
    samples = [["one", "two", "two", "three", "", "two"],  # a: "two" sampled 3 times, ties "three" in score
               ["", "", " "],  # b: nothing usable -> no label
               ["only", "only"]]  # c: one distinct caption -> one label
    ranker = ByTable({"one": 0.25, "two": 0.75, "three": 0.75, "only": 0.5})  # exact in float32
    ranked = rank_samples(None, [a, b, c], samples, ranker, batch_size=8)
    assert ranker.asked == [[("a", "one"), ("a", "two"), ("a", "three"), ("c", "only")]]  # one call, no duplicates
    assert ranked == {"a": [("two", 0.75), ("three", 0.75), ("one", 0.25)], "c": [("only", 0.5)]}
    # a ranker sees each batch of images in one call
    ranker = ByTable({})
    rank_samples(None, [a, b, c], samples, ranker, batch_size=1)
    assert [len(call) for call in ranker.asked] == [3, 1]


def test_capfilt_samples_10_nucleus_captions_per_image_and_keeps_the_ranked_top_two(tmp_path, monkeypatch):
    backbone, examples = colour_task(tmp_path / "data")
    calls = []
    generate = EarlyExitVLM.generate

    def spy(self, images, prompts, *args, **kwargs):
        calls.append(kwargs)
        return generate(self, images, prompts, *args, **kwargs)

    monkeypatch.setattr(EarlyExitVLM, "generate", spy)

    class ByLength:  # a built ranker: longer captions score higher
        def __call__(self, bb, cands):
            return torch.tensor([float(len(c.target)) for c in cands])

    kept, ranked = capfilt_targets(backbone, examples[:2], ranker=ByLength(), seed=0, max_new_tokens=5,
                                   progress=False)
    assert [(k["do_sample"], k["top_p"], k["num_return_sequences"], k["mode"]) for k in calls] == [
        (True, 0.9, 10, "full")]  # the paper's sampling: 10 per image, nucleus top-p 0.9, the full model
    for e in examples[:2]:
        texts = [t for t, _ in ranked[e.key]]
        assert len(texts) == len(set(texts)) and "" not in texts
        assert [len(t) for t in texts] == sorted((len(t) for t in texts), reverse=True)
        assert [k.target for k in kept if k.key == e.key] == texts[:2]
    assert {k.prompt for k in kept} == {"a photo of"}
    again, _ = capfilt_targets(backbone, examples[:2], ranker=ByLength(), seed=0, max_new_tokens=5, progress=False)
    assert [k.target for k in again] == [k.target for k in kept]  # seeded sampling


def test_greedy_targets_replace_labels_with_the_backbones_own_output(tmp_path):
    backbone, examples = colour_task(tmp_path / "data")
    greedy = greedy_targets(backbone, examples[:2], max_new_tokens=5, progress=False)
    own = EarlyExitVLM(backbone).generate([e.image_path for e in examples[:2]], ["a photo of"] * 2,
                                          use_exits=False, max_new_tokens=5).texts
    assert [g.key for g in greedy] == [e.key for e in examples[:2]]
    assert [g.target for g in greedy] == own
