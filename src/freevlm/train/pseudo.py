"""Targets for the unsupervised variants (§3.4), made by the backbone itself.

- Knowledge distillation needs token positions to distil at: we use the backbone's own greedy caption of each image
  (full depth), so the exits learn p_N along the text the backbone would produce. No human label is read.
- CapFilt: the backbone samples `num_candidates` captions per image (nucleus sampling, as BLIP's CapFilt), a scorer
  ranks them, and the top `keep` become labels. The paper ranks with CLIP ViT-L/14, which is not available offline;
  the scorer is pluggable and the default is the backbone's own image-text likelihood (the length-normalised log
  probability of the caption given the image), which needs nothing beyond the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch
from tqdm.auto import tqdm

from freevlm.generation.api import EarlyExitVLM
from freevlm.losses import IGNORE
from freevlm.train.batches import Collator, Example
from freevlm.train.forward import teacher_forced


def _chunks(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def greedy_targets(backbone, examples: list[Example], batch_size: int = 16, max_new_tokens: int = 30,
                   progress: bool = True) -> list[Example]:
    """The examples with `target` replaced by the backbone's own greedy (full-depth) output."""
    vlm = EarlyExitVLM(backbone)
    out = []
    for chunk in tqdm(list(_chunks(examples, batch_size)), desc="pseudo-labels", disable=not progress, leave=False):
        res = vlm.generate([e.image_path for e in chunk], [e.prompt for e in chunk], use_exits=False,
                           max_new_tokens=max_new_tokens)
        out.extend(replace(e, target=t) for e, t in zip(chunk, res.texts))
    return out


class CaptionScorer(Protocol):
    def __call__(self, backbone, candidates: list[Example]) -> torch.Tensor:
        """A score per candidate (higher = better match of caption and image)."""
        ...


@dataclass
class LikelihoodScorer:
    """Mean log-probability per token of the candidate caption given the image, under the backbone's final layer."""

    batch_size: int = 32

    @torch.no_grad()
    def __call__(self, backbone, candidates: list[Example]) -> torch.Tensor:
        collate = Collator(backbone, train=True)
        scores = []
        for chunk in _chunks(candidates, self.batch_size):
            batch = collate(chunk).to(next(backbone.model.parameters()).device)
            tf = teacher_forced(backbone, batch, keep=set(), logits=True)
            mask = tf.targets != IGNORE
            logp = torch.log_softmax(tf.logits.float(), -1)
            tok = logp.gather(-1, tf.targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores.append((tok * mask).sum(-1) / mask.sum(-1).clamp(min=1))
        return torch.cat(scores).cpu()


def capfilt_targets(backbone, examples: list[Example], *, num_candidates: int = 10, keep: int = 2,
                    scorer: CaptionScorer | None = None, batch_size: int = 8, max_new_tokens: int = 30,
                    top_p: float = 0.9, seed: int = 0, progress: bool = True) -> tuple[list[Example], dict]:
    """CapFilt pseudo-labels: `keep` examples per input image, from `num_candidates` sampled captions each.

    Returns the new examples and, per image key, all candidates with their scores (for inspection and tests).
    """
    scorer = scorer or LikelihoodScorer()
    vlm = EarlyExitVLM(backbone)
    torch.manual_seed(seed)
    kept, ranked = [], {}
    for chunk in tqdm(list(_chunks(examples, batch_size)), desc="capfilt", disable=not progress, leave=False):
        res = vlm.generate([e.image_path for e in chunk], [e.prompt for e in chunk], use_exits=False,
                           max_new_tokens=max_new_tokens, do_sample=True, top_p=top_p,
                           num_return_sequences=num_candidates)
        per_image = [[replace(e, target=t) for t in res.texts[i * num_candidates : (i + 1) * num_candidates] if t]
                     for i, e in enumerate(chunk)]
        flat = [c for cands in per_image for c in cands]
        all_scores = scorer(backbone, flat).split([len(c) for c in per_image]) if flat else []  # one call per chunk
        for e, cands, scores in zip(chunk, per_image, all_scores):
            if not cands:
                continue
            order = torch.argsort(scores, descending=True).tolist()
            ranked[e.key] = [(cands[j].target, float(scores[j])) for j in order]
            kept.extend(cands[j] for j in order[:keep])
    return kept, ranked
