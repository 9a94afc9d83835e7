"""Exit planning: the measured cost model's shape, the planner's choice under known (fake) costs, and `--plan` end
to end through the command line (plan -> evaluate / sweep / generate)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from freevlm.cli import main
from freevlm.errors import FreeVLMError
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.planning.costs import MeasuredCosts, measure_costs
from freevlm.planning.plan import apply_plan, predict_candidates, read_plan, shortlist

N = 4  # layers of the fake model


def fake_costs(head: float) -> MeasuredCosts:
    return MeasuredCosts(batch_size=1, cache_length=16, layer=1.0, exit_layer=0.0, head=head, gate=0.01,
                         kv_projection=0.0, kv_copy=0.0, step=0.0, call=0.0, block={2: 1.2, 4: 1.6, 9: 2.6})


def fake_features(positions: int = 8):
    """Exit 1 is confident on the first half of the positions, exit 3 everywhere; both agree with the final layer."""
    h = torch.zeros(positions, 2)
    first = torch.tensor([0.95] * (positions // 2) + [0.1] * (positions - positions // 2))
    agrees = torch.ones(positions, dtype=torch.bool)
    return {1: (h, first, agrees), 3: (h, torch.full((positions,), 0.95), agrees)}


def cheapest(head: float) -> tuple[int, ...]:
    cands = predict_candidates(fake_features(), None, fake_costs(head), N, [0.8], max_exits=2,
                               exit_transformers=False)
    return shortlist(cands, 1)[0].exits


def test_planner_checks_early_when_checks_are_cheap_and_late_when_the_head_is_expensive():
    # head 0: exits [1, 3] cost 1 + 0.5 * 2 = 2 layers per token, [1] 2.5, [3] 3 -> check both
    assert cheapest(head=0.0) == (1, 3)
    # head 10 layers: [3] costs 3 + 10 = 13, [1] 1 + 10 + 0.5 * (3 + 10) = 17.5, [1, 3] 1 + 10 + 0.5 * 12 = 17
    assert cheapest(head=10.0) == (3,)


def test_predicted_seconds_follow_the_cost_model():
    cands = predict_candidates(fake_features(), None, fake_costs(10.0), N, [0.8], max_exits=2,
                               exit_transformers=False)
    by = {c.exits: c.seconds_per_token for c in cands if not c.gated}
    assert by == pytest.approx({(1,): 17.5, (3,): 13.0, (1, 3): 17.0})


def test_subset_head_checks_are_priced_as_a_share_of_the_head():
    full = predict_candidates(fake_features(), None, fake_costs(10.0), N, [0.8], max_exits=2, exit_transformers=False)
    sub = predict_candidates(fake_features(), None, fake_costs(10.0), N, [0.8], max_exits=2, exit_transformers=False,
                             head_subset=16, head_share=0.25)
    by = {c.exits: c.seconds_per_token for c in sub if not c.gated}
    # as test_predicted_seconds_follow_the_cost_model, a check's head at 2.5: [3] 3 + 2.5; [1] 1 + 2.5 + 0.5 * (3 +
    # 10): the final head stays whole; [1, 3] 1 + 2.5 + 0.5 * (2 + 2.5)
    assert by == pytest.approx({(1,): 10.0, (3,): 5.5, (1, 3): 5.75})
    assert all(c.head_subset == 16 and "head subset 16" in c.name for c in sub)
    assert {c.head_subset for c in shortlist(full + sub, 20)} == {None, 16}  # both kinds stay distinct candidates


def test_gated_candidates_skip_the_head_where_the_gate_is_closed():
    gate = {0.8: {1: torch.tensor([True] * 4 + [False] * 4), 3: torch.ones(8, dtype=torch.bool)}}
    cands = predict_candidates(fake_features(), gate, fake_costs(10.0), N, [0.8], max_exits=2,
                               exit_transformers=False)
    by = {(c.exits, c.gated): c.seconds_per_token for c in cands}
    # gated [1, 3]: 1 + gate + (open half: 10) ; shut half: 2 more layers + gate + 10 -> 1.01 + 5 + 0.5 * 12.01
    assert by[((1, 3), True)] == pytest.approx(1 + 0.01 + 5 + 0.5 * (2 + 0.01 + 10))
    assert by[((1, 3), True)] < by[((1, 3), False)]


def test_catch_up_is_priced_by_how_many_exited_tokens_wait_together():
    # exit 1 fires at positions 0 and 2-4: a run of 1 and a run of 3, each riding with the next deep token
    conf = torch.tensor([0.95, 0.1, 0.95, 0.95, 0.95, 0.1, 0.1, 0.1])
    features = {1: (torch.zeros(8, 2), conf, torch.ones(8, dtype=torch.bool))}
    costs = replace(fake_costs(0.0), block={2: 1.5, 4: 1.8, 9: 2.6})
    (cand,) = [c for c in predict_candidates(features, None, costs, N, [0.8], max_exits=1, policy="catch_up",
                                             exit_transformers=False) if not c.gated]
    # a deep token: 4 layers; the lone exited one: 1 layer + 3 owed at (1.5 - 1) / 1; the run of 3: 1 + 3 * 0.8 / 3
    assert cand.seconds_per_token == pytest.approx((4 * 4 + (1 + 3 * 0.5) + 3 * (1 + 3 * 0.8 / 3)) / 8)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from freevlm.data.synthetic import SyntheticConfig, write_synthetic
    from freevlm.default import build_default_model
    from freevlm.exits import ExitSpec, build_exits, save_exits
    from tests.test_default import tiny_default

    root = tmp_path_factory.mktemp("plan")
    data = write_synthetic(SyntheticConfig(n_train=4, n_val=10, n_test=4, n_nocaps=2, n_dialogs=2), root / "data")
    bb = build_default_model(tiny_default(), seed=0)
    bb.model.save_pretrained(root / "backbone")
    bb.processor.save_pretrained(root / "backbone")
    torch.manual_seed(0)
    save_exits(root / "exits", bb.lm, build_exits(bb.lm, ExitSpec("transformer", [2, 4])), "tiny")
    other = build_exits(bb.lm, ExitSpec("transformer", [2, 4]))  # initialised alike: perturbed, as training would
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_exits(root / "other-exits", bb.lm, other, "tiny")
    save_exits(root / "draft-exits", bb.lm, build_exits(bb.lm, ExitSpec("transformer", [3])), "tiny")
    return root, data.root


def test_cost_model_has_every_kind_of_work(workspace):
    root, _ = workspace
    vlm = EarlyExitVLM.from_pretrained(root / "backbone", root / "exits")
    costs = measure_costs(vlm, repeats=3, number=2)
    for name in ("layer", "exit_layer", "head", "gate", "kv_projection", "kv_copy"):
        value = getattr(costs, name)
        assert math.isfinite(value) and value > 0, name
    # the step's fixed part is a difference of two timings (a whole step minus its layers and head), clamped at 0:
    # on a loaded machine it can come out 0, so only its range is asserted
    assert math.isfinite(costs.step) and costs.step >= 0
    assert sorted(costs.block) == [2, 4, 9] and all(v > 0 for v in costs.block.values())
    assert costs.call == 0.0  # no representative call given
    assert MeasuredCosts.from_json(json.loads(json.dumps(costs.to_json()))) == costs


def test_catch_up_steps_are_priced_by_block_size(workspace):
    from freevlm.generation.engine import StepRecord
    from freevlm.planning.costs import step_seconds

    # one step: 3 layer calls over 2 tokens, 9 over 1; one exit call over 2 tokens; the final head
    rec = StepRecord.zeros(1, N, "cpu", False)
    rec.heads += 1
    rec.blocks, rec.exit_blocks = {2: 3, 1: 9}, {2: 1}
    costs = replace(fake_costs(10.0), exit_layer=0.5)
    assert step_seconds(rec, costs, torch.tensor([0]), N) == pytest.approx(3 * 1.2 + 9 * 1 + 0.5 * 1.2 + 10)
    # the engine logs every together step's blocks, and they add up to its layer-token counts
    root, data = workspace
    vlm = EarlyExitVLM.from_pretrained(root / "backbone", root / "exits")
    images = sorted((data / "images").rglob("*.png"))[:1]
    res = vlm.generate(images, ["a photo of"], DecodeOptions(threshold=0.025, kv_policy="catch_up",
                                                             max_new_tokens=8), tokenizer_decode=False)
    steps = [r for r in res.records if not r.prefill]
    assert steps and all(r.blocks is not None for r in steps)
    assert any(q > 1 for r in steps for q in r.blocks)  # at this threshold (fixed seed) exited tokens ride along
    assert [sum(q * c for q, c in r.blocks.items()) for r in steps] == [float(r.layers[0]) for r in steps]
    assert [sum(q * c for q, c in r.exit_blocks.items()) for r in steps] == [float(r.exit_layers[0]) for r in steps]


def run(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def test_plan_command_writes_a_plan_that_evaluate_and_sweep_accept(workspace, tmp_path, capsys):
    root, data = workspace
    common = ["--backbone", root / "backbone", "--exits", root / "exits", "--data", data]
    run("plan", *common, "--out", tmp_path / "plan", "--thresholds", 0.5, 0.9, "--candidates", 2,
        "--draft-lengths", 2, "--verify-limit", 2, "--speed-images", 1, "--no-progress")
    printed = capsys.readouterr().out
    assert "early exit:" in printed and "measured tok/s" in printed
    plan = read_plan(tmp_path / "plan")
    assert (tmp_path / "plan" / "costs.json").is_file()
    assert (tmp_path / "plan" / plan["gates_root"] / "alpha-0.5").is_dir()
    assert ["gates/" + p.name for p in (tmp_path / "plan" / "gates").iterdir()] == [plan["gates_root"]]
    assert set(plan["early_exit"]["exits"]) <= {2, 4}
    assert plan["speculative"]["draft_layer"] in (2, 4) and plan["speculative"]["draft_length"] == 2
    assert set(plan["verification"]["measured_tokens_per_second"]) >= {"full_depth", "hf_generate"}
    # a second run into the same folder is refused without --overwrite
    assert main([str(a) for a in ("plan", *common, "--out", tmp_path / "plan", "--no-progress")]) != 0
    assert "already holds results" in capsys.readouterr().err

    # a plan that checks only exit 2 at a threshold every token passes: every token leaves there
    forced = json.loads((tmp_path / "plan" / "plan.json").read_text())
    forced["early_exit"] = {"exits": [2], "threshold": 0.001, "gated": False, "gates": None,
                            "kv_policy": "catch_up"}
    (tmp_path / "forced").mkdir()
    (tmp_path / "forced" / "plan.json").write_text(json.dumps(forced))
    run("evaluate", *common, "--plan", tmp_path / "forced", "--out", tmp_path / "eval.json", "--limit", 2,
        "--no-official", "--no-progress")
    result = json.loads((tmp_path / "eval.json").read_text())
    layers = {layer for p in result["predictions"] for layer in p["exit_layers"]}
    assert layers == {2}
    run("sweep", *common, "--plan", tmp_path / "forced", "--out", tmp_path / "sweep", "--thresholds", 0.001,
        "--limit", 2, "--no-progress")
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["0.001"]["exit_fractions"]["2"] == 1.0


def test_plan_settings_reach_the_decoding_options(tmp_path):
    gates = tmp_path / "gates" / "alpha-0.7"
    gates.mkdir(parents=True)
    plan = {"format": "freevlm-plan/1",
            "early_exit": {"exits": [2], "threshold": 0.7, "gated": True, "gates": "gates/alpha-0.7",
                           "gate_threshold": 0.4, "kv_policy": "catch_up"},
            "speculative": {"draft_layer": 4, "draft_length": 3, "draft_threshold": 0.5}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    raw, plan = plan, read_plan(tmp_path)
    ee = apply_plan(DecodeOptions(), plan)
    assert (ee.exit_layers, ee.threshold, ee.kv_policy, ee.gate_threshold) == ([2], 0.7, "catch_up", 0.4)
    assert ee.gates == str(gates.resolve())
    sp = apply_plan(DecodeOptions(mode="speculative"), plan)
    assert (sp.draft_layer, sp.draft_length, sp.draft_threshold) == (4, 3, 0.5)
    assert ee.head_subset is None and sp.head_subset is None and not sp.draft_adapt
    subset_plan = {**raw, "token_ranking": "token_ranking.json",
                   "early_exit": {**raw["early_exit"], "head_subset": 8},
                   "speculative": {**raw["speculative"], "head_subset": 16, "draft_adapt": True}}
    (tmp_path / "s" / "gates" / "alpha-0.7").mkdir(parents=True)
    (tmp_path / "s" / "plan.json").write_text(json.dumps(subset_plan))
    subset_plan = read_plan(tmp_path / "s")
    ee, sp = apply_plan(DecodeOptions(), subset_plan), apply_plan(DecodeOptions(mode="speculative"), subset_plan)
    ranking = str((tmp_path / "s" / "token_ranking.json").resolve())
    assert (ee.head_subset, ee.token_ranking, sp.head_subset, sp.token_ranking) == (8, ranking, 16, ranking)
    assert sp.draft_adapt
    full = apply_plan(DecodeOptions(), {**plan, "early_exit": {"exits": []}})
    assert full.mode == "full"
    assert apply_plan(replace(DecodeOptions(), mode="full"), plan).mode == "full"


def test_a_plan_for_other_exits_is_refused(workspace, tmp_path, capsys):
    from freevlm.eval.planning import check_plan
    from freevlm.planning.gates import exits_fingerprint

    root, data = workspace
    vlm = EarlyExitVLM.from_pretrained(root / "backbone", root / "exits")
    other = EarlyExitVLM.from_pretrained(root / "backbone", root / "other-exits")

    plan = {"format": "freevlm-plan/1", "exits_fingerprint": exits_fingerprint(vlm.exits), "exit_layers": [2, 4]}
    check_plan(plan, vlm.exits)
    with pytest.raises(FreeVLMError, match="made for other exits"):
        check_plan(plan, other.exits)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "plan.json").write_text(json.dumps({**plan, "early_exit": {"exits": [2], "threshold": 0.5}}))
    code = main([str(a) for a in ("evaluate", "--backbone", root / "backbone", "--exits", root / "other-exits",
                                  "--data", data, "--plan", tmp_path / "p", "--out", tmp_path / "e.json",
                                  "--no-progress")])
    assert code != 0 and "made for other exits" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "plan.json").write_text("{}")
    code = main([str(a) for a in ("evaluate", "--backbone", root / "backbone", "--exits", root / "exits",
                                  "--data", data, "--plan", tmp_path / "bad", "--out", tmp_path / "e2.json")])
    assert code != 0 and "not a freevlm plan" in capsys.readouterr().err


def test_plan_tries_head_subsets(workspace, tmp_path, capsys):
    """`--head-subsets`: the ranking is saved beside the plan, subset candidates are predicted and decoded, drafts are
    tried with the subset head, and the plan's settings decode through `--plan`."""
    from freevlm.generation.vocab import load_token_ranking

    root, data = workspace
    common = ["--backbone", root / "backbone", "--exits", root / "exits", "--data", data]
    run("plan", *common, "--out", tmp_path / "plan", "--thresholds", 0.5, "--candidates", 2, "--kv-policies",
        "propagate", "--draft-lengths", 2, "--head-subsets", 8, "--verify-split", "none", "--no-progress")
    plan = read_plan(tmp_path / "plan")
    ranking = load_token_ranking(tmp_path / "plan")
    assert ranking is not None and plan["head_subsets"] == [8]
    assert {row["head_subset"] for row in plan["speculative_settings"]} == {None, 8}
    assert all("head_subset" in row for row in plan["evaluated"])
    forced = json.loads((tmp_path / "plan" / "plan.json").read_text())
    forced["early_exit"] = {"exits": [2], "threshold": 0.001, "gated": False, "gates": None, "kv_policy": "propagate",
                            "head_subset": 8}
    (tmp_path / "plan" / "plan.json").write_text(json.dumps(forced))
    vlm = EarlyExitVLM.from_pretrained(root / "backbone", root / "exits")
    opts = apply_plan(DecodeOptions(max_new_tokens=4), read_plan(tmp_path / "plan"))
    image = next(Path(data).rglob("*.png"))
    res = vlm.generate([image], ["a photo of"], opts, tokenizer_decode=False)
    assert res.work.head_subset.size == 8
    assert all(layer == 2 for layer in res.exit_layers[0])  # every token leaves at exit 2: from the subset
    assert all(t in res.work.head_subset.ids.tolist() for t in res.sequences[0].tolist())


def test_plan_drafts_with_separate_drafting_exits(workspace, tmp_path, capsys):
    """`--draft-exits`: the speculative settings are chosen among the drafting exits' layers, the plan records them,
    and a plan made with them is refused without them (or with other ones) and decodes through `--plan` with them."""
    from freevlm.eval.planning import check_plan

    root, data = workspace
    common = ["--backbone", root / "backbone", "--exits", root / "exits", "--data", data]
    run("plan", *common, "--draft-exits", root / "draft-exits", "--out", tmp_path / "plan", "--thresholds", 0.5,
        "--candidates", 1, "--kv-policies", "propagate", "--draft-lengths", 2, "--verify-split", "none",
        "--no-progress")
    plan = read_plan(tmp_path / "plan")
    assert plan["draft_exit_layers"] == [3] and plan["exit_layers"] == [2, 4]
    assert {row["draft_layer"] for row in plan["speculative_settings"]} == {3}
    vlm = EarlyExitVLM.from_pretrained(root / "backbone", root / "exits", draft_exits=root / "draft-exits")
    check_plan(plan, vlm.exits, vlm.draft_exits)
    with pytest.raises(FreeVLMError, match="give them with --draft-exits"):
        check_plan(plan, vlm.exits)
    with pytest.raises(FreeVLMError, match="made for other drafting exits"):
        check_plan(plan, vlm.exits, EarlyExitVLM.from_pretrained(root / "backbone", root / "other-exits").exits)
    with pytest.raises(FreeVLMError, match="made without separate drafting exits"):
        check_plan({**plan, "draft_exits_fingerprint": None}, vlm.exits, vlm.draft_exits)
    code = main([str(a) for a in ("evaluate", *common, "--plan", tmp_path / "plan", "--mode", "speculative",
                                  "--out", tmp_path / "e.json", "--no-progress")])
    assert code != 0 and "--draft-exits" in capsys.readouterr().err
    run("evaluate", *common, "--draft-exits", root / "draft-exits", "--plan", tmp_path / "plan", "--mode",
        "speculative", "--out", tmp_path / "spec.json", "--limit", 2, "--no-official", "--no-progress")
    run("evaluate", *common, "--mode", "full", "--out", tmp_path / "full.json", "--limit", 2, "--no-official",
        "--no-progress")
    spec, full = (json.loads((tmp_path / f).read_text()) for f in ("spec.json", "full.json"))
    assert [p["prediction"] for p in spec["predictions"]] == [p["prediction"] for p in full["predictions"]]


def test_the_alpha_one_sweep_decode_stands_in_for_the_planners_full_depth_decode(workspace):
    """The demo hands the planner its alpha = 1 dev decode (`full_dev`) instead of decoding full depth again: the two
    give the same quality and per-image scores (alpha = 1 checks no exit), so the plan's bound is unchanged."""
    from freevlm.data.synthetic import load_synthetic_captions
    from freevlm.eval.evaluate import evaluate_captions
    from freevlm.eval.planning import _scored, scored_result

    root, data = workspace
    vlm = EarlyExitVLM.from_pretrained(root / "backbone", root / "exits")
    dev = load_synthetic_captions(data, "val")[:6]
    swept = evaluate_captions(vlm, dev, DecodeOptions(threshold=1.0), official=False, progress=False)
    assert scored_result("caption", dev, swept) == _scored(vlm, "caption", dev, DecodeOptions(mode="full"), 32, False)
