"""PABEE adapted to VLMs (PABEE-BLIP): the same linear exits, trained with PABEE's depth-weighted cross-entropy
(exit j weighs j / sum(1..K), `losses.pabee_weights`); a token exits once `patience` consecutive exits agree with the
previous one on the argmax token. The report sweeps the patience."""

from __future__ import annotations

from freevlm.baselines.method import Method

PATIENCES = (1, 2, 3, 4)
METHOD = Method("PABEE-BLIP", "pabee", "linear", "patience", PATIENCES)
