"""`freevlm plan`: exits, alpha, gates, KV policy and the speculative draft setting chosen from measured costs."""

from __future__ import annotations

import os
import time
from pathlib import Path

from freevlm import validate as check
from freevlm.commands.common import (
    check_inputs,
    check_references,
    load_samples,
)
from freevlm.data.datasets import load_dataset
from freevlm.data.splits import split_by_image, split_record
from freevlm.errors import FreeVLMError
from freevlm.eval.evaluate import PAPER_THRESHOLDS
from freevlm.eval.report import markdown_table
from freevlm.generation.api import EarlyExitVLM
from freevlm.outputs import claim_output, fsync_tree, write_json


def plan(
    backbone: Path, exits: Path, out: Path, dataset: str = "synthetic", data: Path | None = None,
    images: Path | None = None, questions: Path | None = None, split: str = "val", train_fraction: float = 0.8,
    seed: int = 0, max_quality_drop: float = 1.0, thresholds: list[float] | None = None, max_exits: int = 3,
    candidates: int = 8, kv_policies: list[str] | None = None, draft_lengths: list[int] | None = None,
    train_limit: int | None = None, dev_limit: int | None = None, verify_split: str | None = "test",
    verify_limit: int | None = None, speed_images: int = 16, head_subsets: list[int] | None = None,
    draft_exits: Path | None = None, overwrite: bool = False, progress: bool = True,
) -> None:
    """Choose which exits to check, alpha, gates and KV policy (and the speculative draft setting) for the fastest
    predicted decoding within a quality bound on dev; writes plan.json, costs.json and gates/ into `out`.

    backbone: transformers checkpoint folder
    exits: exit checkpoint folder (e.g. exits at every layer: the plan keeps few)
    out: output folder for the plan
    dataset: dataset format (caption or VQA)
    data: dataset root (synthetic) or annotation file
    images: image folder (real datasets)
    questions: questions file
    split: the split the exits were trained on; its train part (as in train-exits) trains the gates, the rest is dev
    train_fraction: the train part of `split` (train-exits' --train-fraction; same seed, same images)
    seed: the seed of that split (train-exits' --seed)
    max_quality_drop: largest drop of dev quality x100 allowed (CIDEr for captions, accuracy for VQA)
    thresholds: alphas tried (default 0.5 ... 1.0)
    max_exits: at most this many exits checked
    candidates: dev decodes at most (fastest predictions first; stops at the first within the bound)
    kv_policies: KV policies tried (default: propagate catch_up)
    draft_lengths: speculative draft lengths tried (default: 2 4 8)
    train_limit: gates: use only the first N training samples
    dev_limit: use only the first N dev samples
    verify_split: check the plan on this split (predicted vs measured tokens/s, quality); none: skip
    verify_limit: verification: use only the first N samples
    speed_images: verification: images timed (batch 1, interleaved, median of 3)
    head_subsets: vocabulary subset sizes tried for exit checks and drafts besides the full head (e.g. 1024 4096)
    draft_exits: separate drafting exits the speculative setting is chosen among (default: the exits)
    overwrite: replace a plan already in `out`
    progress: show progress bars
    """
    from freevlm.eval.planning import make_plan, verify_plan
    from freevlm.generation.kv import POLICIES
    from freevlm.planning.plan import COSTS_FILE, PLAN_FILE, remove_unused_gates, write_plan

    check.dataset_name(dataset)
    check.fraction("train_fraction", train_fraction)
    check.non_negative_int("seed", seed)
    check.number("max_quality_drop", max_quality_drop, 0.0)
    alphas = list(thresholds or PAPER_THRESHOLDS)
    check.decoding("confidence", alphas, "propagate", 1, 30, threshold_name="thresholds")
    check.positive_int("max_exits", max_exits)
    check.positive_int("candidates", candidates)
    policies = check.choices("kv_policies", kv_policies or ["propagate", "catch_up"], POLICIES)
    lengths = [check.positive_int("draft_lengths", k) for k in (draft_lengths or [2, 4, 8])]
    for name, value in (("train_limit", train_limit), ("dev_limit", dev_limit), ("verify_limit", verify_limit)):
        check.optional(check.positive_int, name, value)
    check.positive_int("speed_images", speed_images)
    subset_sizes = [check.positive_int("head_subsets", k) for k in (head_subsets or [])]
    check_inputs(backbone, exits, draft_exits)
    verify = verify_split not in (None, "", "none")
    # plan.json is the result and the commit point: this run's gates go to a folder of their own, the old plan's stay
    # untouched until plan.json is replaced (atomically), so a kill at any moment leaves the old plan or the new one
    # with its own gates. Gates of no plan (the old plan's, a killed run's) are removed once the new plan is in.
    gates_dir = f"gates/run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    with claim_output(out, results=(PLAN_FILE,), overwrite=overwrite):
        task, samples = load_dataset(dataset, split, data, images, questions)
        if task not in ("caption", "vqa", "gqa", "vizwiz"):
            raise FreeVLMError("plan supports caption and VQA datasets")
        check_references(task, samples, dataset, split)
        train, dev = split_by_image(samples, seed, train_fraction)
        train, dev = train[:train_limit], dev[:dev_limit]
        if not train or not dev:
            raise FreeVLMError(f"split {split!r} with --train-fraction {train_fraction} leaves {len(train)} train "
                               f"and {len(dev)} dev samples: the plan needs both")
        vlm = EarlyExitVLM.from_pretrained(backbone, exits, draft_exits=draft_exits)
        result = make_plan(vlm, task, train, dev, Path(out), max_quality_drop=max_quality_drop, thresholds=alphas,
                           max_exits=max_exits, candidates=candidates, kv_policies=tuple(policies),
                           draft_lengths=tuple(lengths), gates_dir=gates_dir,
                           head_subsets=tuple(subset_sizes), progress=progress)
        result["split"] = split_record(train, dev, seed, train_fraction)
        if verify:
            _, test = load_samples(dataset, verify_split, data, images, questions, limit=verify_limit)
            result["verification"] = verify_plan(vlm, result, task, test, speed_images=speed_images,
                                                 plan_folder=Path(out), progress=progress)
        fsync_tree(Path(out) / gates_dir)
        write_plan(out, result)  # the commit
        write_json(Path(out) / COSTS_FILE, result["costs"])  # a copy of the plan's "costs", for reading by hand
        remove_unused_gates(Path(out), gates_dir)
    print_plan(result)
    print(f"wrote {Path(out) / PLAN_FILE}; use it with --plan {Path(out)}")


def print_plan(plan: dict) -> None:
    """The plan in a few lines: what is checked, how fast it is predicted (and measured) to be."""
    ee, sp = plan["early_exit"], plan.get("speculative")
    metric = plan["quality_metric"]
    if ee.get("exits"):
        gates = "gated" if ee.get("gated") else "ungated"
        subset = f", head subset {ee['head_subset']}" if ee.get("head_subset") is not None else ""
        print(f"early exit: check exits {ee['exits']} at alpha {ee['threshold']}, {gates}, KV policy "
              f"{ee['kv_policy']}{subset}; predicted {ee['predicted_speedup']:.2f}x full depth; dev {metric} drop "
              f"{ee['quality_drop']:.2f} (bound {plan['max_quality_drop']})")
    else:
        print(f"early exit: no configuration kept dev {metric} within {plan['max_quality_drop']} of full depth "
              "while predicted faster: the plan decodes at full depth")
    if sp:
        adaptive = f", adaptive at {sp['draft_threshold']}" if sp.get("draft_threshold") is not None else ""
        subset = f", head subset {sp['head_subset']}" if sp.get("head_subset") is not None else ""
        print(f"speculative: draft with exit {sp['draft_layer']}, {sp['draft_length']} drafts{adaptive}{subset}; "
              f"{sp['acceptance_rate']:.0%} accepted on dev")
    ver = plan.get("verification")
    if ver:
        rows = [[k, ver["predicted_tokens_per_second"].get(k, float("nan")), v, ver["vs_full_depth"][k],
                 ver["vs_hf_generate"][k], ver["quality"].get(k, float("nan"))]
                for k, v in ver["measured_tokens_per_second"].items()]
        print(markdown_table(["path (test)", "predicted tok/s", "measured tok/s", "vs full", "vs HF", metric], rows))
