"""Stage 1 (§3.2): fine-tune the backbone with token cross-entropy on the labelled data (semi-supervised only).

Which parts train is a config choice. The default follows BLIP-2 fine-tuning as the paper's parameter counts show it
(1.1–1.2B trainable: Q-Former, projection and vision encoder train, the LM stays frozen); `train_parts` can drop the
vision encoder or add the LM. The same recipe, with every part trainable, is the embedded default's pretraining
(standing in for BLIP-2's pretraining, which a random tiny VLM needs before any variant).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn

from freevlm.errors import FreeVLMError
from freevlm.losses import token_cross_entropy
from freevlm.train.batches import IGNORE, Batch, Collator
from freevlm.train.forward import teacher_forced
from freevlm.train.loop import (
    LoopConfig,
    OptimConfig,
    config_dict,
    fit,
    global_count,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    open_run,
)

PARTS = ("vision", "qformer", "projection", "lm")


@dataclass
class Stage1Config:
    train_parts: tuple[str, ...] = ("vision", "qformer", "projection")  # BLIP-2 practice; add "lm" to tune the LM
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(name="adam", lr=1e-5, decay_every_epochs=3, decay_factor=0.5)
    )  # §4: Adam, 1e-5, halved every 3 epochs
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=10, batch_size=16))  # §4: 10 epochs, batch 16
    max_target_tokens: int = 32  # longest caption/answer kept (tokens)
    precision: str = "fp32"  # "bf16": the forward under bf16 autocast (weights and loss stay fp32); the real VLM's
    # stage 1 runs ~1.6x faster per step on a CPU with AVX-512 BF16 at the same loss

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise FreeVLMError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")


def count_targets(batch: Batch, encoder_decoder: bool) -> torch.Tensor:
    labels = batch.labels if encoder_decoder else batch.labels[:, 1:]
    return (labels != IGNORE).sum()


class CaptionLoss(nn.Module):
    """The backbone's CE loss as a module, so DDP wraps (and syncs) the backbone's trainable parameters."""

    def __init__(self, backbone, precision: str = "fp32"):
        super().__init__()
        self.model = backbone.model
        self.precision = precision
        self.__dict__["backbone"] = backbone

    def forward(self, batch: Batch, normalizer: torch.Tensor) -> torch.Tensor:
        with torch.autocast(batch.input_ids.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            tf = teacher_forced(self.backbone, batch, keep=set(), logits=True, at_targets=True)
        return token_cross_entropy(tf.logits, tf.targets[tf.mask], normalizer)


def check_parts(parts) -> None:
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise FreeVLMError(f"unknown backbone parts {sorted(unknown)}; expected some of {', '.join(PARTS)}")


def select_trainable(backbone, parts) -> list[nn.Parameter]:
    check_parts(parts)
    groups = backbone.parameter_groups()
    backbone.model.requires_grad_(False)
    params = [p for part in parts for p in groups.get(part, [])]
    for p in params:
        p.requires_grad_(True)
    backbone.model.train()
    eval_frozen(backbone.model)  # a frozen part keeps its dropout off, as BLIP-2's fine-tuning does for the LM
    return params


def eval_frozen(module: nn.Module) -> None:
    """Put every submodule whose parameters are all frozen in eval mode (dropout off), recursively; dropout layers
    inside a part that trains stay in training mode."""
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
        else:
            eval_frozen(child)


def train_backbone(backbone, examples, cfg: Stage1Config, out: str | Path, *, resume: bool = False,
                   stage: str = "stage1", accelerator=None):
    """Fine-tune `backbone` in place on (image, prompt, target) examples; save it under out/backbone."""
    if any(e.target is None for e in examples):
        raise FreeVLMError("stage 1 needs labelled examples (every example must have a target)")
    check_parts(cfg.train_parts)  # before open_run writes the run's config
    accelerator = accelerator or make_accelerator()
    run = open_run(out, config_dict({"stage": stage}, cfg), resume, accelerator)
    set_seed(cfg.loop.seed)  # new modules (exits, discriminators) start from the same weights on every rank and rerun
    backbone.model.to(accelerator.device)
    params = select_trainable(backbone, cfg.train_parts)
    optimizer = make_optimizer(params, cfg.optim)
    steps_per_epoch = -(-len(examples) // cfg.loop.batch_size)
    scheduler = make_scheduler(optimizer, cfg.optim, steps_per_epoch)
    module, optimizer, scheduler = accelerator.prepare(CaptionLoss(backbone, cfg.precision), optimizer, scheduler)
    encoder_decoder = backbone.lm.is_encoder_decoder

    def step(batch: Batch) -> dict[str, float]:
        local = count_targets(batch, encoder_decoder)
        norm = global_count(accelerator, local)
        loss = module(batch, norm)
        accelerator.backward(loss)
        if cfg.optim.grad_clip:
            accelerator.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item() * float(norm) / max(int(local), 1)}

    collate = Collator(backbone, train=True, max_target_tokens=cfg.max_target_tokens)
    means = fit(accelerator, examples, collate, step, cfg.loop, run, stage, [scheduler], resume)
    backbone.model.eval()
    backbone.model.requires_grad_(False)
    if accelerator.is_main_process:
        save_backbone(backbone, Path(out) / "backbone")
    accelerator.wait_for_everyone()
    return means


def save_backbone(backbone, folder: Path) -> None:
    """A transformers checkpoint folder (model + processor) that `load_backbone` reads back; built beside `folder`,
    fsynced and renamed into place, so an interrupted save never leaves a half checkpoint (or none)."""
    import shutil

    from freevlm.backbones.common import quiet_transformers
    from freevlm.outputs import replace_folder

    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with quiet_transformers():
        backbone.model.save_pretrained(tmp)
        if backbone.processor is not None:
            backbone.processor.save_pretrained(tmp)
    replace_folder(tmp, folder)
