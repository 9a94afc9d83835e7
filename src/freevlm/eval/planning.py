"""`freevlm plan`: choose the exits to check, the threshold, the gates and the speculative draft setting on the
development split, from the cost model measured here; then check the plan on the test split.

The search itself (candidate prediction) is `planning/plan.py`; this module feeds it data: teacher-forced
statistics, gates trained on the training split, real decodes of the development split for quality, and the
verification on test (predicted vs measured tokens/s, quality drop).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from freevlm.errors import FreeVLMError
from freevlm.eval.bootstrap import paired_bootstrap, per_image_cider
from freevlm.eval.efficiency import measure_throughput
from freevlm.eval.evaluate import PAPER_THRESHOLDS, evaluate_captions, evaluate_vqa
from freevlm.generation.api import DecodeOptions
from freevlm.generation.vocab import RANKING_FILE, HeadSubset, rank_tokens, save_token_ranking
from freevlm.planning.costs import MeasuredCosts, measure_costs, predict_seconds
from freevlm.planning.gates import (
    evaluate_gates,
    exit_statistics,
    exits_fingerprint,
    gate_features,
    gate_hidden_size,
    save_gates,
    train_gates,
)
from freevlm.planning.plan import PLAN_FORMAT, full_depth_seconds, predict_candidates, shortlist
from freevlm.train.batches import CAPTION_PROMPT, VQA_TEMPLATE, Example, caption_examples, vqa_examples

QUALITY_BOUNDS = ("bootstrap", "point")


def _scored(vlm, task: str, samples, options: DecodeOptions, batch_size: int,
            progress: bool) -> tuple[float, dict]:
    """Quality x100 (in-process CIDEr for captions, VQA accuracy otherwise) and each item's score, for the paired
    bootstrap (`eval/bootstrap.py`)."""
    if task == "caption":
        r = evaluate_captions(vlm, samples, options, official=False, batch_size=batch_size, progress=progress)
    else:
        r = evaluate_vqa(vlm, samples, options, metric=task, batch_size=batch_size, progress=progress)
    return scored_result(task, samples, r)


def scored_result(task: str, samples, result) -> tuple[float, dict]:
    """`_scored`'s (quality x100, per-item scores) of an evaluation already run on `samples` (in-process metrics)."""
    if task == "caption":
        items = per_image_cider({p["key"]: p["prediction"] for p in result.predictions},
                                {s.image_id: s.captions for s in samples})
        return 100 * result.metrics["CIDEr"], items
    return 100 * result.metrics["accuracy"], {p["key"]: p["accuracy"] for p in result.predictions}


def _quality(vlm, task: str, samples, options: DecodeOptions, batch_size: int, progress: bool) -> float:
    return _scored(vlm, task, samples, options, batch_size, progress)[0]


def drop_bound(full_items: dict, items: dict, how: str, seed: int = 0) -> tuple[float, dict | None]:
    """The quality drop that the plan's bound is checked against: the point estimate ("point"), or the upper end of
    the paired-bootstrap 95% interval of the drop ("bootstrap": a candidate passes only if the data rule out a larger
    loss, so a plan that passes on dev holds on test more often)."""
    if how == "point":
        return 100 * (sum(full_items.values()) - sum(items.values())) / max(len(items), 1), None
    interval = paired_bootstrap(full_items, items, scale=100, seed=seed)
    return -interval["low"], interval


def _prompts(task: str, samples) -> list[Example]:
    if task == "caption":
        return [Example(s.image_id, s.image_path, CAPTION_PROMPT, None) for s in samples]
    return [Example(s.question_id, s.image_path, VQA_TEMPLATE.format(s.question), None) for s in samples]


def _forced(task: str, samples) -> list[Example]:
    return caption_examples(samples, every_caption=False) if task == "caption" else vqa_examples(samples)


def train_token_ranking(backbone, task: str, samples) -> torch.Tensor:
    """The vocabulary ranked by token counts in the training split's targets (every reference caption, or answer)."""
    tokenizer = backbone.processor.tokenizer
    examples = caption_examples(samples) if task == "caption" else vqa_examples(samples)
    sequences = [tokenizer(ex.target, add_special_tokens=False).input_ids for ex in examples if ex.target]
    return rank_tokens(sequences, backbone.lm.vocab_size)


def default_costs(vlm, samples, task: str) -> MeasuredCosts:
    """The cost model at batch 1, with the per-call cost of one real image."""
    first = _prompts(task, samples[:1])[0]
    return measure_costs(vlm, call=lambda: vlm.generate([first.image_path], [first.prompt], mode="full",
                                                         max_new_tokens=1, tokenizer_decode=False))


def make_plan(vlm, task: str, train_samples, dev_samples, out: Path, *, costs: MeasuredCosts | None = None,
              max_quality_drop: float = 1.0, thresholds=PAPER_THRESHOLDS, max_exits: int = 3, candidates: int = 8,
              kv_policies: tuple[str, ...] = ("propagate", "catch_up"), draft_lengths=(2, 4, 8),
              draft_thresholds=(0.5,), spec_images: int = 16, head_subsets=(),
              max_new_tokens: int = 30, batch_size: int = 32, gates_dir: str = "gates",
              quality_bound: str = "bootstrap", full_dev: tuple[float, dict] | None = None,
              progress: bool = True) -> dict:
    """The plan (see `planning/plan.py`) as a JSON-ready dict; gates are saved under `out/<gates_dir>/` (a folder
    of this run's own, so that the gates of a plan already in `out` stay untouched until plan.json is replaced).

    A candidate is kept when its dev quality drop is at most `max_quality_drop`: by default the upper end of the
    drop's paired-bootstrap 95% interval (`quality_bound="bootstrap"`), or its point estimate (`"point"`).
    `head_subsets`: vocabulary subset sizes tried for exit checks and drafts besides the full head (`vocab.py`); the
    ranking comes from the training split's targets and is saved as `out/token_ranking.json`.
    `full_dev`: full depth's dev quality and per-item scores (`scored_result`) when the caller already decoded
    `dev_samples` at full depth (the demo's alpha sweep at alpha = 1), so that decode is not repeated."""
    if quality_bound not in QUALITY_BOUNDS:
        raise FreeVLMError(f"unknown quality bound {quality_bound!r}; expected one of {', '.join(QUALITY_BOUNDS)}")
    start = time.perf_counter()
    bb, exits = vlm.backbone, vlm.exits
    lm = bb.lm
    n = lm.num_layers
    layers = list(exits.layers)
    if task != "caption":
        max_new_tokens = min(max_new_tokens, 10)
    costs = costs or default_costs(vlm, dev_samples, task)
    # 1. teacher-forced statistics; gates per threshold on the training split, reported on dev
    subsets, ranking_folder = [], None
    if head_subsets:
        from freevlm.generation.decode import DecodeSettings

        ranking = train_token_ranking(bb, task, train_samples)
        save_token_ranking(out, ranking, source="freevlm plan: training split targets")
        ranking_folder = str(Path(out))
        eos = DecodeSettings.from_kwargs(bb.model.generation_config, lm.config).eos_token_id
        subsets = list({sub.size: sub for sub in (HeadSubset.top(ranking, int(k), eos, lm.vocab_size)
                                                   for k in head_subsets)}.values())
    train_f = gate_features(bb, exits, _forced(task, train_samples), layers)
    dev_stats = exit_statistics(bb, exits, _forced(task, dev_samples), layers, subsets)
    dev_f = dev_stats[None]
    layer_params = sum(p.numel() for p in lm.layers[0].parameters())
    inner = gate_hidden_size(lm.hidden_size, layer_params)
    alphas = [float(a) for a in thresholds if a < 1.0]  # alpha = 1 never exits: that is full depth
    gate_open, gate_reports, gate_dirs = {}, {}, {}
    fingerprint = exits_fingerprint(exits)
    for alpha in alphas:
        gates = train_gates(train_f, alpha, lm.hidden_size, inner)
        gate_reports[alpha] = evaluate_gates(gates, dev_f, alpha).to_json()
        with torch.no_grad():
            gate_open[alpha] = {layer: torch.sigmoid(gates(layer, dev_f[layer][0])) > 0.5 for layer in layers}
        folder = Path(out) / gates_dir / f"alpha-{alpha:g}"
        save_gates(folder, gates, {"alpha": alpha, "exits_fingerprint": fingerprint,
                                   "parameters_per_gate": gates.parameters_per_gate(),
                                   "layer_parameters": layer_params})
        gate_dirs[alpha] = folder
    # 2. predictions for every candidate
    transformer = exits.spec.kind == "transformer"
    heads = [(None, 1.0)] + [(sub.size, sub.fraction) for sub in subsets]
    cands = [c for policy in kv_policies for size, share in heads
             for c in predict_candidates(dev_stats[size], gate_open, costs, n, alphas, max_exits, policy, transformer,
                                         size, share)]
    full_seconds = full_depth_seconds(costs, n)
    faster = [c for c in cands if c.seconds_per_token < full_seconds]
    # 3. real decodes of dev, fastest first, until one keeps quality within the bound
    base = DecodeOptions(max_new_tokens=max_new_tokens)
    if full_dev is None:
        full_dev = _scored(vlm, task, dev_samples, DecodeOptions(mode="full", max_new_tokens=max_new_tokens),
                           batch_size, progress)
    full_quality, full_items = full_dev
    tried, chosen = [], None
    bar = tqdm(total=candidates, desc="plan: dev decodes", disable=not progress, leave=False)
    failed_agreement = dict.fromkeys(kv_policies, -1.0)
    for c in shortlist(faster, len(faster)):
        if len(tried) >= candidates:
            break
        # quality falls as agreement with the final layer falls: after a candidate misses the bound, only
        # candidates that agree more are worth a decode (per KV policy: approximate caches lose quality of their
        # own, which agreement on teacher-forced states does not see)
        if c.agreement <= failed_agreement[c.kv_policy]:
            continue
        bar.update()
        opts = DecodeOptions(**{**asdict(base), "threshold": c.threshold, "exit_layers": list(c.exits),
                                "kv_policy": c.kv_policy, "head_subset": c.head_subset,
                                "token_ranking": ranking_folder if c.head_subset is not None else None,
                                "gates": str(gate_dirs[c.threshold]) if c.gated else None})
        quality, items = _scored(vlm, task, dev_samples, opts, batch_size, False)
        bound, interval = drop_bound(full_items, items, quality_bound)
        tried.append({"exits": list(c.exits), "threshold": c.threshold, "gated": c.gated, "kv_policy": c.kv_policy,
                      "head_subset": c.head_subset,
                      "predicted_seconds_per_token": c.seconds_per_token,
                      "predicted_speedup": full_seconds / c.seconds_per_token, "agreement": c.agreement,
                      "dev_quality": quality, "quality_drop": full_quality - quality,
                      "quality_drop_bound": bound, "quality_interval": interval})
        if bound <= max_quality_drop:
            chosen = tried[-1]
            break
        failed_agreement[c.kv_policy] = max(failed_agreement[c.kv_policy], c.agreement)
    bar.close()
    early_exit = {"exits": [], "threshold": 1.0, "gated": False, "gates": None, "kv_policy": "propagate",
                  "predicted_speedup": 1.0, "dev_quality": full_quality, "quality_drop": 0.0}
    if chosen is not None:
        early_exit = {**chosen, "gate_threshold": 0.5,
                      "gates": str(gate_dirs[chosen["threshold"]].relative_to(out)) if chosen["gated"] else None}
    # 4. speculative: decode a dev subset per draft setting (the drafting exits' layers: `vlm.draft_exits` when
    # given, else the exits); the cost model predicts each one's speed
    drafting = vlm.drafting_exits
    spec_rows = _speculative_settings(vlm, task, dev_samples[:spec_images], list(drafting.layers), draft_lengths,
                                      draft_thresholds, costs, max_new_tokens, progress, [size for size, _ in heads],
                                      ranking_folder) if drafting.spec.kind == "transformer" else []
    speculative = max(spec_rows, key=lambda r: r["predicted_tokens_per_second"]) if spec_rows else None
    separate = vlm.draft_exits is not None
    return {"format": PLAN_FORMAT, "gates_root": gates_dir, "task": task,
            "quality_metric": "CIDEr" if task == "caption" else "accuracy",
            "exits_fingerprint": fingerprint, "exit_layers": layers, "num_layers": n,
            "draft_exits_fingerprint": exits_fingerprint(drafting) if separate else None,
            "draft_exit_layers": list(drafting.layers) if separate else None,
            "max_quality_drop": max_quality_drop, "quality_bound": quality_bound, "dev_quality_full": full_quality,
            "early_exit": early_exit, "speculative": speculative, "evaluated": tried,
            "token_ranking": RANKING_FILE if subsets else None, "head_subsets": [sub.size for sub in subsets],
            "speculative_settings": spec_rows, "candidates_predicted": len(cands),
            "full_depth_seconds_per_token": full_seconds,
            "gate_reports": {str(a): r for a, r in gate_reports.items()}, "gate_parameters": inner,
            "costs": costs.to_json(), "seconds": time.perf_counter() - start}


def check_plan(plan: dict, exits, draft_exits=None) -> None:
    """Refuse a plan made for other exits (its exit subset, gates and draft layer would not mean the same), or for
    separate drafting exits that are not given (or are others)."""
    if exits is None:
        raise FreeVLMError("a plan configures exits: give the exits it was made for (--exits)")
    _check_fingerprint(plan.get("exits_fingerprint"), plan.get("exit_layers"), exits, "exits", "--exits")
    want = plan.get("draft_exits_fingerprint")
    if want is not None and draft_exits is None:
        raise FreeVLMError(f"the plan drafts with separate exits (layers {plan.get('draft_exit_layers')}): give them "
                           "with --draft-exits")
    if want is None and draft_exits is not None:
        raise FreeVLMError("the plan was made without separate drafting exits: run `freevlm plan` with "
                           "--draft-exits to plan drafting with them")
    if want is not None:
        _check_fingerprint(want, plan.get("draft_exit_layers"), draft_exits, "drafting exits", "--draft-exits")


def _check_fingerprint(want, made_for, exits, what_exits: str, flag: str) -> None:
    have = exits_fingerprint(exits) if want is not None else None
    if want is not None and want != have:
        layers = list(exits.layers)
        if made_for == layers:  # same layers, other weights (retrained, or another run's exits)
            what = f"{what_exits} at the same layers {layers} but with other weights (fingerprint {want}, these {have})"
        else:
            what = f"{what_exits} at layers {made_for}; these are at layers {layers}"
        raise FreeVLMError(f"the plan was made for other {what_exits}: {what}; run `freevlm plan` on these "
                           f"({flag})")


def _speculative_settings(vlm, task, samples, layers, lengths, thresholds, costs, max_new_tokens, progress,
                          head_subsets=(None,), ranking_folder=None):
    rows = []
    examples = _prompts(task, samples)
    grid = [(e, k, None) for e in layers for k in lengths] + [(e, max(lengths), t) for e in layers for t in thresholds]
    grid = [(e, k, t, size) for e, k, t in grid for size in head_subsets]
    for e, k, t, size in tqdm(grid, desc="plan: draft settings", disable=not progress, leave=False):
        opts = DecodeOptions(mode="speculative", draft_layer=e, draft_length=k, draft_threshold=t,
                             max_new_tokens=max_new_tokens, head_subset=size,
                             token_ranking=ranking_folder if size is not None else None)
        tokens = seconds = 0.0
        accepted = drafted = 0
        for ex in examples:
            res = vlm.generate([ex.image_path], [ex.prompt], opts, tokenizer_decode=False)
            tokens += res.num_tokens
            seconds += predict_seconds(res, costs, e)
            accepted += res.speculative.accepted
            drafted += res.speculative.drafted
        rows.append({"draft_layer": e, "draft_length": k, "draft_threshold": t, "head_subset": size,
                     "acceptance_rate": accepted / drafted if drafted else 0.0,
                     "predicted_tokens_per_second": tokens / seconds if seconds else 0.0})
    return rows


def verify_plan(vlm, plan: dict, task: str, samples, *, speed_images: int = 16, repeats: int = 3,
                batch_size: int = 32, plan_folder: Path | None = None, progress: bool = True) -> dict:
    """On the test split: the plan's quality drop, and its predicted vs measured tokens/s (batch 1, interleaved)."""
    from freevlm.planning.plan import apply_plan

    costs = MeasuredCosts.from_json(plan["costs"])
    max_new = 30 if task == "caption" else 10
    paths = {"full_depth": DecodeOptions(mode="full", max_new_tokens=max_new)}
    resolved = dict(plan)
    if plan_folder is not None and plan["early_exit"].get("gates"):
        resolved["early_exit"] = {**plan["early_exit"], "gates": str(Path(plan_folder) / plan["early_exit"]["gates"])}
    if plan_folder is not None and plan.get("token_ranking"):
        resolved["token_ranking"] = str(Path(plan_folder) / plan["token_ranking"])
    ee = apply_plan(DecodeOptions(max_new_tokens=max_new), resolved)
    if ee.mode == "early_exit":
        paths["early_exit_plan"] = ee
    if plan.get("speculative"):
        paths["speculative_plan"] = apply_plan(DecodeOptions(mode="speculative", max_new_tokens=max_new), resolved)
    scored = {name: _scored(vlm, task, samples, opts, batch_size, progress) for name, opts in paths.items()}
    quality = {name: q for name, (q, _) in scored.items()}
    intervals = {name: paired_bootstrap(scored["full_depth"][1], items, scale=100)
                 for name, (_, items) in scored.items() if name != "full_depth"}
    examples = _prompts(task, samples[:speed_images])
    predicted = {}
    for name, opts in paths.items():
        tokens = seconds = 0.0
        for ex in examples:
            res = vlm.generate([ex.image_path], [ex.prompt], opts, tokenizer_decode=False)
            tokens += res.num_tokens
            seconds += predict_seconds(res, costs, opts.draft_layer)
        predicted[name] = tokens / seconds if seconds else 0.0

    def item(ex, opts):
        return lambda: vlm.generate([ex.image_path], [ex.prompt], opts, tokenizer_decode=False).num_tokens

    def hf(ex):
        from freevlm.data.images import load_image
        from freevlm.train.batches import encode_prompts

        enc = encode_prompts(vlm.backbone, [load_image(ex.image_path)], [ex.prompt])
        eos = vlm.backbone.lm.config.eos_token_id

        def fn():
            out = vlm.backbone.hf_generate(max_new_tokens=max_new, do_sample=False, **enc)
            gen = out[:, 1:] if vlm.backbone.lm.is_encoder_decoder else out[:, enc["input_ids"].shape[1]:]
            row = gen[0].tolist()
            return next((i + 1 for i, t in enumerate(row) if t == eos), len(row))

        return fn

    runs = {name: [item(ex, opts) for ex in examples] for name, opts in paths.items()}
    runs["hf_generate"] = [hf(ex) for ex in examples]
    with torch.no_grad():
        timing = measure_throughput(runs, repeats=repeats)
    measured = {k: v["tokens_per_second"] for k, v in timing.items()}
    out = {"quality": quality, "quality_drop": {k: quality["full_depth"] - v for k, v in quality.items()},
           "within_bound": {k: quality["full_depth"] - v <= plan["max_quality_drop"] for k, v in quality.items()},
           "quality_interval": intervals,
           "predicted_tokens_per_second": predicted, "measured_tokens_per_second": measured,
           "prediction_error": {k: predicted[k] / measured[k] - 1 for k in predicted},
           "vs_full_depth": {k: measured[k] / measured["full_depth"] for k in measured},
           "vs_hf_generate": {k: measured[k] / measured["hf_generate"] for k in measured},
           "speed_images": len(examples)}
    return out
