"""The whole FREE recipe on the newer families, end to end on the synthetic data: a checkpoint folder (model and
processor saved), exits trained by stage 2 (adversarial, FREE's default) on the folder's backbone, then the `plan`,
`evaluate` and `sweep` commands on the saved folders; every criterion and KV policy decodes."""

from __future__ import annotations

import json

import pytest
import torch

from freevlm.backbones.tiny import TinySize, build_tiny, tiny_processor
from freevlm.cli import main
from freevlm.data.synthetic import SyntheticConfig, corpus_text, load_synthetic_captions, write_synthetic
from freevlm.data.tokenizer import build_word_tokenizer
from freevlm.default import PROMPT_WORDS
from freevlm.exits import save_exits
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.train.batches import caption_examples
from freevlm.train.loop import LoopConfig, OptimConfig
from freevlm.train.stage2 import ExitTrainConfig, train_exits

FAMILIES = ["qwen2vl-qwen2", "qwen25vl-qwen2", "onevision-qwen2"]


def run(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module", params=FAMILIES)
def workspace(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    cfg = SyntheticConfig(n_train=8, n_val=6, n_test=4, n_nocaps=2, n_dialogs=2, image_size=32)
    data = write_synthetic(cfg, root / "data")
    tok = build_word_tokenizer(corpus_text(cfg), extra_words=PROMPT_WORDS.split())
    size = TinySize(vocab_size=len(tok), lm_layers=4)
    bb = build_tiny(family, size, processor=tiny_processor(family, tok, size), seed=0)
    bb.model.save_pretrained(root / "backbone")
    bb.processor.save_pretrained(root / "backbone")
    vlm = EarlyExitVLM.from_pretrained(root / "backbone")
    examples = caption_examples(load_synthetic_captions(data.root, "train"), every_caption=False)
    cfg2 = ExitTrainConfig(exit_layers=[1, 2], optim=OptimConfig(lr=1e-3, warmup_steps=1),
                           loop=LoopConfig(epochs=1, batch_size=4, progress=False))
    exits, _ = train_exits(vlm.backbone, examples, cfg2, root / "run")
    save_exits(root / "exits", vlm.backbone.lm, exits, family)
    return family, root, data.root


def test_exits_trained_on_the_folder_decode_under_every_criterion_and_policy(workspace):
    family, root, data = workspace
    vlm = EarlyExitVLM.from_pretrained(root / "backbone", root / "exits")
    images = sorted((data / "images").rglob("*.png"))[:3]
    prompts = ["a photo of"] * 3
    full = vlm.generate(images, prompts, DecodeOptions(mode="full", max_new_tokens=6))
    spec = vlm.generate(images, prompts, DecodeOptions(mode="speculative", draft_layer=1, draft_length=3,
                                                       max_new_tokens=6))
    assert torch.equal(spec.sequences, full.sequences)
    for criterion, threshold in (("confidence", 1e-9), ("entropy", 1e9), ("patience", 1), ("similarity", -1.0)):
        for policy in ("propagate", "copy", "catch_up"):
            out = vlm.generate(images, prompts, DecodeOptions(criterion=criterion, threshold=threshold,
                                                              kv_policy=policy, max_new_tokens=6))
            layers = {layer for seq in out.exit_layers for layer in seq}
            assert layers <= {1, 2, 4} and layers & {1, 2}, (criterion, policy)  # tokens did leave early


def test_plan_evaluate_and_sweep_commands_run_on_the_folders(workspace, tmp_path):
    family, root, data = workspace
    common = ["--backbone", root / "backbone", "--exits", root / "exits", "--data", data]
    run("plan", *common, "--out", tmp_path / "plan", "--thresholds", 0.5, "--candidates", 1, "--draft-lengths", 2,
        "--verify-limit", 2, "--speed-images", 1, "--no-progress")
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert set(plan["early_exit"]["exits"]) <= {1, 2}
    run("evaluate", *common, "--plan", tmp_path / "plan", "--out", tmp_path / "eval.json", "--limit", 2,
        "--no-official", "--no-progress")
    assert len(json.loads((tmp_path / "eval.json").read_text())["predictions"]) == 2
    run("sweep", *common, "--out", tmp_path / "sweep", "--thresholds", 0.001, 1.0, "--limit", 2, "--no-progress")
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert rows["0.001"]["exit_fractions"]["1"] == 1.0 and rows["1.0"]["compute_speedup"] == 1.0
