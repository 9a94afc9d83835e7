"""Paired bootstrap intervals of a quality difference between two decodes of the same images.

A CIDEr difference of a few points between two decoding modes on a few hundred synthetic images can be noise; every
quality figure on the real VLM carries the 95% interval of its difference to full depth.

CIDEr is a corpus metric only through its IDF (document frequencies of the references); given the IDF it is the mean
of per-image scores. Here the IDF comes from the whole evaluated split's references and stays fixed while images are
resampled, so a resample's CIDEr difference is the mean of its per-image differences (the usual paired bootstrap for
captioning; recomputing the IDF per resample would also move both sides' scale). Per-image CIDEr uses
`simple_tokenize`, identical to PTB tokenisation on lower-case text without punctuation (the synthetic captions).
VQA accuracy is a mean of per-question scores already.

Hand-written (a few lines of numpy): scipy.stats.bootstrap would bring scipy for one call, and its `paired` form
resamples the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from freevlm.eval.captioning import _check_inputs, _require_some_reference_words, simple_tokenize

RESAMPLES = 2000
LEVEL = 0.95


def per_image_cider(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Each image's CIDEr-D (pycocoevalcap's scorer, IDF from all of `references`); their mean is the corpus CIDEr
    that `fast_caption_metrics` reports."""
    from pycocoevalcap.cider.cider import Cider

    ids = _check_inputs(predictions, references)
    gts = {i: [simple_tokenize(r) for r in references[i]] for i in ids}
    res = {i: [simple_tokenize(predictions[i])] for i in ids}
    _require_some_reference_words(gts)
    _, scores = Cider().compute_score(gts, res)
    return {i: float(s) for i, s in zip(gts, scores)}


def paired_bootstrap(a: Mapping, b: Mapping, *, resamples: int = RESAMPLES, level: float = LEVEL,
                     seed: int = 0, scale: float = 1.0) -> dict[str, float]:
    """Mean of b - a over the shared keys, with its percentile bootstrap interval: images resampled with replacement,
    the same draw for both sides. `scale` multiplies every figure (100 for the paper's x100 tables)."""
    keys = sorted(set(a) & set(b), key=str)
    if not keys:
        raise ValueError("paired_bootstrap needs scores of the same items on both sides")
    if set(a) != set(b):
        raise ValueError(f"paired_bootstrap: {len(set(a) ^ set(b))} items are scored on one side only")
    diff = scale * (np.array([b[k] for k in keys], dtype=np.float64) - np.array([a[k] for k in keys],
                                                                                   dtype=np.float64))
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"difference": float(diff.mean()), "low": float(low), "high": float(high), "level": level,
            "items": len(keys), "resamples": resamples}


def cider_difference(full: Mapping[str, str], other: Mapping[str, str], references: Mapping[str, Sequence[str]],
                     **kw) -> dict[str, float]:
    """x100 CIDEr of `other` minus `full` (predictions by image id) with its paired-bootstrap interval."""
    return paired_bootstrap(per_image_cider(full, references), per_image_cider(other, references), scale=100, **kw)


def format_interval(d: Mapping[str, float]) -> str:
    """"-1.23 [-2.50, +0.10]": the difference and its interval."""
    return f"{d['difference']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
