"""Table 9: unsupervised exits (no stage 1, §4) from knowledge distillation vs CapFilt pseudo-labels (ranked by the
configured ranker, the tiny CLIP by default), each at its dev-chosen alpha and at Table 10's alpha, with the
precision of the labels CapFilt kept."""

from __future__ import annotations

from freevlm.backbones import load_backbone
from freevlm.baselines import METHODS
from freevlm.data.synthetic import load_synthetic_captions, load_synthetic_nocaps
from freevlm.demo import DEFAULT_ALPHA
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.reproduce.seed import prompt_examples, unique_keys
from freevlm.reproduce.tables.base import Report, Table, markdown_table, ms, section
from freevlm.reproduce.tables.rankers import top_precision
from freevlm.reproduce.tables.table1 import DOMAINS
from freevlm.train.pseudo import capfilt_targets, greedy_targets

RANKER_NAMES = {"tiny-clip": "embedded default's tiny CLIP", "likelihood": "backbone's likelihood",
                "random": "random ranker"}


def measure(run, core) -> dict:
    """Table 9: unsupervised FREE from KD positions vs CapFilt pseudo-labels (no stage 1, §4)."""
    bb = load_backbone(run.pretrained)
    unique = unique_keys(prompt_examples(run.train))
    out = {}
    kd_examples = greedy_targets(bb, unique, progress=run.progress)
    cap_examples, ranked = capfilt_targets(bb, unique[: run.cfg.capfilt_images], ranker=run.ranker(), seed=run.seed,
                                           progress=run.progress)
    objects = {s.image_id: s.extra["objects"] for s in load_synthetic_captions(run.data_root, "val")}
    out["capfilt_top2_precision"] = {**top_precision(ranked, objects), "ranker": run.cfg.capfilt_ranker}
    for name, variant, examples in (("KD", "kd", kd_examples), ("CapFilt", "capfilt", cap_examples)):
        exits = run.exits_for(bb, variant, examples, f"unsup-{variant}")
        vlm = EarlyExitVLM(bb, exits)
        chosen, curve = run.choose(vlm, METHODS["FREE"])
        row = run.test_row(vlm, DecodeOptions(threshold=chosen), official=False)
        nocaps = {}
        for domain in DOMAINS:
            samples = load_synthetic_nocaps(run.data_root, domain)[: run.cfg.nocaps_images]
            r = run.captions(vlm, samples, DecodeOptions(threshold=chosen))
            nocaps[domain] = {"CIDEr": r.metrics["CIDEr"], "speed": r.speed}
        # The dev choice is often alpha = 1 (no exit) for both, which would make the comparison vacuous: score
        # both at Table 10's alpha as well.
        fixed = run.test_row(vlm, DecodeOptions(threshold=DEFAULT_ALPHA), official=False)
        out[name] = {**row, "setting": chosen, "nocaps": nocaps, "at_table10_alpha": fixed}
    return out


def render(report: Report) -> list[str]:
    if not report.has("unsupervised"):
        return []
    col, runs = report.col, report.runs
    rows = []
    for name in ("KD", "CapFilt"):
        p = ["unsupervised", name]
        chosen = "/".join(str(r["unsupervised"][name]["setting"]) for r in runs)
        rows.append([f"{name}, α chosen on dev ({chosen})", *[col(p + ["nocaps", d, "CIDEr"]) for d in DOMAINS],
                     col(p + ["metrics", "CIDEr"]), col(p + ["speed", "parameter_speedup"], 1, 2),
                     col(p + ["speed", "compute_speedup"], 1, 2), col(p + ["wall_clock_vs_full_depth"], 1, 2)])
    for name in ("KD", "CapFilt"):
        p = ["unsupervised", name, "at_table10_alpha"]
        rows.append([f"{name}, α = {DEFAULT_ALPHA} (Table 10)", "-", "-", "-", col(p + ["metrics", "CIDEr"]),
                     col(p + ["speed", "parameter_speedup"], 1, 2), col(p + ["speed", "compute_speedup"], 1, 2),
                     col(p + ["wall_clock_vs_full_depth"], 1, 2)])
    prec = [r["unsupervised"]["capfilt_top2_precision"] for r in runs]
    top, rnd, best = (ms([p[k] for p in prec], 100) for k in ("top2", "random2", "oracle2"))
    ranker = RANKER_NAMES.get(report.cfg.capfilt_ranker, report.cfg.capfilt_ranker)
    return section("Table 9 — unsupervised exits: knowledge distillation vs CapFilt pseudo-labels",
                   "No stage 1 (§4). In-process CIDEr on the NoCaps-style domains and the test split.",
                   markdown_table(["labels", *DOMAINS, "test CIDEr", "param", "compute", "wall"], rows),
                   f"CapFilt: 10 nucleus samples (top-p 0.9) per train image, ranked by the {ranker}, the top 2 "
                   f"distinct ones kept as labels. Their precision on these {prec[0]['images']} images: "
                   f"{top}% vs a random pick of 2 {rnd}% and the best possible pick {best}% (captions judged against "
                   "the true attributes; the rankers table above compares the rankers on the dev split).")


TABLE = Table(render, measure, key=("unsupervised",), when=lambda cfg, full: cfg.unsupervised)
