"""`freevlm sweep`: quality and speedups per early-exit threshold, or acceptance and tokens/s per speculative draft
setting."""

from __future__ import annotations

from pathlib import Path

from freevlm import validate as check
from freevlm.commands.common import (
    check_inputs,
    check_plan_task,
    check_references,
    decode_options,
    load_samples,
    load_vlm,
    plan_conflicts,
    read_plan_for,
)
from freevlm.errors import FreeVLMError
from freevlm.eval.evaluate import PAPER_THRESHOLDS, evaluate_captions, evaluate_vqa
from freevlm.eval.report import markdown_table
from freevlm.generation.api import DecodeOptions
from freevlm.outputs import claim_output, staged_results, write_json
from freevlm.train.batches import CAPTION_PROMPT


def sweep(
    backbone: Path, exits: Path, out: Path, dataset: str = "synthetic", data: Path | None = None,
    images: Path | None = None, questions: Path | None = None, split: str = "val", mode: str = "early_exit",
    thresholds: list[float] | None = None, criterion: str = "confidence", kv_policy: str | None = None,
    draft_layers: list[int] | None = None, draft_lengths: list[int] | None = None,
    draft_thresholds: list[float] | None = None, plan: Path | None = None, speed_images: int = 16,
    max_new_tokens: int = 30, batch_size: int = 16, limit: int | None = None, overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Early exit: quality and speedups per threshold (default alpha in {0.5, ..., 1.0}) -> sweep.json + sweep.png.
    Speculative: acceptance and measured tokens/s per draft setting; the fastest is recorded -> speculative.json.

    backbone: transformers checkpoint folder
    exits: exit checkpoint folder
    out: output folder
    dataset: dataset format
    data: dataset root (synthetic) or annotation file
    images: image folder (real datasets)
    questions: questions file
    split: split to sweep on (the development split, to choose alpha or the draft setting)
    mode: early_exit (sweep thresholds) | speculative (sweep draft settings)
    thresholds: early exit: criterion settings to try
    criterion: early exit: confidence | entropy | patience | similarity
    kv_policy: early exit: propagate | copy | catch_up (default propagate; with --plan, the plan's)
    draft_layers: speculative: drafting exits to try (default: every exit)
    draft_lengths: speculative: fixed draft lengths to try (default: 2 4 8)
    draft_thresholds: speculative: adaptive settings to try (draft while confidence >= t, at most the longest length)
    plan: a plan.json from `freevlm plan`: early exit sweeps alpha over the plan's exits, KV policy and gates (the
        gates trained for each alpha); speculative tries the plan's draft layer unless --draft-layers is given
    speed_images: speculative: images timed per setting (batch 1, interleaved, median of 3)
    max_new_tokens: generation length limit
    batch_size: images per generate call
    limit: use only the first N samples
    overwrite: replace the results already in `out` (kept until the new ones are written)
    progress: show progress bars
    """
    check.dataset_name(dataset)
    check.choice("mode", mode, ("early_exit", "speculative"))
    if mode == "early_exit":
        plan_conflicts(plan, "sweep", criterion, kv_policy=kv_policy)
    kv_policy = kv_policy or "propagate"
    settings = list(thresholds or PAPER_THRESHOLDS)
    check.decoding(criterion, settings, kv_policy, 1, max_new_tokens, threshold_name="thresholds")
    for name, values in (("draft_layers", draft_layers), ("draft_lengths", draft_lengths)):
        for v in values or []:
            check.positive_int(name, v)
    for t in draft_thresholds or []:
        check.number("draft_thresholds", t, 0.0, 1.0)
    check.positive_int("speed_images", speed_images)
    check.positive_int("batch_size", batch_size)
    check.optional(check.positive_int, "limit", limit)
    check_inputs(backbone, exits)
    plan_ = read_plan_for(plan, exits)
    if plan_ is not None and mode == "early_exit" and not plan_["early_exit"].get("exits"):
        raise FreeVLMError(f"the plan {plan} keeps no exit (full depth met no quality bound): nothing to sweep")
    if plan_ is not None and mode == "speculative" and draft_layers is None and plan_.get("speculative"):
        draft_layers = [plan_["speculative"]["draft_layer"]]
    results = ("speculative.json",) if mode == "speculative" else ("sweep.json", "sweep.png")
    with claim_output(out, results=results, overwrite=overwrite):
        if mode == "speculative":
            _sweep_speculative(backbone, exits, out, dataset, data, images, questions, split, draft_layers,
                               draft_lengths or [2, 4, 8], draft_thresholds or [], speed_images, max_new_tokens,
                               batch_size, limit, progress, plan_)
        else:
            _sweep(backbone, exits, out, dataset, data, images, questions, split, settings, criterion, kv_policy,
                   max_new_tokens, batch_size, limit, progress, plan_)


def _sweep(backbone, exits, out, dataset, data, images, questions, split, settings, criterion, kv_policy,
           max_new_tokens, batch_size, limit, progress, plan=None) -> None:
    from dataclasses import replace

    from freevlm.eval.plots import plot_sweep
    from freevlm.planning.plan import plan_gates

    task, samples = load_samples(dataset, split, data, images, questions, limit=limit)
    if task not in ("caption", "vqa", "gqa", "vizwiz"):
        raise FreeVLMError("sweep supports caption and VQA datasets")
    check_references(task, samples, dataset, split)
    check_plan_task(plan, task, dataset)
    vlm = load_vlm(backbone, exits, plan)
    rows = {}
    for t in settings:
        opts = decode_options(criterion, t, kv_policy, 1, max_new_tokens)
        if plan is not None:
            ee = plan["early_exit"]
            opts = replace(opts, exit_layers=list(ee["exits"]), kv_policy=ee.get("kv_policy", kv_policy),
                           gates=plan_gates(plan, t) if ee.get("gated") and criterion == "confidence" else None,
                           gate_threshold=ee.get("gate_threshold", 0.5))
        if task == "caption":
            r = evaluate_captions(vlm, samples, opts, official=False, batch_size=batch_size, progress=progress)
            quality = ("CIDEr", 100 * r.metrics["CIDEr"])
        elif task in ("vqa", "gqa", "vizwiz"):
            opts.max_new_tokens = 10
            r = evaluate_vqa(vlm, samples, opts, metric=task, batch_size=batch_size, progress=progress)
            quality = ("accuracy", 100 * r.metrics["accuracy"])
        else:
            raise FreeVLMError("sweep supports caption and VQA datasets")
        rows[t] = {"quality_metric": quality[0], "quality": quality[1], **r.speed,
                   "exit_fractions": {str(k): v for k, v in r.exit_fractions.items()}}
        print(f"{criterion}={t}: {quality[0]} {quality[1]:.2f}, parameter speedup {r.speed['parameter_speedup']:.2f}x, "
              f"compute speedup {r.speed['compute_speedup']:.2f}x")
    with staged_results(out) as stage:  # sweep.json and its plot replace the old pair as one unit
        write_json(stage / "sweep.json", {str(k): v for k, v in rows.items()})
        plot_sweep({f"{criterion}": rows}, stage / "sweep.png")
    print(f"wrote {Path(out) / 'sweep.json'} and {Path(out) / 'sweep.png'}")


def _sweep_speculative(backbone, exits, out, dataset, data, images, questions, split, draft_layers, draft_lengths,
                       draft_thresholds, speed_images, max_new_tokens, batch_size, limit, progress, plan=None) -> None:
    from freevlm.eval.evaluate import decode, speed_comparison
    from freevlm.machine import system_info
    from freevlm.train.batches import VQA_TEMPLATE, Example

    task, samples = load_samples(dataset, split, data, images, questions, limit=limit)
    if task == "caption":
        examples = [Example(x.image_id, x.image_path, CAPTION_PROMPT, None) for x in samples]
    elif task in ("vqa", "gqa", "vizwiz"):
        examples = [Example(x.question_id, x.image_path, VQA_TEMPLATE.format(x.question), None) for x in samples]
        max_new_tokens = min(max_new_tokens, 10)
    else:
        raise FreeVLMError("sweep supports caption and VQA datasets")
    check_references(task, samples, dataset, split)
    check_plan_task(plan, task, dataset)
    vlm = load_vlm(backbone, exits, plan)
    layers = list(draft_layers or vlm.exits.layers)
    bad = [x for x in layers if x not in vlm.exits.layers]
    if bad:
        raise FreeVLMError(f"--draft-layers {bad} are not exits of {exits} (its exits: {vlm.exits.layers})")
    grid = [(e, k, None) for e in layers for k in draft_lengths]
    grid += [(e, max(draft_lengths), t) for e in layers for t in draft_thresholds]
    full_opts = DecodeOptions(mode="full", max_new_tokens=max_new_tokens)
    reference = {p["key"]: p["prediction"] for p in decode(vlm, examples, full_opts, batch_size=batch_size,
                                                           progress=progress, desc="full depth").preds}
    rows, paths = [], {}
    for e, k, t in grid:
        opts = DecodeOptions(mode="speculative", draft_layer=e, draft_length=k, draft_threshold=t,
                             max_new_tokens=max_new_tokens)
        d = decode(vlm, examples, opts, batch_size=batch_size, progress=progress, desc=f"exit {e}, {k} drafts")
        same = sum(p["prediction"] == reference[p["key"]] for p in d.preds)
        name = f"e{e}-k{k}" + (f"-a{t:g}" if t is not None else "")
        paths[name] = opts
        rows.append({"name": name, "draft_layer": e, "draft_length": k, "draft_threshold": t,
                     "identical_outputs": same, "outputs": len(d.preds),
                     **d.speculative.to_json(vlm.backbone.lm.num_layers)})
    timing = speed_comparison(vlm, examples[:speed_images], full_opts, also=paths, repeats=3)
    for row in rows:
        row["tokens_per_second"] = timing[row["name"]]["tokens_per_second"]
        row["vs_full_depth"] = row["tokens_per_second"] / timing["full_depth"]["tokens_per_second"]
        row["vs_hf_generate"] = row["tokens_per_second"] / timing["hf_generate"]["tokens_per_second"]
    best = max(rows, key=lambda r: r["tokens_per_second"])
    record = {"best": best, "settings": rows, "split": split, "dataset": dataset, "examples": len(examples),
              "speed_images": min(speed_images, len(examples)),
              "full_depth_tokens_per_second": timing["full_depth"]["tokens_per_second"],
              "hf_generate_tokens_per_second": timing["hf_generate"]["tokens_per_second"], "machine": system_info()}
    print(markdown_table(["setting", "accepted", "tokens/verification", "layer calls/token", "identical", "tokens/s",
                          "vs full", "vs HF"],
                         [[r["name"], r["acceptance_rate"], r["tokens_per_verification"], r["layer_calls_per_token"],
                           f"{r['identical_outputs']}/{r['outputs']}", r["tokens_per_second"], r["vs_full_depth"],
                           r["vs_hf_generate"]] for r in rows]))
    write_json(Path(out) / "speculative.json", record)
    print(f"best: {best['name']} ({best['vs_full_depth']:.2f}x full depth); wrote {Path(out) / 'speculative.json'}")
