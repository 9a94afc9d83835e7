"""What several commands share: the cheap checks of checkpoint folders and datasets they run before any work, and
decoding options from command arguments, with a plan (`freevlm plan`) or a speculative record (`freevlm sweep --mode
speculative`) standing in for flags."""

from __future__ import annotations

import json
from pathlib import Path

from freevlm import validate as check
from freevlm.data.datasets import load_dataset
from freevlm.errors import FreeVLMError
from freevlm.generation.api import DecodeOptions, EarlyExitVLM

DEFAULT_THRESHOLD = 0.8  # alpha when neither --threshold nor --plan gives one (the paper's Table 10 value)


def check_inputs(backbone, exits=None, draft_exits=None) -> None:
    """The checkpoint folders, from their files alone (cheap): before the output is claimed or data is read."""
    from freevlm.backbones import check_backbone
    from freevlm.exits import check_exit_checkpoint

    check_backbone(backbone)
    for folder in (exits, draft_exits):
        if folder is not None:
            check_exit_checkpoint(folder)


def load_samples(dataset, split, data, images, questions, domain=None, limit=None) -> tuple[str, list]:
    task, samples = load_dataset(dataset, split, data, images, questions, domain)
    samples = samples[:limit] if limit is not None else samples
    if not samples:
        raise FreeVLMError(f"split {split!r} of dataset {dataset!r} has no samples")
    return task, samples


def check_references(task: str, samples, dataset: str, split: str) -> None:
    """Caption scoring needs references for every image: checked when the data is loaded, before any decoding."""
    if task != "caption":
        return
    bare = [s for s in samples if not s.captions or not all(c.strip() for c in s.captions)]
    if bare:
        raise FreeVLMError(f"split {split!r} of dataset {dataset!r}: image {bare[0].image_id} ({len(bare)} of "
                           f"{len(samples)}) has no reference captions (or a blank one); captions cannot be scored")


def decoding_mode(mode: str, exits, draft_exits=None) -> str:
    if mode == "speculative" and exits is None and draft_exits is None:
        raise FreeVLMError("--mode speculative drafts with an exit: give --exits (or --draft-exits)")
    if mode == "early_exit" and exits is None:
        return "full"
    return mode


def read_plan_for(plan: Path | None, exits: Path | None):
    """A plan file (or folder) read before anything is claimed; it must come with the exits it was made for."""
    if plan is None:
        return None
    from freevlm.planning.plan import read_plan

    if exits is None:
        raise FreeVLMError("--plan configures exits: give --exits (the exits the plan was made for)")
    return read_plan(plan)


def plan_conflicts(plan: Path | None, mode: str, criterion: str, **given) -> None:
    """A plan and explicit decoding flags are not combined: the plan sets the early-exit settings (exits checked,
    alpha, gates, KV policy; confidence criterion) and the speculative draft setting, so a flag that would set one of
    them too is refused with one line naming both (docs/design.md, "Plans and flags")."""
    if plan is None:
        return
    if mode == "early_exit":
        names = [n for n in ("threshold", "kv_policy") if given.get(n) is not None]
        if criterion != "confidence":
            names.insert(0, "criterion")
        what = "the early-exit settings (exits, alpha, gates, KV policy; confidence criterion)"
    elif mode == "speculative":
        names = [n for n in ("draft_layer", "draft_length", "draft_threshold", "draft_record")
                 if given.get(n) is not None]
        what = "the speculative draft setting"
    elif mode == "sweep":
        names = [n for n in ("kv_policy",) if given.get(n) is not None]
        if criterion != "confidence":
            names.insert(0, "criterion")
        what = "the exits, KV policy and gates swept (confidence criterion)"
    else:  # full depth: the plan does not apply
        return
    if names:
        flags = ", ".join(check.flag(n) for n in names)
        raise FreeVLMError(f"--plan sets {what}; {flags} would conflict with it: give either --plan or {flags}")


def checked_decoding(plan: Path | None, mode: str, criterion: str, threshold, kv_policy, num_beams: int,
                     max_new_tokens: int, draft_layer, draft_length, draft_threshold, draft_record,
                     max_cache_gb) -> tuple[float, str]:
    """The decoding arguments `generate` and `evaluate` share, checked (one-line errors); returns the threshold and
    KV policy with their defaults filled in."""
    plan_conflicts(plan, mode, criterion, threshold=threshold, kv_policy=kv_policy, draft_layer=draft_layer,
                   draft_length=draft_length, draft_threshold=draft_threshold, draft_record=draft_record)
    threshold, kv_policy = DEFAULT_THRESHOLD if threshold is None else threshold, kv_policy or "propagate"
    check.decoding(criterion, [threshold], kv_policy, num_beams, max_new_tokens)
    check.drafting(mode, draft_layer, 8 if draft_length is None else draft_length, draft_threshold)
    check.optional(check.positive_number, "max_cache_gb", max_cache_gb)
    return threshold, kv_policy


def check_plan_task(plan: dict | None, task: str, dataset: str) -> None:
    """A plan is chosen for one task's quality (CIDEr or VQA accuracy): refused on another task's data."""
    if plan is not None and plan.get("task") is not None and plan["task"] != task:
        raise FreeVLMError(f"the plan was made for {plan['task']} data ({plan.get('quality_metric', 'its metric')}) "
                           f"but --dataset {dataset} is {task} data: make a plan on {task} data")


def load_vlm(backbone: Path, exits: Path | None, plan: dict | None, draft_exits: Path | None = None
             ) -> EarlyExitVLM:
    vlm = EarlyExitVLM.from_pretrained(backbone, exits, draft_exits=draft_exits)
    if plan is not None:
        from freevlm.eval.planning import check_plan

        check_plan(plan, vlm.exits, vlm.draft_exits)
        ee = plan["early_exit"]
        if ee.get("gated") and ee.get("gates"):
            vlm.load_gates(ee["gates"])  # a missing or corrupt gate file fails here, before any decoding
    return vlm


def decode_options(criterion, threshold, kv_policy, num_beams, max_new_tokens, mode="early_exit", draft_layer=None,
                   draft_length=8, draft_threshold=None, draft_record=None, plan=None,
                   max_cache_gb=None) -> DecodeOptions:
    """Decoding options from command arguments; a speculative record (`sweep --mode speculative`) supplies the
    draft settings that were not given; a plan (`freevlm plan`) replaces the early-exit settings (exits checked,
    alpha, gates, KV policy) or the speculative draft settings with its own."""
    if plan is not None:
        from freevlm.planning.plan import apply_plan

        opts = decode_options(criterion, threshold, kv_policy, num_beams, max_new_tokens, mode, draft_layer,
                              draft_length, draft_threshold, draft_record, max_cache_gb=max_cache_gb)
        return apply_plan(opts, plan)
    if draft_record is not None:
        best = read_draft_record(draft_record)
        draft_layer = best["draft_layer"] if draft_layer is None else draft_layer
        draft_length = best["draft_length"] if draft_length is None else draft_length
        draft_threshold = best["draft_threshold"] if draft_threshold is None else draft_threshold
    return DecodeOptions(mode=mode, criterion=criterion, threshold=threshold, kv_policy=kv_policy,
                         num_beams=num_beams, max_new_tokens=max_new_tokens, draft_layer=draft_layer,
                         draft_length=8 if draft_length is None else draft_length, draft_threshold=draft_threshold,
                         max_cache_gb=max_cache_gb)


def read_draft_record(path: Path) -> dict:
    """The best draft setting recorded by `freevlm sweep --mode speculative` (its speculative.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "speculative.json"
    try:
        best = json.loads(path.read_text())["best"]
        record = {k: best[k] for k in ("draft_layer", "draft_length", "draft_threshold")}
    except FileNotFoundError:
        raise FreeVLMError(f"draft record not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise FreeVLMError(f"not a speculative sweep record ({path}): {err!r}") from None
    try:  # the same checks as the flags they stand in for
        check.positive_int("draft_layer", record["draft_layer"])
        check.positive_int("draft_length", record["draft_length"])
        check.optional(check.number, "draft_threshold", record["draft_threshold"], 0.0, 1.0)
    except FreeVLMError as err:
        raise FreeVLMError(f"draft record {path}: {err}".replace(": --", ": ")) from None
    return record
