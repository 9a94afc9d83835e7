"""DeeBERT adapted to VLMs (the paper's DeeBLIP): every exit has its own full-vocabulary linear classifier on the
exit layer's hidden state (after the frozen final norm), trained with cross-entropy on a frozen backbone; a token
exits at the first exit whose max softmax probability exceeds alpha. Training: `stage2.VARIANTS["deebert"]`."""

from __future__ import annotations

from freevlm.baselines.method import Method

METHOD = Method("DeeBLIP", "deebert", "linear", "confidence", (0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
