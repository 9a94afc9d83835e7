"""The evaluation runner: VisDial candidate scoring with exits, VQA scoring, the sweep command, threshold choice."""

from __future__ import annotations

import json

import pytest
import torch

from freevlm.data.records import DialogSample, VQASample
from freevlm.eval.evaluate import (
    EvalResult,
    candidate_log_likelihoods,
    dialog_prompt,
    evaluate_visdial,
    evaluate_vqa,
    select_threshold,
    speed_comparison,
)
from freevlm.exits import ExitSpec, ExitStack, build_exits
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.losses import IGNORE
from freevlm.train.batches import Collator, Example
from freevlm.train.forward import teacher_forced
from tests.train.conftest import colour_task


def _target_logprob(backbone, examples, logits_fn):
    batch = Collator(backbone)(examples)
    with torch.no_grad():
        tf = teacher_forced(backbone, batch, keep=None, logits=True)
        logp = torch.log_softmax(logits_fn(tf).float(), -1)
    mask = tf.targets != IGNORE
    tok = logp.gather(-1, tf.targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return ((tok * mask).sum(-1)).tolist()


def test_candidate_scores_come_from_the_layer_each_token_leaves_at(tmp_path):
    backbone, examples = colour_task(tmp_path)
    cands = [Example("k", examples[0].image_path, "a photo of", t) for t in ("a red square", "a blue circle")]
    exits = build_exits(backbone.lm, ExitSpec("frozen-head", [2, 4]))
    vlm = EarlyExitVLM(backbone, exits)
    full, layers = candidate_log_likelihoods(vlm, cands, DecodeOptions(mode="full"))
    assert set(layers) == {backbone.lm.num_layers}
    expected = _target_logprob(backbone, cands, lambda tf: tf.logits)
    assert all(abs(a - b) < 1e-4 for a, b in zip(full, expected))
    # forcing every token out at layer 2: scores are the frozen head read at h_2
    forced = EarlyExitVLM(backbone, ExitStack(ExitSpec("frozen-head", [2]), [exits.at(2)]))
    scores, layers = candidate_log_likelihoods(forced, cands, DecodeOptions(threshold=1e-9))
    assert set(layers) == {2}
    expected = _target_logprob(backbone, cands, lambda tf: backbone.lm.head(backbone.lm.final_norm(tf.states[2])))
    assert all(abs(a - b) < 1e-4 for a, b in zip(scores, expected))


def test_visdial_ranks_the_candidate_the_model_prefers(tmp_path):
    backbone, examples = colour_task(tmp_path)
    vlm = EarlyExitVLM(backbone)
    cands = ["a red square", "a blue circle", "a yellow square"]
    sample = DialogSample("1", examples[0].image_path, "a picture", [], "what is it", cands, gt_index=1)
    assert dialog_prompt(sample) == "a picture. Q: what is it A:"
    scores, _ = candidate_log_likelihoods(
        vlm, [Example("1", sample.image_path, dialog_prompt(sample), c) for c in cands], DecodeOptions(mode="full"))
    result = evaluate_visdial(vlm, [sample], DecodeOptions(mode="full"))
    expected_rank = 1 + sum(s >= scores[1] for i, s in enumerate(scores) if i != 1)
    assert result.predictions[0]["rank"] == expected_rank
    assert abs(result.metrics["MRR"] - 1 / expected_rank) < 1e-12


def test_vqa_evaluation_scores_each_question(tmp_path, monkeypatch):
    backbone, examples = colour_task(tmp_path)
    samples = [VQASample(f"q{i}", "1", e.image_path, "what color", ["red"] * 10, "other") for i, e in
               enumerate(examples[:3])]
    vlm = EarlyExitVLM(backbone)
    result = evaluate_vqa(vlm, samples, DecodeOptions(mode="full", max_new_tokens=3), progress=False)
    by_key = {p["key"]: p for p in result.predictions}
    for s in samples:
        expected = 1.0 if by_key[s.question_id]["prediction"] == "red" else 0.0
        assert by_key[s.question_id]["accuracy"] == expected
    assert abs(result.metrics["accuracy"] - sum(p["accuracy"] for p in result.predictions) / 3) < 1e-12


def test_speed_comparison_times_each_path_on_the_same_examples(tmp_path):
    backbone, examples = colour_task(tmp_path)
    vlm = EarlyExitVLM(backbone, build_exits(backbone.lm, ExitSpec("frozen-head", [2, 4])))
    prompts = [Example(e.key, e.image_path, e.prompt, None) for e in examples[:2]]
    opts = DecodeOptions(threshold=1e-9, max_new_tokens=4)  # every token leaves at layer 2
    both = speed_comparison(vlm, prompts, opts, repeats=1)
    assert set(both["ratios"]) == {"early_exit_vs_full_depth", "early_exit_vs_hf_generate", "full_depth_vs_hf_generate"}
    # the full-depth path is token-identical to transformers' generate: the same number of tokens is timed
    assert both["full_depth"]["tokens"] == both["hf_generate"]["tokens"] > 0
    ours = speed_comparison(vlm, prompts, opts, repeats=1, hf_generate=False)
    assert "hf_generate" not in ours and set(ours["ratios"]) == {"early_exit_vs_full_depth"}
    ratio = ours["early_exit"]["tokens_per_second"] / ours["full_depth"]["tokens_per_second"]
    assert ours["ratios"]["early_exit_vs_full_depth"] == ratio
    with pytest.raises(ValueError, match="hf_generate=False"):  # transformers' generate cannot add pixel noise
        speed_comparison(vlm, prompts, opts, repeats=1, pixel_noise=1.0)


def test_threshold_choice_prefers_the_fastest_of_the_best():
    def r(q):
        return EvalResult("caption", {"CIDEr": q}, {}, {})

    assert select_threshold({0.5: r(1.0), 0.8: r(1.2), 1.0: r(1.2)}, "CIDEr") == 0.8


def test_sweep_command_writes_json_and_plot(tmp_path):
    from freevlm.commands.sweep import sweep
    from freevlm.data.synthetic import SyntheticConfig, write_synthetic
    from freevlm.default import build_default_model
    from freevlm.exits import save_exits
    from tests.test_default import tiny_default

    cfg = tiny_default()
    data = write_synthetic(SyntheticConfig(n_train=4, n_val=4, n_test=4, n_nocaps=2, n_dialogs=2), tmp_path / "d")
    backbone = build_default_model(cfg, seed=0)
    backbone.model.save_pretrained(tmp_path / "bb")
    backbone.processor.save_pretrained(tmp_path / "bb")
    save_exits(tmp_path / "ex", backbone.lm, build_exits(backbone.lm, ExitSpec("transformer", [2, 4])), "tiny")
    sweep(tmp_path / "bb", tmp_path / "ex", tmp_path / "sweep", data=data.root, split="val", thresholds=[0.5, 1.0],
          max_new_tokens=5, progress=False)
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert set(rows) == {"0.5", "1.0"}
    assert rows["1.0"]["parameter_speedup"] == 1.0 and rows["1.0"]["compute_speedup"] == 1.0
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000
