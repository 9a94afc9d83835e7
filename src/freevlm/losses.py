"""Exit-training losses as pure functions of logits, labels and discriminator scores.

All token losses return a *sum* over the positions that count, divided by `normalizer` (the number of those positions
by default). Under data parallelism pass the global count of positions across processes, so that DDP's gradient
averaging yields the gradient of the global mean (see `train/loop.py`).

Notation follows the paper (§3.3–3.4): p_i is the distribution of exit i, p_N the final layer's, D_i the
discriminator of exit i (a logit; D = sigmoid(logit)), E_i the exit transformer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _norm(count: torch.Tensor, normalizer: float | torch.Tensor | None) -> torch.Tensor | float:
    return count.clamp(min=1) if normalizer is None else normalizer


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, normalizer=None) -> torch.Tensor:
    """L^CE (Eq. 1, Eq. 2): -log p(y*_t) summed over positions whose target is not IGNORE. logits (B,T,V)."""
    loss = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss / _norm((targets != IGNORE).sum(), normalizer)


KL_DIRECTIONS = ("exit_to_final", "final_to_exit")


def exit_kl(exit_logits, final_logits, mask, direction: str = "exit_to_final", normalizer=None) -> torch.Tensor:
    """L^KL (Eq. 3). The paper writes KL(p_i || p_N) = sum_v p_i log(p_i / p_N) ("exit_to_final", its reading);
    "final_to_exit" is the usual distillation direction KL(p_N || p_i). The final distribution is a fixed teacher."""
    log_p_exit = torch.log_softmax(exit_logits.float(), dim=-1)
    log_p_final = torch.log_softmax(final_logits.detach().float(), dim=-1)
    if direction == "exit_to_final":
        kl = (log_p_exit.exp() * (log_p_exit - log_p_final)).sum(-1)
    elif direction == "final_to_exit":
        kl = (log_p_final.exp() * (log_p_final - log_p_exit)).sum(-1)
    else:
        raise ValueError(f"unknown KL direction {direction!r}")
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / _norm(mask.sum(), normalizer)


def discriminator_loss(real_logits, fake_logits, mask, normalizer=None) -> torch.Tensor:
    """L^fc: -log D(h_N) - log(1 - D(E_i(h_i))) per position, as a sum over masked positions / normalizer."""
    mask = mask.to(real_logits.dtype)
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits), reduction="none")
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits), reduction="none")
    return ((real + fake) * mask).sum() / _norm(mask.sum(), normalizer)


def generator_loss(fake_logits, mask, normalizer=None) -> torch.Tensor:
    """L^gen: -log D(E_i(h_i)), the non-saturating generator loss the exit transformer minimises."""
    mask = mask.to(fake_logits.dtype)
    loss = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits), reduction="none")
    return (loss * mask).sum() / _norm(mask.sum(), normalizer)


def pabee_weights(num_exits: int) -> torch.Tensor:
    """PABEE's loss weights: exit j (1-based) weighs j / sum(1..K), so deeper exits count more."""
    w = torch.arange(1, num_exits + 1, dtype=torch.float32)
    return w / w.sum()


def mutual_distillation(exit_logits: list[torch.Tensor], mask, weights: torch.Tensor, normalizer=None):
    """LeeBERT's cross-level distillation: every exit learns from every other exit (detached teachers), the pair
    (student s, teacher t) weighted by weights[t]. Returns the sum over students."""
    mask = mask.to(torch.float32)
    total = exit_logits[0].new_zeros(())
    for s, student in enumerate(exit_logits):
        log_s = torch.log_softmax(student.float(), -1)
        for t, teacher in enumerate(exit_logits):
            if s == t:
                continue
            log_t = torch.log_softmax(teacher.detach().float(), -1)
            kl = (log_t.exp() * (log_t - log_s)).sum(-1)
            total = total + weights[t] * (kl * mask).sum() / _norm(mask.sum(), normalizer)
    return total
