"""The exit-training losses on inputs whose values are known in closed form."""

from __future__ import annotations

import math

import torch

from freevlm.losses import (
    IGNORE,
    discriminator_loss,
    exit_kl,
    generator_loss,
    mutual_distillation,
    pabee_weights,
    token_cross_entropy,
)


def test_cross_entropy_of_uniform_logits_is_log_vocab_and_ignores_masked():
    logits = torch.zeros(2, 3, 10)
    targets = torch.tensor([[1, 2, IGNORE], [IGNORE, IGNORE, 4]])
    assert math.isclose(token_cross_entropy(logits, targets).item(), math.log(10), rel_tol=1e-6)
    # a sum over 3 positions divided by a global normaliser of 6
    assert math.isclose(token_cross_entropy(logits, targets, normalizer=6).item(), math.log(10) / 2, rel_tol=1e-6)


def test_kl_is_zero_for_equal_distributions_and_matches_hand_value():
    a = torch.tensor([[[0.0, 0.0]]])
    b = torch.tensor([[[math.log(3.0), 0.0]]])  # p_N = (3/4, 1/4)
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert exit_kl(a, a.clone(), mask).item() == 0.0
    # KL(p_i || p_N) with p_i = (1/2, 1/2): 0.5 log(0.5/0.75) + 0.5 log(0.5/0.25)
    expected = 0.5 * math.log(2 / 3) + 0.5 * math.log(2)
    assert math.isclose(exit_kl(a, b, mask).item(), expected, rel_tol=1e-6)
    # the other direction: 0.75 log(0.75/0.5) + 0.25 log(0.25/0.5)
    other = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert math.isclose(exit_kl(a, b, mask, "final_to_exit").item(), other, rel_tol=1e-6)


def test_adversarial_losses_at_chance_and_at_a_confident_discriminator():
    mask = torch.ones(2, 2, dtype=torch.bool)
    zero = torch.zeros(2, 2)
    assert math.isclose(discriminator_loss(zero, zero, mask).item(), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(generator_loss(zero, mask).item(), math.log(2), rel_tol=1e-6)
    fooled = torch.full((2, 2), 20.0)  # D says "real" to the fake: the generator's loss is ~0
    assert generator_loss(fooled, mask).item() < 1e-6
    assert discriminator_loss(fooled, -fooled, mask).item() < 1e-6


def test_pabee_weights_grow_with_depth_and_sum_to_one():
    w = pabee_weights(4)
    assert torch.allclose(w, torch.tensor([1, 2, 3, 4]) / 10.0)


def test_mutual_distillation_vanishes_when_exits_agree():
    logits = torch.randn(1, 3, 7)
    mask = torch.ones(1, 3, dtype=torch.bool)
    w = torch.tensor([0.5, 0.5])
    assert mutual_distillation([logits, logits.clone()], mask, w).abs().item() < 1e-6
    assert mutual_distillation([logits, torch.randn(1, 3, 7)], mask, w).item() > 0
