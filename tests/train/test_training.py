"""Training runs: losses fall, resumed runs equal uninterrupted ones, 2 DDP processes equal 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from freevlm.errors import FreeVLMError
from freevlm.losses import token_cross_entropy
from freevlm.train.batches import Collator
from freevlm.train.forward import teacher_forced
from freevlm.train.loop import LoopConfig, OptimConfig
from freevlm.train.stage1 import Stage1Config, train_backbone
from freevlm.train.stage2 import ExitTrainConfig, train_exits
from tests.train.conftest import colour_task

ROOT = Path(__file__).resolve().parents[2]


def _final_loss(backbone, batch):
    with torch.no_grad():
        tf = teacher_forced(backbone, batch, keep=set(), logits=True)
        return token_cross_entropy(tf.logits, tf.targets).item()


def _exit_loss(backbone, exits, batch):
    with torch.no_grad():
        tf = teacher_forced(backbone, batch, keep=set(exits.layers))
        losses = []
        for layer, e in zip(exits.layers, exits.exits):
            logits = e.logits(backbone.lm, e.state(backbone.lm, tf.states[layer], tf.ctx, None))
            losses.append(token_cross_entropy(logits, tf.targets).item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("family", ["blip2-opt", "qwen2vl-qwen2", "qwen25vl-qwen2", "onevision-qwen2"])
def test_stage1_lowers_the_loss_on_a_fixed_batch(tmp_path, family):
    backbone, examples = colour_task(tmp_path / "data", family)
    batch = Collator(backbone)(examples)
    before = _final_loss(backbone, batch)
    cfg = Stage1Config(train_parts=("vision", "qformer", "projection", "lm"), optim=OptimConfig(name="adam", lr=3e-3),
                       loop=LoopConfig(epochs=6, batch_size=4, progress=False))
    train_backbone(backbone, examples, cfg, tmp_path / "run")
    assert _final_loss(backbone, batch) < 0.75 * before
    assert (tmp_path / "run" / "backbone" / "config.json").is_file()


# FREE's adversarial term pulls against CE on a batch this small (on LLaVA and Qwen2-VL it barely falls in 4
# epochs), so the M-RoPE family checks the exits learn from CE + KD alone
@pytest.mark.parametrize("family,adversarial", [("blip2-opt", 1.0), ("qwen2vl-qwen2", 0.0), ("qwen25vl-qwen2", 0.0),
                                                ("onevision-qwen2", 0.0)])
def test_stage2_lowers_the_exit_loss_on_a_fixed_batch(tmp_path, family, adversarial):
    backbone, examples = colour_task(tmp_path / "data", family)
    batch = Collator(backbone)(examples)
    cfg = ExitTrainConfig(exit_layers=[2, 4], adversarial_weight=adversarial,
                          optim=OptimConfig(lr=3e-3, warmup_steps=1),
                          loop=LoopConfig(epochs=4, batch_size=4, progress=False))
    from freevlm.exits import ExitSpec, build_exits

    fresh = build_exits(backbone.lm, ExitSpec("transformer", [2, 4]))
    before = _exit_loss(backbone, fresh, batch)
    exits, _ = train_exits(backbone, examples, cfg, tmp_path / "run")
    assert _exit_loss(backbone, exits, batch) < (before if adversarial else 0.95 * before)


def _stage2(tmp_path, name, max_steps=0, resume=False):
    backbone, examples = colour_task(tmp_path / "data")
    cfg = ExitTrainConfig(exit_layers=[2, 4], optim=OptimConfig(lr=1e-3, warmup_steps=2),
                          loop=LoopConfig(epochs=2, batch_size=3, checkpoint_every=1, max_steps=max_steps,
                                          progress=False))
    exits, _ = train_exits(backbone, examples, cfg, tmp_path / name, resume=resume, save_discriminators=True)
    return exits


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    straight = _stage2(tmp_path, "straight")
    _stage2(tmp_path, "interrupted", max_steps=2)  # 3 steps per epoch: stops mid-epoch after checkpoint 2
    assert sorted(p.name for p in (tmp_path / "interrupted" / "checkpoints").iterdir()) == [
        "step-00000001", "step-00000002"]
    with pytest.raises(FreeVLMError, match="--resume"):
        _stage2(tmp_path, "interrupted")  # never silently restarts over an existing run
    resumed = _stage2(tmp_path, "interrupted", resume=True)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    d1 = load_file(tmp_path / "straight" / "exits" / "discriminators.safetensors")
    d2 = load_file(tmp_path / "interrupted" / "exits" / "discriminators.safetensors")
    for k in d1:
        torch.testing.assert_close(d1[k], d2[k], atol=1e-6, rtol=0)


def test_caching_the_frozen_image_features_leaves_training_unchanged(tmp_path):
    backbone, examples = colour_task(tmp_path / "data")
    examples = examples + examples[:3]  # images repeat within an epoch, as with several captions per image
    results = []
    for cache in (True, False):
        cfg = ExitTrainConfig(exit_layers=[2, 4], optim=OptimConfig(lr=1e-3, warmup_steps=2),
                              cache_image_features=cache, loop=LoopConfig(epochs=2, batch_size=4, progress=False))
        exits, _ = train_exits(backbone, examples, cfg, tmp_path / f"cache-{cache}")
        results.append(exits.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-6, rtol=0, msg=k)


def test_exit_sets_trained_together_equal_each_trained_alone(tmp_path):
    from freevlm.train.stage2 import train_exits_together, variant_config

    backbone, examples = colour_task(tmp_path / "data")
    loop = LoopConfig(epochs=2, batch_size=3, progress=False)
    optim = OptimConfig(lr=3e-3, warmup_steps=2, grad_clip=0.05)  # small enough that clipping acts
    cfgs = {name: variant_config(variant, exit_layers=layers, loop=loop, optim=optim)
            for name, variant, layers in (("DeeBLIP", "deebert", [2, 4]), ("PABEE-BLIP", "pabee", [2, 4]),
                                          ("LeeBLIP", "leeblip", [2, 4]), ("LeeBERT", "leebert", [2, 4]),
                                          ("per-layer", "deebert", [1, 2, 3, 4, 5]))}
    together = train_exits_together(backbone, examples, cfgs, tmp_path / "together")
    for name, cfg in cfgs.items():
        alone, _ = train_exits(backbone, examples, cfg, tmp_path / name)
        assert (tmp_path / "together" / name / "exits" / "exits.safetensors").exists()
        for k, v in alone.state_dict().items():
            torch.testing.assert_close(together[name].state_dict()[k], v, atol=1e-6, rtol=0, msg=f"{name} {k}")
    with pytest.raises(FreeVLMError, match="adversarial term train alone"):
        train_exits_together(backbone, examples, {"FREE": variant_config("semi")}, tmp_path / "free")


def test_a_run_folder_with_another_configuration_is_refused(tmp_path):
    _stage2(tmp_path, "run", max_steps=1)
    backbone, examples = colour_task(tmp_path / "data")
    other = ExitTrainConfig(exit_layers=[1, 3], loop=LoopConfig(epochs=1, batch_size=3, progress=False))
    with pytest.raises(FreeVLMError, match="different configuration"):
        train_exits(backbone, examples, other, tmp_path / "run", resume=True)


def _torchrun(out: Path, nproc: int) -> None:
    # this checkout's src first: the venv may hold an editable install of another checkout (a git worktree)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + nproc + os.getpid() % 1000), str(ROOT / "tests" / "train" / "ddp_worker.py"), str(out),
           str(nproc)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_ddp_processes_give_the_weights_of_one_process(tmp_path):
    _torchrun(tmp_path / "one", 1)
    _torchrun(tmp_path / "two", 2)
    one = load_file(tmp_path / "one" / "run" / "exits" / "exits.safetensors")
    two = load_file(tmp_path / "two" / "run" / "exits" / "exits.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-4, msg=k)
    backbone, _ = colour_task(tmp_path / "ref")  # training moved the exits away from their seed layers
    seed_layer = backbone.lm.layers[2].state_dict()  # exit 0 sits after layer 2 and is seeded from layer 3
    assert any(not torch.equal(one[f"exits.0.layer.{k}"], v) for k, v in seed_layer.items())


def test_resume_trims_the_metrics_log_to_the_checkpoint(tmp_path):
    """A kill between two checkpoints leaves log rows the resumed run writes again; they are dropped on resume, as is
    a half-written last line, so every step is logged once."""
    import json

    _stage2(tmp_path, "run", max_steps=2)  # checkpoints at steps 1 and 2
    log = tmp_path / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    with log.open("a") as f:  # what a run killed during step 4 leaves: step 3 logged, no checkpoint, a torn line
        f.write(json.dumps({**rows[-1], "step": 3}) + "\n" + '{"stage": "stage2", "ep')
    _stage2(tmp_path, "run", resume=True)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_run_folder_holding_only_the_config_of_a_run_that_never_started_is_reused(tmp_path):
    from freevlm.train.loop import open_run
    from freevlm.train.stage2 import train_exits as run_exits

    backbone, examples = colour_task(tmp_path / "data")
    bad = ExitTrainConfig(exit_layers=[2, 9], loop=LoopConfig(epochs=1, batch_size=4, progress=False))
    with pytest.raises(FreeVLMError, match="must lie in 1..5"):
        run_exits(backbone, examples, bad, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run folder was written

    class Main:
        is_main_process = True

        def wait_for_everyone(self):
            pass

    open_run(tmp_path / "old", {"stage": "stage2", "exit_layers": [2, 9]}, False, Main())  # an older freevlm did this
    good = ExitTrainConfig(exit_layers=[2, 4], loop=LoopConfig(epochs=1, batch_size=4, progress=False))
    run_exits(backbone, examples, good, tmp_path / "old")
    assert (tmp_path / "old" / "exits" / "exits.safetensors").is_file()
    other = ExitTrainConfig(exit_layers=[1, 3], loop=LoopConfig(epochs=1, batch_size=4, progress=False))
    with pytest.raises(FreeVLMError, match="different configuration"):  # once trained, never silently replaced
        run_exits(backbone, examples, other, tmp_path / "old", resume=True)


def test_frozen_parts_train_in_eval_mode_and_trained_parts_keep_their_dropout():
    from freevlm.backbones.tiny import TinySize, build_tiny
    from freevlm.train.stage1 import select_trainable

    bb = build_tiny("blip2-opt", TinySize(), seed=0)
    select_trainable(bb, ("projection",))
    model = bb.model
    assert model.training and model.language_projection.training
    assert not any(m.training for m in model.vision_model.modules())
    assert not any(m.training for m in model.qformer.modules()) and not any(m.training for m in bb.lm.modules())
    select_trainable(bb, ("qformer", "projection"))
    assert all(m.training for m in model.qformer.modules())  # its dropout layers included
    assert not any(m.training for m in model.vision_model.modules())


def test_kd_on_the_backbones_own_greedy_captions_lowers_the_distillation_loss(tmp_path):
    """Issue 28's "exits trained to agree": pseudo-labels are the backbone's greedy captions (no human caption read),
    and KD (KL(p_N || p_i); here without the adversarial term, whose discriminator fights it on a task this small)
    lowers that KL on a fixed batch of them."""
    from dataclasses import replace

    import torch.nn.functional as F

    from freevlm.exits import ExitSpec, build_exits
    from freevlm.losses import IGNORE
    from freevlm.train.pseudo import greedy_targets

    backbone, examples = colour_task(tmp_path / "data")
    train_backbone(backbone, examples, Stage1Config(train_parts=("qformer", "projection", "lm"),
                                                    optim=OptimConfig(name="adam", lr=3e-3),
                                                    loop=LoopConfig(epochs=6, batch_size=4, progress=False)),
                   tmp_path / "stage1")  # a backbone whose final layer is confident: something to distil
    unlabelled = [replace(e, target=None) for e in examples]
    pseudo = greedy_targets(backbone, unlabelled, max_new_tokens=6, progress=False)
    assert all(e.target is not None for e in pseudo)
    batch = Collator(backbone)(pseudo)

    def kl(exits):
        with torch.no_grad():
            tf = teacher_forced(backbone, batch, keep=set(exits.layers), logits=True)
            mask = tf.targets != IGNORE
            final = F.log_softmax(tf.logits.float(), -1)[mask]
            out = 0.0
            for layer, e in zip(exits.layers, exits.exits):
                logits = e.logits(backbone.lm, e.state(backbone.lm, tf.states[layer], tf.ctx, None))
                mine = F.log_softmax(logits.float(), -1)[mask]
                out += F.kl_div(mine, final, log_target=True, reduction="batchmean").item()
        return out

    cfg = ExitTrainConfig(exit_layers=[2, 4], task="kd", kl_direction="final_to_exit", adversarial_weight=0.0,
                          optim=OptimConfig(lr=3e-3, warmup_steps=1), loop=LoopConfig(epochs=4, batch_size=4,
                                                                                     progress=False))
    torch.manual_seed(0)
    before = kl(build_exits(backbone.lm, ExitSpec("transformer", [2, 4])))
    exits, _ = train_exits(backbone, pseudo, cfg, tmp_path / "run")
    after = kl(exits)
    assert after < 0.5 * before, (before, after)


def _every_position_loss(task, logits, full, mask, teacher_logits):
    """Stage 2's task losses as they were taken before at_targets: heads over every position, IGNORE masked."""
    from freevlm.losses import exit_kl, mutual_distillation, pabee_weights

    ce = [token_cross_entropy(lg, full.targets) for lg in logits]
    if task == "kd":
        return sum(exit_kl(lg, full.logits, mask) for lg in logits)
    if task == "pabee":
        return sum(w * c for w, c in zip(pabee_weights(2), ce))
    if task == "leeblip":
        return sum(ce) + sum(exit_kl(lg, full.logits, mask, "final_to_exit") for lg in logits)
    if task == "leebert":
        return sum(ce) + mutual_distillation(logits, mask, torch.softmax(teacher_logits, 0))
    return sum(ce)


@pytest.mark.parametrize("task", ["ce", "kd", "pabee", "leeblip", "leebert"])
def test_exit_losses_taken_at_the_target_positions_equal_those_over_every_position(tmp_path, task):
    """The exits' heads run only where a loss is taken (at_targets): the same losses as heads over every position,
    with the IGNORE positions masked out (the formula before), for the transformer and the linear exits."""
    from freevlm.exits import ExitSpec, build_exits
    from freevlm.train.batches import IGNORE
    from freevlm.train.stage2 import ExitLosses

    backbone, examples = colour_task(tmp_path / "data")
    batch = Collator(backbone, train=True)(examples)
    lm = backbone.lm
    for kind in ("transformer", "linear"):
        exits = build_exits(lm, ExitSpec(kind, [2, 4]))
        cfg = ExitTrainConfig(exit_kind=kind, exit_layers=[2, 4], task=task, adversarial_weight=0.0)
        losses = ExitLosses(backbone, exits, cfg)
        with torch.no_grad():
            full = teacher_forced(backbone, batch, keep={2, 4}, logits=True)
            picked = teacher_forced(backbone, batch, keep={2, 4}, logits=True, at_targets=True)
            mask = full.targets != IGNORE
            assert 0 < int(mask.sum()) < mask.numel()  # some positions carry no loss
            torch.testing.assert_close(picked.logits, full.logits[mask])
            _, ours, _ = losses(picked, None)
            logits = [e.logits(lm, e.state(lm, full.states[i], full.ctx, None)) for i, e in zip(exits.layers,
                                                                                             exits.exits)]
            ref = _every_position_loss(task, logits, full, mask, getattr(losses, "teacher_logits", None))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_bf16_exit_heads_give_the_fp32_loss_to_bf16_precision_and_a_wrong_precision_is_refused(tmp_path):
    from freevlm.exits import ExitSpec, build_exits
    from freevlm.train.stage2 import ExitLosses

    backbone, examples = colour_task(tmp_path / "data")
    batch = Collator(backbone, train=True)(examples)
    exits = build_exits(backbone.lm, ExitSpec("transformer", [2, 4]))
    with torch.no_grad():
        tf = teacher_forced(backbone, batch, keep={2, 4}, at_targets=True)
        out = {p: ExitLosses(backbone, exits, ExitTrainConfig(exit_layers=[2, 4], head_precision=p))(tf, None)[1]
               for p in ("fp32", "bf16")}
    assert out["bf16"] != out["fp32"]  # the heads did run in bf16
    torch.testing.assert_close(out["bf16"], out["fp32"], rtol=2e-2, atol=0)
    with pytest.raises(FreeVLMError, match="head_precision"):
        ExitTrainConfig(head_precision="fp16")


def test_stage1_in_bf16_gives_the_fp32_loss_to_bf16_precision_and_lowers_it(tmp_path):
    from freevlm.train.stage1 import CaptionLoss

    backbone, examples = colour_task(tmp_path / "data")
    batch = Collator(backbone, train=True)(examples)
    with torch.no_grad():
        fp32, bf16 = (float(CaptionLoss(backbone, p)(batch, None)) for p in ("fp32", "bf16"))
    assert fp32 != bf16 and abs(bf16 - fp32) < 2e-2 * fp32
    cfg = Stage1Config(train_parts=("vision", "qformer", "projection", "lm"), optim=OptimConfig(name="adam", lr=3e-3),
                       loop=LoopConfig(epochs=6, batch_size=4, progress=False), precision="bf16")
    train_backbone(backbone, examples, cfg, tmp_path / "run")
    assert _final_loss(backbone, batch) < 0.75 * fp32
    with pytest.raises(FreeVLMError, match="precision"):
        Stage1Config(precision="half")
