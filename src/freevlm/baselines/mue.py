"""MuE adapted to BLIP-2: no exit is trained; a token exits at the first exit layer whose hidden state has stopped
changing (cosine similarity with the layer's input above a threshold, `criteria.Similarity`), and its prediction is
the backbone's own frozen norm + head applied there. Skipped layers reuse the exit layer's K/V (`copy`, MuE's
treatment of skipped layers)."""

from __future__ import annotations

from freevlm.baselines.method import Method

SIMILARITIES = (0.9, 0.95, 0.98, 0.99, 0.995, 1.0)
METHOD = Method("MuE", None, "frozen-head", "similarity", SIMILARITIES, kv_policy="copy")
