"""FREE (§3): exit transformers + the frozen shared head, trained with CE (semi-supervised) or KD / CapFilt labels
(unsupervised) plus an adversarial term against one discriminator per exit; confidence exits (§3.5)."""

from __future__ import annotations

from freevlm.baselines.method import Method

ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # §4
METHOD = Method("FREE", "semi", "transformer", "confidence", ALPHAS)
