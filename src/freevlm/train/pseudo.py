"""Targets for the unsupervised variants (§3.4), made by the backbone itself.

- Knowledge distillation needs token positions to distil at: we use the backbone's own greedy caption of each image
  (full depth), so the exits learn p_N along the text the backbone would produce. No human label is read.
- CapFilt: the backbone samples `num_candidates` captions per image (nucleus sampling, top-p 0.9, as BLIP's
  CapFilt), a ranker scores them against the image (`freevlm.rankers`: CLIP as the paper, a BLIP-2 ITM head, or the
  backbone's own likelihood), and the top `keep` distinct captions become labels. Empty samples are dropped and a
  caption sampled twice is one candidate (scored once, kept at most once); ties in score go to the caption sampled
  more often, then to the one sampled first.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from freevlm.generation.api import EarlyExitVLM
from freevlm.rankers import CaptionRanker, LikelihoodRanker
from freevlm.train.batches import Example


def _chunks(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def greedy_targets(backbone, examples: list[Example], batch_size: int = 16, max_new_tokens: int = 30,
                   progress: bool = True) -> list[Example]:
    """The examples with `target` replaced by the backbone's own greedy (full-depth) output."""
    vlm = EarlyExitVLM(backbone)
    out = []
    for chunk in tqdm(list(_chunks(examples, batch_size)), desc="pseudo-labels", disable=not progress, leave=False):
        res = vlm.generate([e.image_path for e in chunk], [e.prompt for e in chunk], mode="full",
                           max_new_tokens=max_new_tokens)
        out.extend(replace(e, target=t) for e, t in zip(chunk, res.texts))
    return out


def sample_captions(backbone, examples: list[Example], *, num_candidates: int = 10, top_p: float = 0.9,
                    seed: int = 0, batch_size: int = 8, max_new_tokens: int = 30,
                    progress: bool = True) -> list[list[str]]:
    """`num_candidates` nucleus samples per example from the backbone at full depth, as generated (empty ones too)."""
    vlm = EarlyExitVLM(backbone)
    torch.manual_seed(seed)
    out = []
    for chunk in tqdm(list(_chunks(examples, batch_size)), desc="capfilt: sampling", disable=not progress,
                      leave=False):
        res = vlm.generate([e.image_path for e in chunk], [e.prompt for e in chunk], mode="full",
                           max_new_tokens=max_new_tokens, do_sample=True, top_p=top_p,
                           num_return_sequences=num_candidates)
        out.extend(res.texts[i * num_candidates : (i + 1) * num_candidates] for i in range(len(chunk)))
    return out


def distinct_captions(samples: list[str]) -> list[tuple[str, int]]:
    """(caption, times sampled) per distinct non-empty sample, in first-sampled order; whitespace is normalised."""
    counts = Counter(" ".join(t.split()) for t in samples)
    counts.pop("", None)
    return list(counts.items())  # a Counter keeps first-insertion order


def rank_captions(candidates: list[tuple[str, int]], scores: list[float]) -> list[int]:
    """Indices of `candidates` best first: by score, ties to the more often sampled caption, then the earlier one."""
    return sorted(range(len(candidates)), key=lambda i: (-scores[i], -candidates[i][1], i))


def rank_samples(backbone, examples: list[Example], samples: list[list[str]], ranker: CaptionRanker,
                 batch_size: int = 8) -> dict[str, list[tuple[str, float]]]:
    """Per example key: its distinct sampled captions with their scores, best first (one ranker call per
    `batch_size` examples, so a ranker batches across images)."""
    ranked = {}
    for chunk in _chunks(list(zip(examples, samples)), batch_size):
        per_image = [(e, distinct_captions(texts)) for e, texts in chunk]
        flat = [replace(e, target=text) for e, cands in per_image for text, _ in cands]
        scores = ranker(backbone, flat).tolist() if flat else []
        at = 0
        for e, cands in per_image:
            own, at = scores[at : at + len(cands)], at + len(cands)
            if cands:
                ranked[e.key] = [(cands[i][0], float(own[i])) for i in rank_captions(cands, own)]
    return ranked


def capfilt_targets(backbone, examples: list[Example], *, num_candidates: int = 10, keep: int = 2,
                    ranker: CaptionRanker | None = None, batch_size: int = 8, max_new_tokens: int = 30,
                    top_p: float = 0.9, seed: int = 0, progress: bool = True) -> tuple[list[Example], dict]:
    """CapFilt pseudo-labels: up to `keep` distinct captions per input image, the ranker's best of
    `num_candidates` samples (an image whose samples are all empty gets none).

    Returns the new examples and, per image key, its distinct candidates with their scores, best first.
    """
    ranker = ranker or LikelihoodRanker()
    samples = sample_captions(backbone, examples, num_candidates=num_candidates, top_p=top_p, seed=seed,
                              batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    ranked = rank_samples(backbone, examples, samples, ranker, batch_size)
    kept = [replace(e, target=text) for e in examples for text, _ in ranked.get(e.key, [])[:keep]]
    return kept, ranked
