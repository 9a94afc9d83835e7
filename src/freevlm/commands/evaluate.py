"""`freevlm evaluate`: a backbone (with or without exits) scored on a dataset split."""

from __future__ import annotations

import json
from pathlib import Path

from freevlm import validate as check
from freevlm.commands.common import (
    check_inputs,
    check_plan_task,
    check_references,
    checked_decoding,
    decode_options,
    decoding_mode,
    load_samples,
    load_vlm,
    read_plan_for,
)
from freevlm.eval.evaluate import evaluate_captions, evaluate_visdial, evaluate_vqa
from freevlm.outputs import claim_output, write_json


def evaluate(
    backbone: Path, out: Path, exits: Path | None = None, dataset: str = "synthetic", data: Path | None = None,
    images: Path | None = None, questions: Path | None = None, split: str = "test", domain: str | None = None,
    mode: str = "early_exit", criterion: str = "confidence", threshold: float | None = None,
    kv_policy: str | None = None,
    num_beams: int = 1, max_new_tokens: int = 30, draft_layer: int | None = None, draft_length: int | None = None,
    draft_threshold: float | None = None, draft_record: Path | None = None, plan: Path | None = None,
    max_cache_gb: float | None = None, batch_size: int = 16, official: bool = True, noise: float = 0.0,
    limit: int | None = None, overwrite: bool = False, progress: bool = True, draft_exits: Path | None = None,
) -> None:
    """Evaluate a backbone (with or without exits) on a dataset split; write predictions + metrics + exit stats.

    backbone: transformers checkpoint folder
    out: JSON file for the results
    exits: exit checkpoint folder; without it, full-depth decoding
    dataset: dataset format (synthetic, synthetic-vqa, synthetic-nocaps, synthetic-visdial, coco, nocaps, vqav2, ...)
    data: dataset root (synthetic) or annotation file
    images: image folder (real datasets)
    questions: questions file (VQAv2, OK-VQA, GQA)
    split: split to evaluate
    domain: NoCaps domain (in-domain, near-domain, out-domain); all if omitted
    mode: early_exit (FREE, lossy) | full | speculative (lossless; an exit drafts)
    criterion: early exit: confidence | entropy | patience | similarity
    threshold: early exit: the criterion's setting (default 0.8)
    kv_policy: early exit: propagate | copy | catch_up (default propagate)
    num_beams: beam width
    max_new_tokens: generation length limit
    draft_layer: speculative: the drafting exit's layer (default: the record's, else the first exit)
    draft_length: speculative: drafts per round at most (default: the record's, else 8)
    draft_threshold: speculative: stop drafting when the exit's confidence falls below this
    draft_record: speculative: speculative.json from `freevlm sweep --mode speculative` (or its folder)
    plan: a plan.json from `freevlm plan` (or its folder): its exits, alpha, gates, KV policy / draft setting
    max_cache_gb: refuse a generate call whose KV cache would pass this many GiB (default: the device's free memory)
    batch_size: images per generate call (per process); VisDial: candidate answers scored per forward pass
    official: caption metrics through pycocoevalcap with Java (else in-process BLEU-4 and CIDEr only)
    noise: std of Gaussian noise added to the normalised pixel values (Table 6)
    limit: evaluate only the first N samples
    overwrite: replace the results already in `out` (they are kept until the new ones are written)
    progress: show progress bars
    draft_exits: speculative: separate drafting exits (e.g. train-exits --variant kd, one layer); default: --exits
    """
    check.dataset_name(dataset)
    threshold, kv_policy = checked_decoding(plan, mode, criterion, threshold, kv_policy, num_beams, max_new_tokens,
                                            draft_layer, draft_length, draft_threshold, draft_record, max_cache_gb)
    check.positive_int("batch_size", batch_size)
    check.number("noise", noise, 0.0)
    check.optional(check.positive_int, "limit", limit)
    check_inputs(backbone, exits, draft_exits)
    mode = decoding_mode(mode, exits, draft_exits)
    plan_ = read_plan_for(plan, exits)
    opts = decode_options(criterion, threshold, kv_policy, num_beams, max_new_tokens, mode, draft_layer,
                          draft_length, draft_threshold, draft_record, plan_, max_cache_gb)
    with claim_output(out, file=True, overwrite=overwrite):
        task, samples = load_samples(dataset, split, data, images, questions, domain, limit)
        check_references(task, samples, dataset, split)
        check_plan_task(plan_, task, dataset)
        vlm = load_vlm(backbone, exits, plan_, draft_exits)
        common = dict(batch_size=batch_size, progress=progress, pixel_noise=noise)
        if task == "caption":
            result = evaluate_captions(vlm, samples, opts, official=official, **common)
        elif task == "visdial":
            result = evaluate_visdial(vlm, samples, opts, batch_size=batch_size, progress=progress)
        else:
            opts.max_new_tokens = min(max_new_tokens, 10)
            result = evaluate_vqa(vlm, samples, opts, metric=task, **common)
        from accelerate import PartialState

        if PartialState().is_main_process:
            write_json(out, result.to_json())
            print(json.dumps({"metrics": result.metrics, "speed": result.speed,
                              "exit_fractions": result.exit_fractions}, indent=2))
