"""LeeBERT adapted to VLMs.

The paper's LeeBLIP (§4) is "knowledge distillation from the final layer with hard labels": linear exits trained
with CE + KL(p_N || p_i) (`stage2` task "leeblip"). The original LeeBERT instead distils mutually between exits with
learned per-exit weights (task "leebert"). LeeBERT learns those weights by cross-level (bi-level) optimisation on
held-out data; here they are a softmax over learned logits optimised jointly with the exits on the training loss, a
simplification recorded in docs/design.md. Both decide by confidence.
"""

from __future__ import annotations

from freevlm.baselines.method import Method

LEEBLIP = Method("LeeBLIP", "leeblip", "linear", "confidence", (0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
METHOD = Method("LeeBERT", "leebert", "linear", "confidence", (0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
