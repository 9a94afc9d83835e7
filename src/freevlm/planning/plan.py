"""Exit planning from measured costs: which exits to check, at what threshold, gated or not, and which exit drafts.

The paper leaves exit placement "unexplored" (§7) and its speedup never charges a check that did not fire. The
planner charges everything, in seconds measured on the machine at hand (`costs.py`):

1. teacher-forced statistics per exit on the development split: confidence, agreement with the final layer, the
   gates' decisions (gates are trained on the training split, one set per threshold);
2. every candidate configuration (a subset of the trained exits of at most `max_exits`, a threshold alpha, gates on
   or off) gets a predicted decode time per token from those statistics and the cost model;
3. candidates are decoded for real on the development split, fastest prediction first, until one keeps the quality
   within the user's bound (`max_quality_drop`: CIDEr x100 for captions, accuracy points for VQA); that one is the
   plan (full depth when none does);
4. speculative decoding: each drafting exit and draft length is decoded on a development subset (it is lossless, so
   only its speed matters) and the fastest by the cost model is kept.

The plan is a JSON file (`plan.json`) that `generate`, `evaluate`, `sweep` and `reproduce` accept with `--plan`;
its gates live beside it.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from freevlm.errors import FreeVLMError
from freevlm.planning.costs import MeasuredCosts

PLAN_FILE = "plan.json"
COSTS_FILE = "costs.json"  # the cost model measured for the plan, beside it (see docs/design.md)


@dataclass
class Candidate:
    exits: tuple[int, ...]  # the exits checked
    threshold: float  # alpha
    gated: bool
    kv_policy: str
    seconds_per_token: float  # predicted decode time per token (cost model x teacher-forced statistics)
    agreement: float  # share of dev positions whose chosen exit agrees with the final layer
    head_subset: int | None = None  # exit checks score the K most frequent tokens (None: the full head)

    @property
    def name(self) -> str:
        subset = f", head subset {self.head_subset}" if self.head_subset is not None else ""
        return (f"exits {list(self.exits)}, alpha {self.threshold:g}, {self.kv_policy}{', gated' if self.gated else ''}"
                f"{subset}")


def predict_candidates(features, gate_open: dict[float, dict[int, torch.Tensor]] | None, costs: MeasuredCosts,
                       num_layers: int, thresholds, max_exits: int, policy: str = "propagate",
                       exit_transformers: bool = True, head_subset: int | None = None,
                       head_share: float = 1.0) -> list[Candidate]:
    """Predicted time per token of every (subset, alpha, gates) on teacher-forced dev features.

    `features[layer] = (h, confidence, agrees)` per dev position; `gate_open[alpha][layer]` the gates' decisions.
    A position leaves at the first checked exit whose gate is open (if gated) and whose confidence exceeds alpha.
    `head_subset`: the checks score that many tokens (`features` then hold the subset's confidence and agreement,
    `gates.exit_statistics`), each costing `head_share` (K/V) of a head; the final head stays whole.
    """
    layers = sorted(features)
    positions = features[layers[0]][1].shape[0]
    # what a skipped layer costs: a K/V projection (propagate), a copy, or (catch-up) running later inside the next
    # deep token's block; that price depends on how many exited tokens wait together (`_catch_up_seconds`)
    catch_up = policy == "catch_up"
    fill = {"propagate": costs.kv_projection, "copy": costs.kv_copy, "catch_up": None}[policy]
    out = []
    subsets = [c for r in range(1, max_exits + 1) for c in itertools.combinations(layers, r)]
    for alpha in thresholds:
        for subset, gated in itertools.product(subsets, (False, True)):
            if gated and (gate_open is None or alpha not in gate_open):
                continue
            undecided = torch.ones(positions, dtype=torch.bool)
            seconds = torch.full((positions,), costs.step)
            waiting = torch.zeros(positions)  # catch-up: the layers (and exits) each exited position still owes
            agree = torch.zeros(positions, dtype=torch.bool)
            prev = 0
            for i, layer in enumerate(subset):
                seconds += undecided * (layer - prev) * costs.layer
                prev = layer
                _, conf, agrees = features[layer]
                if gated:
                    opened = gate_open[alpha][layer]
                    seconds += undecided * costs.gate
                    checked = undecided & opened
                    closed = undecided & ~opened
                    if exit_transformers:
                        # the closed exit's K/V: projected from h_i (catch-up runs the exit for its cache anyway)
                        seconds += closed * (costs.exit_layer if policy == "catch_up" else costs.kv_projection)
                else:
                    checked = undecided
                seconds += checked * ((costs.exit_layer if exit_transformers else 0.0) + costs.head * head_share)
                fires = checked & (conf > alpha)
                agree |= fires & agrees
                skipped = (num_layers - layer) + (len(subset) - i - 1 if exit_transformers else 0)
                if catch_up:
                    waiting += fires * skipped
                else:
                    seconds += fires * skipped * fill
                undecided &= ~fires
            seconds += undecided * ((num_layers - prev) * costs.layer + costs.head)
            if catch_up:
                seconds += _catch_up_seconds(~undecided, waiting, costs)
            agree |= undecided
            out.append(Candidate(subset, float(alpha), gated, policy, float(seconds.mean()),
                                 float(agree.float().mean()), head_subset))
    return out


def _catch_up_seconds(exited: torch.Tensor, waiting: torch.Tensor, costs: MeasuredCosts) -> torch.Tensor:
    """Catch-up's price per position. A run of g consecutive exited tokens waits and then rides, g + 1 tokens to a
    layer, in the next deep token's layers: each of the g pays (block_layer(g + 1) - layer) / g per layer it owes.
    Dev positions are the teacher-forced captions back to back, so a run can straddle two captions (rare)."""
    starts = exited & ~torch.cat([torch.zeros(1, dtype=torch.bool), exited[:-1]])
    run = torch.cumsum(starts.long(), 0)
    length = torch.bincount(run[exited], minlength=int(run.max()) + 1 if run.numel() else 1)[run] * exited
    price = torch.zeros_like(waiting)
    for g in length.unique().tolist():
        if g:
            price[length == g] = max(0.0, costs.block_layer(g + 1) - costs.layer) / g
    return waiting * price


def full_depth_seconds(costs: MeasuredCosts, num_layers: int) -> float:
    return costs.step + num_layers * costs.layer + costs.head


def shortlist(candidates: list[Candidate], limit: int) -> list[Candidate]:
    """The fastest predictions first; among candidates predicted within 2% of each other, the more agreeing one."""
    ranked = sorted(candidates, key=lambda c: (round(c.seconds_per_token, 7), -c.agreement))
    out, seen = [], set()
    for c in ranked:
        key = (c.exits, c.threshold, c.gated, c.kv_policy, c.head_subset)
        if key not in seen:
            seen.add(key)
            out.append(c)
        if len(out) >= limit:
            break
    return out


def write_plan(folder: str | Path, plan: dict) -> Path:
    from freevlm.outputs import write_json

    return write_json(Path(folder) / PLAN_FILE, plan)


PLAN_FORMAT = "freevlm-plan/1"
PLAN_TASKS = ("caption", "vqa", "gqa", "vizwiz")


def remove_unused_gates(folder: Path, keep: str) -> None:
    """Delete every gate folder under `folder/gates` but `keep` (the committed plan's): the replaced plan's and those
    of runs killed before their plan.json was written. Only ever called after the new plan.json is in place."""
    import shutil

    kept = (folder / keep).resolve()
    root = folder / "gates"
    for child in root.iterdir() if root.is_dir() else []:
        if child.resolve() == kept:
            continue
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def read_plan(path: str | Path) -> dict:
    """A plan written by `freevlm plan` (the file or its folder), validated field by field (one line on anything
    else: an unknown format version, a wrong type or range, a gates path outside the plan's folder), with its gate
    folder resolved."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_FILE
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise FreeVLMError(f"plan not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FreeVLMError(f"not a freevlm plan ({path}): {' '.join(str(err).split())}") from None
    except OSError as err:
        raise FreeVLMError(f"cannot read plan {path}: {err.strerror or err}") from None
    validate_plan(plan, path)
    gates = plan["early_exit"].get("gates")
    if gates:
        plan["early_exit"]["gates"] = str((path.parent / gates).resolve())
    if plan.get("token_ranking"):  # the vocabulary ranking a plan's head subsets are taken from
        plan["token_ranking"] = str((path.parent / plan["token_ranking"]).resolve())
    plan["folder"] = str(path.parent.resolve())
    return plan


def validate_plan(plan, path: Path) -> None:
    """Every field `--plan` reads, checked for type and range before use."""
    from freevlm.generation.kv import POLICIES

    def bad(field: str, want: str, value) -> FreeVLMError:
        return FreeVLMError(f"plan {path}: {field} must be {want}, got {value!r}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v) -> bool:
        return (is_int(v) or isinstance(v, float)) and v == v and abs(v) != float("inf")

    if not isinstance(plan, dict):
        raise FreeVLMError(f"not a freevlm plan ({path}): expected a JSON object, found {type(plan).__name__}")
    if "format" not in plan:
        raise FreeVLMError(f"not a freevlm plan ({path}): no 'format' field")
    if plan["format"] != PLAN_FORMAT:
        raise FreeVLMError(f"plan {path} has format {plan.get('format')!r}; this freevlm reads {PLAN_FORMAT!r} "
                           "(make the plan again with `freevlm plan`)")
    if "task" in plan and plan["task"] not in PLAN_TASKS:
        raise bad("task", f"one of {', '.join(PLAN_TASKS)}", plan["task"])
    for key in ("exits_fingerprint",):
        if plan.get(key) is not None and not isinstance(plan[key], str):
            raise bad(key, "a string", plan[key])
    ee = plan.get("early_exit")
    if not isinstance(ee, dict):
        raise bad("early_exit", "an object", ee)
    exits = ee.get("exits", [])
    if not isinstance(exits, list) or not all(is_int(x) and x >= 1 for x in exits):
        raise bad("early_exit.exits", "a list of layer numbers", exits)
    if exits:
        alpha = ee.get("threshold")
        if not is_num(alpha) or not 0 < alpha <= 1:
            raise bad("early_exit.threshold", "a number in (0, 1]", alpha)
    if not isinstance(ee.get("gated", False), bool):
        raise bad("early_exit.gated", "true or false", ee.get("gated"))
    gate_threshold = ee.get("gate_threshold", 0.5)
    if not is_num(gate_threshold) or not 0 < gate_threshold < 1:
        raise bad("early_exit.gate_threshold", "a number in (0, 1)", gate_threshold)
    if ee.get("kv_policy", "propagate") not in POLICIES:
        raise bad("early_exit.kv_policy", f"one of {', '.join(POLICIES)}", ee.get("kv_policy"))
    folder = path.parent.resolve()
    for field, value in (("early_exit.gates", ee.get("gates")), ("gates_root", plan.get("gates_root"))):
        if value is None:
            continue
        if not isinstance(value, str) or not value or not (folder / value).resolve().is_relative_to(folder):
            raise bad(field, f"a folder inside the plan's folder {folder}", value)
    sp = plan.get("speculative")
    if sp is not None:
        if not isinstance(sp, dict):
            raise bad("speculative", "an object or null", sp)
        for key in ("draft_layer", "draft_length"):
            if not is_int(sp.get(key)) or sp[key] < 1:
                raise bad(f"speculative.{key}", "a positive integer", sp.get(key))
        t = sp.get("draft_threshold")
        if t is not None and (not is_num(t) or not 0 <= t <= 1):
            raise bad("speculative.draft_threshold", "null or a number in [0, 1]", t)


def plan_gates(plan: dict, threshold: float) -> str | None:
    """The plan's gates trained for `threshold` (`freevlm plan` trains one set per alpha), if it has them."""
    folder = Path(plan.get("folder", ".")) / plan.get("gates_root", "gates") / f"alpha-{threshold:g}"
    return str(folder) if folder.is_dir() else None


def apply_plan(options, plan: dict):
    """Decoding options with the plan's settings for their mode (early exit: exits checked, alpha, gates;
    speculative: the drafting exit and length). Full depth is unchanged."""
    from dataclasses import replace

    if options.mode == "early_exit":
        ee = plan["early_exit"]
        if not ee.get("exits"):  # the plan is full depth: no exit configuration met the quality bound
            return replace(options, mode="full")
        return replace(options, threshold=ee["threshold"], exit_layers=list(ee["exits"]),
                       gates=ee.get("gates") if ee.get("gated") else None,
                       gate_threshold=ee.get("gate_threshold", 0.5), kv_policy=ee.get("kv_policy", options.kv_policy),
                       head_subset=ee.get("head_subset", options.head_subset),
                       token_ranking=plan.get("token_ranking") or options.token_ranking)
    if options.mode == "speculative" and plan.get("speculative"):
        sp = plan["speculative"]
        return replace(options, draft_layer=sp["draft_layer"], draft_length=sp["draft_length"],
                       draft_threshold=sp.get("draft_threshold"), draft_adapt=sp.get("draft_adapt", False),
                       head_subset=sp.get("head_subset", options.head_subset),
                       token_ranking=plan.get("token_ranking") or options.token_ranking)
    return options
