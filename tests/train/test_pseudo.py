"""Pseudo-labels for the unsupervised variants: greedy KD targets and CapFilt's ranking mechanics."""

from __future__ import annotations

import torch

from freevlm.generation.api import EarlyExitVLM
from freevlm.train.batches import Example
from freevlm.train.loop import LoopConfig, OptimConfig
from freevlm.train.pseudo import LikelihoodScorer, capfilt_targets, greedy_targets
from freevlm.train.stage1 import Stage1Config, train_backbone
from tests.train.conftest import colour_task


def test_likelihood_scorer_prefers_the_caption_the_model_was_trained_on(tmp_path):
    backbone, examples = colour_task(tmp_path / "data")
    cfg = Stage1Config(train_parts=("vision", "qformer", "projection", "lm"), optim=OptimConfig(name="adam", lr=3e-3),
                       loop=LoopConfig(epochs=8, batch_size=4, progress=False))
    train_backbone(backbone, examples, cfg, tmp_path / "run")
    red = examples[0]  # "a red square"
    cands = [Example(red.key, red.image_path, red.prompt, t) for t in ("a red square", "circle circle circle")]
    scores = LikelihoodScorer()(backbone, cands)
    assert scores[0] > scores[1]


def test_capfilt_keeps_the_top_two_by_score_and_greedy_targets_replace_labels(tmp_path):
    backbone, examples = colour_task(tmp_path / "data")

    class ByLength:  # a built scorer: longer captions score higher
        def __call__(self, bb, cands):
            return torch.tensor([float(len(c.target)) for c in cands])

    kept, ranked = capfilt_targets(backbone, examples[:2], num_candidates=4, keep=2, scorer=ByLength(), seed=0,
                                   max_new_tokens=5, progress=False)
    for e in examples[:2]:
        texts = [t for t, _ in ranked[e.key]]
        assert [len(t) for t in texts] == sorted((len(t) for t in texts), reverse=True)
        assert [k.target for k in kept if k.key == e.key] == texts[:2]
    greedy = greedy_targets(backbone, examples[:2], max_new_tokens=5, progress=False)
    own = EarlyExitVLM(backbone).generate([e.image_path for e in examples[:2]], ["a photo of"] * 2,
                                          use_exits=False, max_new_tokens=5).texts
    assert [g.key for g in greedy] == [e.key for e in examples[:2]]
    assert [g.target for g in greedy] == own  # the labels are replaced by the backbone's own outputs
