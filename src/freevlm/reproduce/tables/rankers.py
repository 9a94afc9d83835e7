"""CapFilt's rankers measured (§3.4): each ranks the same 10 nucleus samples (top-p 0.9) per development image from
the pretrained backbone (the model CapFilt labels with: no stage 1); the top 2 are judged against the image's true
objects (`caption_is_correct`). Beside them: a random pick of 2 (its expected precision), the best possible pick
(an oracle that knows the truth), and how often each ranker puts a true caption above a wrong one."""

from __future__ import annotations

import random
import statistics

import torch

from freevlm.backbones import load_backbone
from freevlm.data.splits import split_by_image
from freevlm.data.synthetic import SyntheticConfig, caption_is_correct, load_synthetic_captions, wrong_captions
from freevlm.rankers import LikelihoodRanker
from freevlm.reproduce.seed import TINY_CLIP, prompt_examples
from freevlm.reproduce.tables.base import Report, Table, markdown_table, ms, section
from freevlm.train.batches import Example
from freevlm.train.pseudo import rank_samples, sample_captions

KEEP = 2  # §3.4: the top 2 of 10 become labels
RANKED = ("likelihood", "CLIP")  # the rankers run on the samples; "random" and "oracle" are computed


def top_precision(ranked: dict[str, list[tuple[str, float]]], objects: dict[str, list[dict]],
                  keep: int = KEEP) -> dict:
    """Precision of the kept captions (the best `keep` distinct ones per image) against the true objects, pooled
    over images, with what a random pick of as many (expected) and an oracle pick would reach on the same
    candidates. An image with fewer distinct candidates than `keep` keeps them all."""
    kept = top = rnd = best = images_with_correct = 0
    for key, cands in ranked.items():
        correct = [caption_is_correct(text, objects[key]) for text, _ in cands]
        k = min(keep, len(correct))
        kept += k
        top += sum(correct[:k])
        rnd += k * sum(correct) / len(correct)
        best += min(k, sum(correct))
        images_with_correct += any(correct)
    n = max(kept, 1)
    return {"top2": top / n, "random2": rnd / n, "oracle2": best / n, "kept": kept, "images": len(ranked),
            "images_with_a_correct_sample": images_with_correct / max(len(ranked), 1)}


def pairwise(rankers: dict, backbone, samples, data: SyntheticConfig, seed: int = 0) -> dict:
    """Per ranker: the share of `samples` (synthetic images) whose true (first reference) caption scores above a near
    miss (one attribute or object changed), and above another image's caption (one that is wrong for this image)."""
    rng = random.Random(f"rankers-pairwise:{seed}")
    cands, has_other = [], []
    for i, s in enumerate(samples):
        objects = s.extra["objects"]
        other = next((o.captions[0] for o in samples[i + 1 :] + samples[:i]
                      if not caption_is_correct(o.captions[0], objects)), None)
        near = wrong_captions(objects, rng, data)[0]
        for text in (s.captions[0], near, other or near):
            cands.append(Example(s.image_id, s.image_path, "", text))
        has_other.append(other is not None)
    mask = torch.tensor(has_other, dtype=torch.bool)
    out = {}
    for name, ranker in rankers.items():
        scores = ranker(backbone, cands).view(-1, 3)
        out[name] = {"true_over_near_miss": float((scores[:, 0] > scores[:, 1]).float().mean()),
                     "true_over_other_image": float((scores[:, 0] > scores[:, 2])[mask].float().mean())}
    return out


def measure(run, core) -> dict:
    bb = load_backbone(run.pretrained)
    dev = split_by_image(load_synthetic_captions(run.data_root, "val"), run.seed)[1][: run.cfg.ranker_images]
    examples = prompt_examples(dev)
    samples = sample_captions(bb, examples, seed=run.seed, progress=run.progress)
    objects = {s.image_id: s.extra["objects"] for s in dev}
    rankers = {"likelihood": LikelihoodRanker(), "CLIP": run.ranker(TINY_CLIP)}
    out = {"samples": [{"key": e.key, "samples": t} for e, t in zip(examples, samples)]}
    for name, ranker in rankers.items():
        out[name] = top_precision(rank_samples(bb, examples, samples, ranker), objects)
    out["pairwise"] = pairwise(rankers, bb, dev, run.cfg.default.data, run.seed)
    return out


def render(report: Report) -> list[str]:
    if not report.has("capfilt_rankers"):
        return []
    runs = [r["capfilt_rankers"] for r in report.runs]

    def pct(name, key):
        return ms([r[name][key] for r in runs], 100)

    def ratio(name, key="top2"):  # x the random pick's precision, per seed ("-" where no sample was correct)
        if not all(r[name]["random2"] for r in runs):
            return "-"
        return ms([r[name][key] / r[name]["random2"] for r in runs], 1, 2)

    first = RANKED[0]
    rows = [["random pick of 2 (expected)", pct(first, "random2"), "1.00", "50 (chance)", "50 (chance)"]]
    for name in RANKED:
        label = {"likelihood": "backbone likelihood", "CLIP": "tiny CLIP (contrastive, embedded default)"}[name]
        rows.append([label, pct(name, "top2"), ratio(name),
                     ms([r["pairwise"][name]["true_over_near_miss"] for r in runs], 100),
                     ms([r["pairwise"][name]["true_over_other_image"] for r in runs], 100)])
    rows.append(["oracle (best possible pick of 2)", pct(first, "oracle2"), ratio(first, "oracle2"), "-", "-"])
    images = statistics.mean(r[first]["images"] for r in runs)
    kept = statistics.mean(r[first]["kept"] / max(r[first]["images"], 1) for r in runs)
    return section("CapFilt rankers — top-2 precision on the development split",
                   f"{images:.0f} dev images per seed, 10 nucleus samples each (top-p 0.9) from the pretrained "
                   f"backbone; duplicates count once ({kept:.2f} captions kept per image on average); "
                   f"{pct(first, 'images_with_a_correct_sample')}% of images have at least one correct sample. "
                   "Precision: share of the kept top-2 captions that state exactly the image's objects. The last two "
                   "columns: share of dev images whose first reference caption scores above a near miss (one "
                   "attribute or object changed) / above another image's caption.",
                   markdown_table(["ranker", "top-2 precision %", "× random", "true > near miss %",
                                   "true > other image's %"], rows))


TABLE = Table(render, measure, key=("capfilt_rankers",), when=lambda cfg, full: cfg.unsupervised)
