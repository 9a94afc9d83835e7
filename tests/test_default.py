"""The embedded default: its tokenizer and model sizes, and (slow) the whole demo pipeline end to end."""

from __future__ import annotations

import json

import pytest
import torch

from freevlm.backbones.tiny import TinySize
from freevlm.data.synthetic import SyntheticConfig, corpus_text
from freevlm.default import DefaultConfig, build_default_model, default_tokenizer, describe_default
from freevlm.train.contrastive import ClipConfig
from freevlm.train.loop import LoopConfig, OptimConfig
from freevlm.train.pretrain import WarmupConfig
from freevlm.train.stage1 import Stage1Config
from freevlm.train.stage2 import ExitTrainConfig


def test_default_model_is_a_12_layer_blip2_opt_with_a_cheap_head():
    backbone = build_default_model(DefaultConfig(), seed=0)
    info = describe_default(backbone)
    assert backbone.family == "blip2" and backbone.lm.config.model_type == "opt"
    assert info["lm_layers"] >= 12
    assert info["head_cost_in_layers"] <= 2.0
    assert info["lm_layer_parameters"] == 198_272  # 4*128*128 + 2*128*512 + biases + 2 layer norms
    tok = default_tokenizer(SyntheticConfig())
    assert len(tok) == backbone.lm.vocab_size
    words = set(corpus_text(SyntheticConfig()))
    assert all(tok.convert_tokens_to_ids(w) != tok.unk_token_id for w in words)
    assert tok.decode(tok("a large red circle")["input_ids"], skip_special_tokens=True) == "a large red circle"


def tiny_default() -> DefaultConfig:
    return DefaultConfig(
        data=SyntheticConfig(n_train=64, n_val=40, n_test=12, n_nocaps=4, n_dialogs=4, captions_per_image=2),
        model=TinySize(lm_layers=6, lm_hidden=32, lm_ffn=64, vision_hidden=32, vision_layers=1, qformer_layers=1,
                       image_size=64, patch_size=16, num_query_tokens=4),
        pretrain=Stage1Config(train_parts=("vision", "qformer", "projection", "lm"),
                              optim=OptimConfig(lr=2e-3), loop=LoopConfig(epochs=1, batch_size=32)),
        warmup=WarmupConfig(steps=5, batch_size=32),
        clip=ClipConfig(hidden=32, ffn=64, layers=1, patch_size=16, hard_negatives=1,
                        loop=LoopConfig(epochs=1, batch_size=64)),
    )


@pytest.mark.slow
@pytest.mark.java
def test_demo_pipeline_end_to_end(tmp_path):
    from freevlm.demo import demo

    report = demo(tmp_path, config=tiny_default(), speed_images=2, progress=False, plan_train=16, plan_dev=8,
                  stage1=Stage1Config(loop=LoopConfig(epochs=1, batch_size=16)),
                  stage2=ExitTrainConfig(exit_layers=[2, 4], discriminator_hidden=64,
                                         optim=OptimConfig(lr=1e-3, warmup_steps=2),
                                         loop=LoopConfig(epochs=1, batch_size=16)))
    saved = json.loads((tmp_path / "demo_report.json").read_text())
    assert saved["alpha"] == report["alpha"] in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert set(saved["free"]["metrics"]) >= {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    fractions = saved["free"]["exit_fractions"]
    assert set(fractions) == {"2", "4", "6"} and abs(sum(fractions.values()) - 1) < 1e-9
    assert saved["full_depth"]["speed"]["parameter_speedup"] == 1.0
    shown = {f"FREE alpha={a}" for a in {saved["alpha"], 0.8}}
    timed = {*shown, "FREE + plan", "speculative (lossless)"} - set(saved["not_timed_apart"])
    assert set(saved["wall_clock"]) == {*timed, "full_depth", "hf_generate", "ratios"}
    if saved["alpha"] == 1.0:  # decodes as full depth: reused, not run twice
        assert "FREE alpha=1.0" in saved["not_timed_apart"] and saved["free"] == saved["full_depth"]
    assert set(saved["phases_seconds"]) == {"alpha sweep (dev)", "plan (gates, costs, dev decodes)", "test decodes",
                                            "wall-clock table"}
    assert saved["free_at_table10_alpha"]["speed"]["parameter_speedup"] >= 1.0  # alpha 0.8 is always shown too
    # lossless: the speculative mode's captions are full depth's
    same, total = saved["speculative_identical_to_full"]
    assert same == total == len(saved["full_depth"]["predictions"])
    assert saved["speculative"]["metrics"] == saved["full_depth"]["metrics"]
    assert set(saved["plan"]["early_exit"]["exits"]) <= {2, 4}
    assert (tmp_path / "plan-s0" / "plan.json").is_file()
    assert (tmp_path / "free-s0" / "exits" / "exits.json").is_file()


def test_pretraining_is_bit_reproducible_on_one_machine(tmp_path):
    """Same config and seed → identical weights (the report's rerun comparison rests on it; across machines with
    other CPU kernels, e.g. AVX-512 vs AVX2, float rounding differs, hence the capability in `system_info`)."""
    from freevlm.default import pretrained_default

    states = []
    for run in ("a", "b"):
        _, backbone = pretrained_default(tmp_path / run, tiny_default(), seed=0, progress=False)
        states.append(backbone.model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    _, other = pretrained_default(tmp_path / "c", tiny_default(), seed=1, progress=False)
    assert any(not torch.equal(states[0][k], v) for k, v in other.model.state_dict().items())


def test_the_tiny_clip_is_a_clip_folder_cached_beside_the_backbone_and_retrained_alone(tmp_path):
    from dataclasses import replace

    from freevlm.default import default_clip_path, pretrained_default
    from freevlm.rankers import ClipRanker, load_ranker

    cfg = tiny_default()
    pretrained_default(tmp_path, cfg, seed=0, progress=False)
    folder = default_clip_path(tmp_path, cfg)
    assert folder == tmp_path / "pretrain-s0" / "clip"
    assert isinstance(load_ranker(folder), ClipRanker)  # what `--ranker PATH` does
    backbone_file = tmp_path / "pretrain-s0" / "backbone" / "model.safetensors"
    stamps = backbone_file.stat().st_mtime_ns, (folder / "model.safetensors").read_bytes()
    pretrained_default(tmp_path, cfg, seed=0, progress=False)  # cached: nothing retrains
    assert (backbone_file.stat().st_mtime_ns, (folder / "model.safetensors").read_bytes()) == stamps
    pretrained_default(tmp_path, replace(cfg, clip=replace(cfg.clip, hard_negatives=0)), seed=0, progress=False)
    assert backbone_file.stat().st_mtime_ns == stamps[0]  # another CLIP configuration retrains the CLIP only
    assert (folder / "model.safetensors").read_bytes() != stamps[1]


@pytest.mark.slow
def test_the_embedded_default_clip_ranks_a_true_caption_above_a_wrong_one_for_most_images(tmp_path):
    """The default's own tiny CLIP, as `freevlm demo` / `reproduce` train it (about half a minute on 2 cores), on 300
    validation images it never saw: a loose bound; the reproduce report's rankers table gives the measured rates."""
    from freevlm.data.synthetic import load_synthetic_captions
    from freevlm.default import _pretrained_clip, prepare_data
    from freevlm.rankers import load_ranker
    from freevlm.reproduce.tables.rankers import pairwise

    cfg = DefaultConfig()
    data_root = prepare_data(tmp_path / "data", cfg)
    folder = _pretrained_clip(tmp_path, cfg, seed=0, progress=False)  # the CLIP alone; no backbone is needed here
    rates = pairwise({"CLIP": load_ranker(folder)}, None, load_synthetic_captions(data_root, "val")[:300], cfg.data)
    print(rates)
    assert rates["CLIP"]["true_over_near_miss"] > 0.6  # one attribute or one object changed
    assert rates["CLIP"]["true_over_other_image"] > 0.6


def test_decodes_as_full_depth_only_where_no_exit_can_fire():
    from freevlm.demo import decodes_as_full_depth
    from freevlm.generation.api import DecodeOptions

    assert decodes_as_full_depth(DecodeOptions(mode="full"))
    assert decodes_as_full_depth(DecodeOptions(threshold=1.0))
    assert decodes_as_full_depth(DecodeOptions(criterion="entropy", threshold=0.0))
    assert not decodes_as_full_depth(DecodeOptions(threshold=0.8))
    assert not decodes_as_full_depth(DecodeOptions(criterion="patience", threshold=2))
    assert not decodes_as_full_depth(DecodeOptions(threshold=1.0, gates="runs/plan/gates"))
    assert not decodes_as_full_depth(DecodeOptions(mode="speculative"))
