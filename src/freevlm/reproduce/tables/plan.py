"""Exit plan: `freevlm plan` on FREE's exits per seed, and how well its cost model predicted the measured speed.

Per seed, the planner (`eval/planning.make_plan`) gets the seed's training split (teacher-forced statistics, gates)
and development split (real decodes until a configuration keeps CIDEr within 1 point of full depth; the draft
setting), and writes its plan to `seed-i/plan/`. `verify_plan` then checks it on the test split: quality drop, and
predicted vs measured tokens/s at batch 1 (full depth, the planned early exit, the planned speculative decode and
transformers' `generate`, interleaved). The planned early-exit decode is also scored like the method loop's rows:
on test (Table 4's "FREE + plan" row: official metrics, speedups, wall) and on dev (Fig. 4b's "FREE + plan" point).
"""

from __future__ import annotations

import time

from freevlm.eval.planning import make_plan, verify_plan
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.planning.plan import apply_plan, read_plan, write_plan
from freevlm.reproduce.tables.base import Report, Table, lookup, markdown_table, ms, section

PATHS = (("early_exit_plan", "early exit (plan)"), ("speculative_plan", "speculative (plan)"),
         ("full_depth", "full depth"))


def measure(run, core) -> dict:
    start = time.perf_counter()
    cfg = run.cfg
    vlm = EarlyExitVLM(core.backbone, core.trained["FREE"])
    folder = run.out / "plan"
    train = run.train[: cfg.plan_train_images] if cfg.plan_train_images else run.train
    dev = run.dev[: cfg.plan_dev_images] if cfg.plan_dev_images else run.dev
    made = make_plan(vlm, run.task.name, train, dev, folder, thresholds=cfg.plan_thresholds,
                     candidates=cfg.plan_candidates,
                     spec_images=cfg.plan_spec_images, batch_size=cfg.eval_batch_size, progress=run.progress)
    write_plan(folder, made)
    plan = read_plan(folder)  # gates resolved to this folder, as `--plan` reads it
    verified = verify_plan(vlm, made, run.task.name, run.test, speed_images=cfg.speed_images,
                           batch_size=cfg.eval_batch_size, plan_folder=folder, progress=run.progress)
    opts = apply_plan(DecodeOptions(), plan)
    timed = opts.mode == "early_exit"  # a full-depth plan (see `_because`) runs at full depth's speed
    test = run.test_row(vlm, opts, wall=timed, official=run.task.name == "caption")
    r = run.task.evaluate(vlm, run.dev, opts, progress=run.progress, batch_size=cfg.eval_batch_size)
    dev_point = {"quality_metric": f"{run.task.metric} (dev)", "quality": run.task.quality(r), **r.speed,
                 "wall_clock_vs_full_depth": run.wall(vlm, run.dev, opts) if timed else 1.0}
    if not timed:
        test["wall_clock_vs_full_depth"] = 1.0
    ee, sp = made["early_exit"], made.get("speculative")
    choice = {"exits": list(ee["exits"]), "threshold": ee["threshold"], "gated": bool(ee.get("gated")),
              "kv_policy": ee.get("kv_policy", "propagate"), "predicted_speedup": ee.get("predicted_speedup"),
              "plan_dev_quality_drop": ee.get("quality_drop"),
              "full_depth_because": _because(made),
              "speculative": None if not sp else {k: sp.get(k) for k in ("draft_layer", "draft_length",
                                                                         "draft_threshold", "acceptance_rate")}}
    return {"choice": choice, "verify": verified, "test": test, "dev": dev_point, "folder": str(folder),
            "train_images": len(train), "dev_images": len(dev), "candidates_decoded": len(made["evaluated"]),
            "candidates_predicted": made["candidates_predicted"], "plan_seconds": made["seconds"],
            "seconds": time.perf_counter() - start}


def _because(made: dict) -> str | None:
    """Why a plan is full depth: nothing was predicted faster, or nothing decoded on dev kept the quality bound."""
    if made["early_exit"]["exits"]:
        return None
    if not made["evaluated"]:
        return "no candidate predicted faster than full depth"
    return "no candidate within the quality bound on dev"


def describe(choice: dict) -> str:
    """'exits [2, 4], alpha 0.8, propagate, gated' (or 'full depth' when no candidate met the bound)."""
    if not choice["exits"]:
        return f"full depth ({choice.get('full_depth_because') or 'no candidate within the quality bound on dev'})"
    return (f"exits {choice['exits']}, alpha {choice['threshold']:g}, {choice['kv_policy']}"
            f"{', gated' if choice['gated'] else ''}")


def describe_draft(choice: dict) -> str:
    sp = choice.get("speculative")
    if not sp:
        return "-"
    s = f"exit {sp['draft_layer']}, {sp['draft_length']} drafts"
    return s + (f", adaptive {sp['draft_threshold']:g}" if sp.get("draft_threshold") is not None else "")


def table4_row(report: Report) -> list | None:
    """Table 4's 'FREE + plan' row: the planned early-exit decode on test, like the method loop's rows."""
    if not report.has("plan"):
        return None
    col, runs = report.col, report.runs
    p = ["plan", "test"]
    trained = runs[0]["methods"]["FREE"]["trainable_per_exit"] if "FREE" in runs[0].get("methods", {}) else 0
    return ["FREE + plan", *[col(p + ["metrics", q]) for q in ("BLEU-4", "CIDEr", "METEOR", "ROUGE-L")],
            col(p + ["speed", "parameter_speedup"], 1, 2),
            col(p + ["speed", "compute_speedup"], 1, 2), col(p + ["wall_clock_vs_full_depth"], 1, 2),
            "plan " + " / ".join(describe(r["plan"]["choice"]) for r in runs),
            f"{trained:,}" + (" + gates" if any(r["plan"]["choice"]["gated"] for r in runs) else "")]


def fig4b_row(report: Report) -> list | None:
    """Fig. 4b's 'FREE + plan' point: the plan's early-exit decode on dev (means over seeds; wall mean ± std)."""
    if not report.has("plan"):
        return None
    runs = report.runs

    def mean(key):
        return sum(r["plan"]["dev"][key] for r in runs) / len(runs)

    return ["FREE + plan", mean("quality"), mean("parameter_speedup"), mean("compute_speedup"),
            report.col(["plan", "dev", "wall_clock_vs_full_depth"], 1, 2)]


def render(report: Report) -> list[str]:
    if not report.has("plan"):
        return []
    runs = report.runs
    first = runs[0]["plan"]
    per_seed = []
    for i, r in enumerate(runs):
        v = r["plan"]["verify"]
        row = [i, describe(r["plan"]["choice"]), describe_draft(r["plan"]["choice"])]
        for path, _ in PATHS[:2]:
            if path in v["predicted_tokens_per_second"]:
                row += [f"{v['predicted_tokens_per_second'][path]:.0f} / {v['measured_tokens_per_second'][path]:.0f}",
                        f"{100 * v['prediction_error'][path]:+.0f}%"]
            else:
                row += ["-", "-"]
        row.append(f"{v['quality_drop'].get('early_exit_plan', 0.0):.2f}")
        per_seed.append(row)
    summary = []
    for path, label in PATHS:
        vals = [r["plan"]["verify"] for r in runs]
        if all(path in v["measured_tokens_per_second"] for v in vals):
            def c(key, scale=1.0, digits=2, path=path, vals=vals):
                return ms([lookup(v, [key, path]) for v in vals], scale, digits)

            summary.append([label, c("predicted_tokens_per_second", digits=0),
                            c("measured_tokens_per_second", digits=0), c("prediction_error", 100, 1),
                            c("vs_full_depth"), c("vs_hf_generate"), c("quality_drop")])
    return section(
        "Exit plan — `freevlm plan` on FREE's exits (per seed)",
        f"The planner chose on {first['train_images']} training images (gates, teacher-forced statistics) and "
        f"{first['dev_images']} dev images (real decodes of the fastest predicted candidates, at most "
        f"{report.cfg.plan_candidates}, until one keeps CIDEr within 1 point of full depth; the draft setting by the "
        f"cost model), then was checked on the test split: predicted vs measured tokens/s at batch 1 on "
        f"{first['verify']['speed_images']} test images (interleaved with full depth and transformers' `generate`), "
        f"error = predicted / measured - 1; quality drop = CIDEr x100 below full depth on test. Table 4 and Fig. 4b "
        f"carry the plan's early-exit decode as 'FREE + plan'.",
        markdown_table(["seed", "early exit (plan)", "speculative (plan)", "early exit: predicted / measured tok/s",
                        "error", "speculative: predicted / measured tok/s", "error", "CIDEr drop (test)"], per_seed),
        markdown_table(["path", "predicted tok/s", "measured tok/s", "error %", "vs full", "vs HF generate",
                        "CIDEr drop (test)"], summary))


def planned(cfg, full: bool) -> bool:
    return cfg.plan  # `freevlm reproduce --no-plan` leaves the planner out


TABLE = Table(render, measure, key=("plan",), when=planned)
