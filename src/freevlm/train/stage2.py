"""Stage 2 (§3.3–3.4): train exits on a frozen backbone.

FREE's exits are trained adversarially: a discriminator D_i per exit learns to tell the final layer's hidden state
h_N (real) from the exit transformer's output E_i(h_i) (fake), and the exit transformer learns to fool it, alongside a
task loss that keeps it from collapsing:

- `semi`    : L_i = CE_i + L_gen_i on labelled data (3 epochs)                                   [§3.3]
- `kd`      : L_i = KL(p_i || p_N) + L_gen_i, no labels; positions are the backbone's own greedy captions [§3.4]
- `capfilt` : pseudo-labels (10 sampled captions per image, ranked, top 2 kept), then as `semi` [§3.4]

Updates alternate as in the original GAN: each step first updates every D_i on L_fc, then the exits on L. The same
loop trains the baselines' exits (DeeBERT, PABEE, LeeBERT: `task` = "ce" / "pabee" / "leebert", no adversary),
and the paper's ablations are switches: `adversarial_weight=0` (no adversarial term), `task="none"` (no CE / no KD).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn

from freevlm.errors import FreeVLMError
from freevlm.exits import (
    EXIT_KINDS,
    SEED_LAYER_CHOICES,
    Discriminator,
    ExitSpec,
    ExitStack,
    build_exits,
    save_exits,
    validate_exit_layers,
)
from freevlm.losses import (
    KL_DIRECTIONS,
    discriminator_loss,
    exit_kl,
    generator_loss,
    mutual_distillation,
    pabee_weights,
    token_cross_entropy,
)
from freevlm.train.batches import Batch, Collator
from freevlm.train.forward import FrozenImageFeatures, TeacherForced, teacher_forced
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

TASKS = ("ce", "kd", "none", "pabee", "leebert", "leeblip")


@dataclass
class ExitTrainConfig:
    exit_kind: str = "transformer"  # "transformer" (FREE) or "linear" (DeeBERT/PABEE/LeeBERT heads)
    exit_layers: list[int] | None = None  # None = the paper's placement scaled to this LM's depth
    seed_layer: str = "next"  # which LM layer seeds each exit transformer (see exits.seed_layer)
    task: str = "ce"  # per-exit task loss: ce | kd | none | pabee | leebert | leeblip
    adversarial_weight: float = 1.0  # weight of L_gen (0 = the "no adversarial" ablation; baselines use 0)
    kl_direction: str = "exit_to_final"  # the paper's KL(p_i || p_N); "final_to_exit" is the usual KD direction
    distill_weight: float = 1.0  # leeblip/leebert: weight of the distillation term next to CE
    discriminator_hidden: int = 3072  # §4: one hidden layer of 3072, LeakyReLU
    discriminator_features: str = "normed"  # what D_i compares: "normed" (after the shared frozen final norm, the
    # representation the classifier C_N reads) or "raw" (pre-norm h_N vs E_i(h_i)); see docs/design.md
    discriminator_lr: float | None = None  # None = the exits' learning rate
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", lr=1e-5, warmup_steps=500))
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=3, batch_size=16))  # §4: 3 epochs
    max_target_tokens: int = 32
    cache_image_features: bool = True  # compute each image's features once (the backbone is frozen); see forward.py
    head_precision: str = "fp32"  # "bf16": exit heads' logits under bf16 autocast, losses in fp32. On a real LM the
    # vocabulary head is most of an exit's training cost (SmolLM2: 49k rows); bf16 matmuls run it ~3x faster on a CPU
    # with AVX-512 BF16 and on any recent GPU

    def __post_init__(self):
        # Checked here, before any work, even where the variant does not use them: a typo must not pass silently.
        if self.exit_kind not in EXIT_KINDS:
            raise FreeVLMError(f"unknown exit kind {self.exit_kind!r}; expected one of {', '.join(EXIT_KINDS)}")
        if self.seed_layer not in SEED_LAYER_CHOICES:
            raise FreeVLMError(f"unknown exit seed layer {self.seed_layer!r}; expected one of "
                               f"{', '.join(SEED_LAYER_CHOICES)}")
        if self.kl_direction not in KL_DIRECTIONS:
            raise FreeVLMError(f"unknown KL direction {self.kl_direction!r}; expected one of "
                               f"{', '.join(KL_DIRECTIONS)}")
        if self.task not in TASKS:
            raise FreeVLMError(f"unknown exit task loss {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.discriminator_features not in ("normed", "raw"):
            raise FreeVLMError(f"discriminator_features must be 'normed' or 'raw', got {self.discriminator_features!r}")
        if self.head_precision not in ("fp32", "bf16"):
            raise FreeVLMError(f"head_precision must be 'fp32' or 'bf16', got {self.head_precision!r}")
        if self.adversarial_weight and self.exit_kind != "transformer":
            raise FreeVLMError("the adversarial term needs exit transformers (exit_kind='transformer')")


class ExitLosses(nn.Module):
    """The generator side, as one module for DDP: exits (+ LeeBERT's learned weights) and their task losses."""

    def __init__(self, backbone, exits: ExitStack, cfg: ExitTrainConfig):
        super().__init__()
        self.exits = exits
        self.cfg = cfg
        self.__dict__["backbone"] = backbone
        if cfg.task == "leebert":  # learned weights of each exit as a teacher (softmax over exits)
            self.teacher_logits = nn.Parameter(torch.zeros(len(exits.exits)))

    def forward(self, tf: TeacherForced, normalizer) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        lm = self.backbone.lm
        mask = tf.mask
        states, logits = [], []
        for layer, exit_ in zip(self.exits.layers, self.exits.exits):
            state = exit_.state(lm, tf.states[layer], tf.ctx, None)  # every position: an exit layer attends
            states.append(state)
            # the head only where a loss is taken (tf.logits is there too: teacher_forced(at_targets=True))
            with torch.autocast(state.device.type, torch.bfloat16, enabled=self.cfg.head_precision == "bf16"):
                logits.append(exit_.logits(lm, state[mask]) if self.cfg.task != "none" else None)
        targets = tf.targets[mask]
        task, logs = self._task_loss(logits, tf.logits, targets, normalizer)
        return states, task, logs

    def _task_loss(self, logits, final, targets, normalizer):
        """`logits`, `final`: (M, V) at the M positions with a loss; `targets` (M,)."""
        cfg, zero = self.cfg, targets.new_zeros((), dtype=torch.float32)
        mask = torch.ones_like(targets, dtype=torch.bool)  # every one of the M positions carries a loss
        if cfg.task == "none":
            return zero, {}
        if cfg.task == "kd":
            losses = [exit_kl(lg, final, mask, cfg.kl_direction, normalizer) for lg in logits]
            return sum(losses), {"kd": sum(x.item() for x in losses) / len(losses)}
        ce = [token_cross_entropy(lg, targets, normalizer) for lg in logits]
        if cfg.task == "pabee":
            w = pabee_weights(len(ce)).to(ce[0].device)
            return sum(wi * c for wi, c in zip(w, ce)), {"ce": sum(c.item() for c in ce) / len(ce)}
        total = sum(ce)
        logs = {"ce": total.item() / len(ce)}
        if cfg.task == "leeblip":  # the paper's LeeBLIP: hard labels + distillation from the final layer
            kd = sum(exit_kl(lg, final, mask, "final_to_exit", normalizer) for lg in logits)
            total = total + cfg.distill_weight * kd
            logs["kd"] = kd.item() / len(ce)
        elif cfg.task == "leebert":  # LeeBERT: mutual distillation between exits with learned teacher weights
            w = torch.softmax(self.teacher_logits, dim=0)
            kd = mutual_distillation(logits, mask, w, normalizer)
            total = total + cfg.distill_weight * kd
            logs["kd"] = kd.item()
        return total, logs


class ExitSets(nn.Module):
    """Several `ExitLosses` on the same teacher-forced batch, as one module for DDP (`train_exits_together`)."""

    def __init__(self, sets: dict[str, ExitLosses]):
        super().__init__()
        self.sets = nn.ModuleDict(sets)

    def forward(self, tf: TeacherForced, normalizer) -> dict[str, tuple[torch.Tensor, dict]]:
        return {name: m(tf, normalizer)[1:] for name, m in self.sets.items()}


class Discriminators(nn.Module):
    def __init__(self, hidden_size: int, count: int, inner: int):
        super().__init__()
        self.nets = nn.ModuleList(Discriminator(hidden_size, inner) for _ in range(count))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [net(f) for net, f in zip(self.nets, features)]


def needs_final_logits(cfg: ExitTrainConfig) -> bool:
    return cfg.task in ("kd", "leeblip")


def train_exits(backbone, examples, cfg: ExitTrainConfig, out: str | Path, *, resume: bool = False,
                stage: str = "stage2", accelerator=None, exits: ExitStack | None = None,
                save_discriminators: bool = False) -> tuple[ExitStack, dict]:
    """Train exits on a frozen `backbone`; save them (exit-only checkpoint) under out/exits."""
    if cfg.task in ("ce", "pabee", "leebert", "leeblip") and any(e.target is None for e in examples):
        raise FreeVLMError(f"task loss {cfg.task!r} needs a target for every example (use kd, or pseudo-labels)")
    layers = cfg.exit_layers or backbone.default_exit_layers()
    validate_exit_layers(exits.layers if exits is not None else layers, backbone.lm.num_layers)  # before open_run
    accelerator = accelerator or make_accelerator()
    run = open_run(out, config_dict({"stage": stage}, cfg), resume, accelerator)
    set_seed(cfg.loop.seed)  # new modules (exits, discriminators) start from the same weights on every rank and rerun
    lm = backbone.lm
    backbone.model.to(accelerator.device).eval().requires_grad_(False)
    if exits is None:
        exits = build_exits(lm, ExitSpec(cfg.exit_kind, list(layers), cfg.seed_layer))
    exits.to(accelerator.device).train()
    generator = ExitLosses(backbone, exits, cfg)
    opt_g = make_optimizer(generator.parameters(), cfg.optim)
    steps_per_epoch = -(-len(examples) // cfg.loop.batch_size)
    sched_g = make_scheduler(opt_g, cfg.optim, steps_per_epoch)
    adversarial = cfg.adversarial_weight > 0
    objects = [generator, opt_g, sched_g]
    if adversarial:
        discs = Discriminators(lm.hidden_size, len(exits.exits), cfg.discriminator_hidden).to(accelerator.device)
        d_optim = OptimConfig(**{**cfg.optim.__dict__, "lr": cfg.discriminator_lr or cfg.optim.lr})
        opt_d = make_optimizer(discs.parameters(), d_optim)
        sched_d = make_scheduler(opt_d, d_optim, steps_per_epoch)
        objects += [discs, opt_d, sched_d]
    prepared = accelerator.prepare(*objects)
    generator, opt_g, sched_g = prepared[:3]
    if adversarial:
        discs, opt_d, sched_d = prepared[3:]
    keep = set(exits.layers)
    final_logits = needs_final_logits(cfg)

    features = FrozenImageFeatures(backbone) if cfg.cache_image_features else None

    def step(batch: Batch) -> dict[str, float]:
        with torch.no_grad():
            tf = teacher_forced(backbone, batch, keep=keep, logits=final_logits, at_targets=True,
                                image_features=None if features is None else features(batch))
        mask = tf.mask
        local = mask.sum()
        norm = global_count(accelerator, local)
        states, task, logs = generator(tf, norm)
        scale = float(norm) / max(int(local), 1)  # converts normalised sums to this process's per-token means
        if adversarial:
            # D_i only sees the positions that carry a loss: (n, D) features, real first, then fake
            feats = lm.final_norm if cfg.discriminator_features == "normed" else (lambda x: x)
            real = feats(tf.final[mask])
            fakes = [feats(s[mask]) for s in states]
            ones = torch.ones(len(real), dtype=torch.bool, device=real.device)
            d_scores = discs([torch.cat([real, f.detach()]) for f in fakes])
            d_loss = sum(discriminator_loss(sc[: len(real)], sc[len(real) :], ones, norm) for sc in d_scores)
            opt_d.zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            opt_d.step()
            sched_d.step()
            g_adv = sum(generator_loss(sc, ones, norm) for sc in discs(fakes))
            logs["disc"] = d_loss.item() * scale / len(states)
            logs["gen"] = g_adv.item() * scale / len(states)
            loss = task + cfg.adversarial_weight * g_adv
        else:
            loss = task
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.optim.grad_clip:
            accelerator.clip_grad_norm_(generator.parameters(), cfg.optim.grad_clip)
        opt_g.step()
        logs = {k: (v * scale if k in ("ce", "kd") else v) for k, v in logs.items()}
        logs["loss"] = loss.item() * scale
        return logs

    collate = Collator(backbone, train=True, max_target_tokens=cfg.max_target_tokens)
    means = fit(accelerator, examples, collate, step, cfg.loop, run, stage, [sched_g], resume)
    exits = accelerator.unwrap_model(generator).exits.eval()
    if accelerator.is_main_process:
        discs_out = accelerator.unwrap_model(discs) if (adversarial and save_discriminators) else None
        save_exits(Path(out) / "exits", lm, exits, backbone.name, discs_out)
    accelerator.wait_for_everyone()
    return exits, means


def train_exits_together(backbone, examples, cfgs: dict[str, ExitTrainConfig], out: str | Path, *,
                         resume: bool = False, stage: str = "stage2", accelerator=None) -> dict[str, ExitStack]:
    """Train several non-adversarial exit sets (e.g. every linear-head baseline) in one pass over the data.

    Their backbone is frozen and their batches are the same (same examples, loop and seed), so the teacher-forced
    forward, which is nearly all of a linear head's training cost, is run once per batch and shared. Each set keeps
    its own loss, gradient clipping and (elementwise) Adam state, so it ends with the weights that training it alone
    gives (tested). Saves each set under out/<name>/exits; returns {name: exits}.
    """
    first = next(iter(cfgs.values()))
    for name, cfg in cfgs.items():
        if cfg.adversarial_weight:
            raise FreeVLMError(f"{name}: exits with an adversarial term train alone (train_exits)")
        if (cfg.loop, cfg.optim, cfg.max_target_tokens) != (first.loop, first.optim, first.max_target_tokens):
            raise FreeVLMError(f"{name}: exit sets trained together need the same loop, optimiser and target length")
        if cfg.task in ("ce", "pabee", "leebert", "leeblip") and any(e.target is None for e in examples):
            raise FreeVLMError(f"task loss {cfg.task!r} needs a target for every example (use kd, or pseudo-labels)")
        validate_exit_layers(cfg.exit_layers or backbone.default_exit_layers(), backbone.lm.num_layers)
    accelerator = accelerator or make_accelerator()
    run = open_run(out, {"stage": stage, "together": {k: config_dict(c) for k, c in cfgs.items()}}, resume,
                   accelerator)
    set_seed(first.loop.seed)
    lm = backbone.lm
    backbone.model.to(accelerator.device).eval().requires_grad_(False)
    sets = {}
    for name, cfg in cfgs.items():
        layers = cfg.exit_layers or backbone.default_exit_layers()
        exits = build_exits(lm, ExitSpec(cfg.exit_kind, list(layers), cfg.seed_layer)).to(accelerator.device).train()
        sets[name] = ExitLosses(backbone, exits, cfg)
    generator = ExitSets(sets)
    optimizer = make_optimizer(generator.parameters(), first.optim)  # Adam(W) is elementwise: one = one per set
    scheduler = make_scheduler(optimizer, first.optim, -(-len(examples) // first.loop.batch_size))
    generator, optimizer, scheduler = accelerator.prepare(generator, optimizer, scheduler)
    plain = accelerator.unwrap_model(generator).sets
    keep = {layer for m in plain.values() for layer in m.exits.layers}
    final_logits = any(needs_final_logits(c) for c in cfgs.values())
    features = FrozenImageFeatures(backbone) if first.cache_image_features else None

    def step(batch: Batch) -> dict[str, float]:
        with torch.no_grad():
            tf = teacher_forced(backbone, batch, keep=keep, logits=final_logits, at_targets=True,
                                image_features=None if features is None else features(batch))
        local = tf.mask.sum()
        norm = global_count(accelerator, local)
        scale = float(norm) / max(int(local), 1)
        total, logs = 0.0, {}
        for name, (task, member_logs) in generator(tf, norm).items():
            total = total + task
            logs.update({f"{name}/{k}": v * scale for k, v in member_logs.items()})
            logs[f"{name}/loss"] = task.item() * scale
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(total)
        if first.optim.grad_clip:
            for name in cfgs:  # per set, as each would be clipped alone
                accelerator.clip_grad_norm_(plain[name].parameters(), first.optim.grad_clip)
        optimizer.step()
        return logs

    collate = Collator(backbone, train=True, max_target_tokens=first.max_target_tokens)
    fit(accelerator, examples, collate, step, first.loop, run, stage, [scheduler], resume)
    out_sets = {name: plain[name].exits.eval() for name in cfgs}
    if accelerator.is_main_process:
        for name, exits in out_sets.items():
            save_exits(Path(out) / name / "exits", lm, exits, backbone.name)
    accelerator.wait_for_everyone()
    return out_sets


# Every exit-training recipe of the paper and its baselines, as (exit kind, task loss, adversarial weight, targets).
# targets: "labels" = the dataset's labels; "greedy" = the backbone's own greedy outputs (KD positions, no labels);
# "capfilt" = CapFilt pseudo-labels. §4 trains semi-supervised exits for 3 epochs and unsupervised ones for 5.
VARIANTS = {
    "semi": ("transformer", "ce", 1.0, "labels"),  # FREE, semi-supervised (§3.3)
    "kd": ("transformer", "kd", 1.0, "greedy"),  # FREE, unsupervised knowledge distillation (§3.4)
    "capfilt": ("transformer", "ce", 1.0, "capfilt"),  # FREE, unsupervised CapFilt pseudo-labels (§3.4)
    "no-adversarial": ("transformer", "ce", 0.0, "labels"),  # ablation (Fig. 4a)
    "no-ce": ("transformer", "none", 1.0, "labels"),  # ablation: adversarial term only, semi-supervised setting
    "no-kd": ("transformer", "none", 1.0, "greedy"),  # ablation: adversarial term only, unsupervised setting
    "deebert": ("linear", "ce", 0.0, "labels"),  # DeeBLIP: own linear head per exit, CE
    "pabee": ("linear", "pabee", 0.0, "labels"),  # PABEE-BLIP: PABEE's depth-weighted CE
    "leeblip": ("linear", "leeblip", 0.0, "labels"),  # LeeBLIP as §4 describes it: CE + KD from the final layer
    "leebert": ("linear", "leebert", 0.0, "labels"),  # original LeeBERT: CE + mutual distillation, learned weights
}
UNSUPERVISED_EPOCHS, SEMI_EPOCHS = 5, 3


def variant_config(name: str, **overrides) -> ExitTrainConfig:
    """The ExitTrainConfig of a named variant; `overrides` set any other field."""
    if name not in VARIANTS:
        raise FreeVLMError(f"unknown exit-training variant {name!r}; expected one of {', '.join(VARIANTS)}")
    kind, task, adversarial, targets = VARIANTS[name]
    cfg = ExitTrainConfig(exit_kind=kind, task=task, adversarial_weight=adversarial, **overrides)
    if "loop" not in overrides:
        cfg.loop.epochs = UNSUPERVISED_EPOCHS if targets == "greedy" else SEMI_EPOCHS
    return cfg
