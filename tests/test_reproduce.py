"""`freevlm reproduce --quick` end to end (slow), and the report's claim logic on hand-made results."""

from __future__ import annotations

import pytest

from freevlm.reproduce import quick_config
from freevlm.reproduce.claims import _interp, _verdict, claims


def test_interpolating_a_speedup_quality_curve():
    curve = [(1.0, 100.0), (2.0, 80.0), (3.0, 50.0)]
    assert _interp(curve, 1.5) == 90.0
    assert _interp(curve, 0.5) == 100.0 and _interp(curve, 4.0) == 50.0


def _run(free_cidEr, noadv_cider, drop_backbone, drop_free, linear_curve):
    curve = {0.5: {"parameter_speedup": 2.0, "compute_speedup": 1.2, "quality": 80.0},
             1.0: {"parameter_speedup": 1.0, "compute_speedup": 1.0, "quality": 90.0}}
    deeblip = {0.8: {"parameter_speedup": 1.5, "compute_speedup": 1.4, "quality": 84.0}}
    return {
        "curves": {"FREE": curve, "DeeBLIP": deeblip},
        "methods": {"FREE": {"metrics": {"CIDEr": free_cidEr}}, "no-adversarial": {"metrics": {"CIDEr": noadv_cider}},
                    "DeeBLIP": {"setting": 0.8}},
        "noise": {"0.0": {"backbone": {"CIDEr": 1.0}, "FREE": {"CIDEr": 1.0}},
                  "2.0": {"backbone": {"CIDEr": 1.0 - drop_backbone}, "FREE": {"CIDEr": 1.0 - drop_free}}},
        "per_layer": {"linear head per layer (vanilla EE)": linear_curve},
    }


def test_claims_are_judged_from_the_numbers_whichever_way_they_go():
    cfg = quick_config()
    cfg.methods, cfg.ablations, cfg.noise_sigmas = ("FREE", "DeeBLIP"), ("no-adversarial",), (0.0, 2.0)
    dipping = {"1": 50.0, "2": 60.0, "3": 40.0, "4": 70.0}
    good = [_run(1.2, 1.1, 0.3, 0.1, dipping) for _ in range(3)]
    text = "\n".join(claims(good, cfg))
    # FREE's curve at parameter speedup 1.5 interpolates to 85 >= DeeBLIP's 84; at compute speedup 1.4 it is past
    # FREE's fastest point (1.2, quality 80 < 84)
    assert ("FREE vs DeeBLIP at equal speedup** (dev curves): FREE is at least as good in 3/3 seeds at equal "
            "parameter speedup (the paper's measure) → holds here; at equal compute speedup in 0/3 → does not hold"
            in text)
    assert "adversarial term helps** (test CIDEr, FREE − no-adversarial): 10.0 ± 0.0 → holds" in text
    assert "observed in 3/3 seeds → holds" in text
    assert "FREE drops less in 3/3 seeds → holds" in text
    monotone = {"1": 50.0, "2": 60.0, "3": 65.0, "4": 70.0}
    bad = [_run(1.0, 1.1, 0.1, 0.3, monotone) for _ in range(3)]
    text = "\n".join(claims(bad, cfg))
    assert "FREE − no-adversarial): -10.0 ± 0.0 → does not hold" in text
    assert "observed in 0/3 seeds → does not hold" in text
    assert "FREE drops less in 0/3 seeds → does not hold" in text


def test_a_difference_within_its_spread_over_seeds_is_inconclusive():
    assert _verdict([1.0, 2.0, 3.0]) == "holds"  # mean 2 > std 1
    assert _verdict([-1.0, -2.0, -3.0]) == "does not hold"
    assert _verdict([0.5, -0.1, 0.2]).startswith("inconclusive")  # mean 0.2 < std 0.3


def test_capfilt_vs_kd_is_judged_at_the_table10_alpha():
    cfg = quick_config()
    cfg.methods, cfg.ablations, cfg.noise_sigmas, cfg.per_layer = ("FREE",), (), (0.0,), False

    def run(cap_cider, cap_speed):
        row = {"metrics": {"CIDEr": 2.0}, "speed": {"parameter_speedup": 1.0}}  # the dev choice: alpha 1 for both
        fixed = {"KD": (2.0, 1.2), "CapFilt": (cap_cider, cap_speed)}
        r = {"curves": {"FREE": {}}, "methods": {},
             "unsupervised": {k: {**row, "at_table10_alpha": {"metrics": {"CIDEr": c}, "speed": {
                 "parameter_speedup": sp}}} for k, (c, sp) in fixed.items()}}
        return r

    text = "\n".join(claims([run(2.1, 1.3), run(2.2, 1.4), run(2.3, 1.3)], cfg))
    assert "test CIDEr difference 20.0 ± 10.0 → holds; parameter-speedup difference 0.13 ± 0.06 → holds" in text
    assert "overall → holds here" in text
    text = "\n".join(claims([run(2.1, 1.1), run(2.2, 1.1), run(2.3, 1.1)], cfg))
    assert "difference -0.10 ± 0.00 → does not hold; overall → holds in part here" in text


@pytest.mark.slow
@pytest.mark.java
def test_quick_reproduce_writes_a_report(tmp_path):
    from freevlm.reproduce import reproduce

    folder = reproduce(tmp_path, quick=True, progress=False, methods=["DeeBLIP", "LeeBERT", "MuE"])
    text = (folder / "README.md").read_text()
    for heading in ("Table 4", "Table 1", "Table 6", "Table 11", "Fig. 4b", "Fig. 3", "CapFilt rankers", "Table 9",
                    "Exit plan", "Speculative decoding (lossless)", "claims"):
        assert heading in text
    rankers = text.split("## CapFilt rankers")[1].split("## ")[0]
    rows = [line.split("|")[1].strip() for line in rankers.splitlines() if line.startswith("|")][2:]
    assert [r.split()[0] for r in rows] == ["random", "backbone", "tiny", "oracle"]
    assert "ranked by the embedded default's tiny CLIP" in text
    assert (tmp_path / "pretrain-s0" / "clip" / "config.json").is_file()
    table4 = text.split("## Table 4")[1].split("## ")[0]
    rows = [line.split("|")[1].strip() for line in table4.splitlines() if line.startswith("|")]
    assert rows[2:] == ["backbone (full depth)", "FREE", "FREE + plan", "DeeBLIP", "LeeBERT", "MuE", "no-adversarial"]
    assert "**FREE vs LeeBERT at equal speedup**" in text
    for png in ("per_layer.png", "exit_histogram.png", "speedup_vs_quality_param.png"):
        assert (folder / png).stat().st_size > 1000
    assert "src tree: `" in text
    assert_wall_column(text, ("Table 4", "Table 1", "Fig. 4a", "Table 6", "Table 9", "FREE: quality vs alpha"))


def assert_wall_column(text: str, tables) -> None:
    """Every row of each table carries a measured wall-clock speedup (a number, not '-')."""
    for table in tables:
        lines = [ln for ln in text.split(f"## {table} ")[1].split("\n## ")[0].splitlines() if ln.startswith("|")]
        header = [c.strip() for c in lines[0].split("|")]
        at = next(i for i, c in enumerate(header) if c.startswith("wall"))
        for line in lines[2:]:
            cell = line.split("|")[at].strip()
            assert float(cell.split()[0]) > 0, (table, line)


@pytest.mark.slow
@pytest.mark.java
def test_quick_full_reproduce_covers_vqa_visdial_and_other_backbones(tmp_path):
    from freevlm.reproduce import reproduce

    cfg = quick_config()
    cfg.per_layer = cfg.unsupervised = False
    cfg.noise_sigmas = (0.0,)
    cfg.visdial_dialogs = 1
    folder = reproduce(tmp_path, full=True, progress=False, config=cfg)
    text = (folder / "README.md").read_text()
    for heading in ("Table 2", "Table 3", "VisDial MRR", "Table 5", "Table 7", "Table 8"):
        assert heading in text
    assert_wall_column(text, ("Table 2", "Table 3", "Table 5", "Table 7", "Table 8"))


def test_a_table_is_a_module_with_a_measurement_stored_at_its_key_and_a_section_in_order(tmp_path):
    from freevlm.reproduce.report import write_report
    from freevlm.reproduce.run import _store
    from freevlm.reproduce.tables import TABLES
    from freevlm.reproduce.tables.base import Table, section

    names = [t.render.__module__.rsplit(".", 1)[1] for t in TABLES]
    assert names.index("exit_quality") < names.index("fig3")  # Fig. 3 reads the exit-quality measurement
    result: dict = {}
    _store(result, ("other_backbones", "fam", "caption"), {"x": 1})
    _store(result, ("other_backbones", "fam", "vqa"), {"x": 2})
    assert result == {"other_backbones": {"fam": {"caption": {"x": 1}, "vqa": {"x": 2}}}}

    cfg = quick_config()
    cfg.methods, cfg.ablations, cfg.noise_sigmas = ("FREE",), (), ()
    extra = Table(lambda rep: section("Extra", f"value {rep.col(['extra', 'v'])}") if rep.has("extra") else [])
    runs = [{"extra": {"v": 0.25}}, {"extra": {"v": 0.35}}]
    write_report(tmp_path / "r", cfg, runs, {}, 1.0, quick=True, full=False, tables=[extra, extra],
                 provenance={"src_tree": "t", "commit": "c" * 12, "dirty": False, "status": ""})
    text = (tmp_path / "r" / "README.md").read_text()
    assert text.count("## Extra\n\nvalue 30.0 ± 7.1\n") == 2
    assert text.index("## Extra") < text.index("## The paper's claims")


def test_a_seed_runs_its_method_loop_then_each_measurement_in_order_at_its_key():
    """`run_seed`: measurements run after the method loop, in table order, when their `when` holds, and a later one
    reads an earlier one's result from the seed's results."""
    from types import SimpleNamespace

    from freevlm.reproduce.run import run_seed
    from freevlm.reproduce.tables.base import Table, full_only

    calls = []

    class FakeRun:
        def __init__(self):
            self.cfg, self.results = quick_config(), {"split": "s"}

        def method_loop(self):
            calls.append("loop")
            self.results["methods"] = {"FREE": {}}
            return SimpleNamespace(core=True)

    def first(run, core):
        calls.append("first")
        assert core.core and "methods" in run.results
        return 1

    def second(run, core):
        calls.append("second")
        return run.results["a"]["b"] + 1

    tables = [Table(lambda rep: [], first, ("a", "b")), Table(lambda rep: [], lambda run, core: 99, ("never",),
                                                              when=full_only),
              Table(lambda rep: []), Table(lambda rep: [], second, ("c",))]
    res = run_seed(FakeRun(), tables, full=False)
    assert calls == ["loop", "first", "second"]
    assert res == {"split": "s", "methods": {"FREE": {}}, "a": {"b": 1}, "c": 2}


def _fake_seed(i: int) -> dict:
    """One seed's results, shaped as `run.run_seed` leaves them, for FREE and DeeBLIP plus the plan and speculative
    measurements (numbers chosen so that the rendered cells are predictable)."""
    metrics = {"BLEU-4": 0.2, "CIDEr": 0.5, "METEOR": 0.25, "ROUGE-L": 0.45}
    row = {"metrics": metrics, "speed": {"parameter_speedup": 1.5, "compute_speedup": 1.4},
           "wall_clock_vs_full_depth": 1.2, "criterion": "confidence", "setting": 0.8, "trainable_per_exit": 1000,
           "exit_fractions": {"2": 0.5, "4": 0.3, "6": 0.2}}
    curve = {0.8: {"quality": 50.0, "parameter_speedup": 1.5, "compute_speedup": 1.4, "wall_clock_vs_full_depth": 1.2}}
    plan_test = {"metrics": {"BLEU-4": 0.21 + 0.02 * i, "CIDEr": 0.55 + 0.1 * i, "METEOR": 0.3, "ROUGE-L": 0.5},
                 "speed": {"parameter_speedup": 1.8, "compute_speedup": 1.6}, "wall_clock_vs_full_depth": 1.3 + 0.2 * i}
    verify = {"quality_drop": {"full_depth": 0.0, "early_exit_plan": 0.5, "speculative_plan": 0.0},
              "predicted_tokens_per_second": {"full_depth": 100.0, "early_exit_plan": 120.0, "speculative_plan": 90.0},
              "measured_tokens_per_second": {"full_depth": 100.0, "early_exit_plan": 100.0, "speculative_plan": 100.0,
                                             "hf_generate": 50.0},
              "prediction_error": {"full_depth": 0.0, "early_exit_plan": 0.2, "speculative_plan": -0.1},
              "vs_full_depth": {"full_depth": 1.0, "early_exit_plan": 1.0, "speculative_plan": 1.0, "hf_generate": 0.5},
              "vs_hf_generate": {"full_depth": 2.0, "early_exit_plan": 2.0, "speculative_plan": 2.0,
                                 "hf_generate": 1.0},
              "speed_images": 2}
    plan = {"choice": {"exits": [2, 4], "threshold": 0.7, "gated": i == 1, "kv_policy": "propagate",
                       "predicted_speedup": 1.5, "plan_dev_quality_drop": 0.4,
                       "speculative": {"draft_layer": 4, "draft_length": 8, "draft_threshold": None,
                                       "acceptance_rate": 0.8}},
            "verify": verify, "test": plan_test, "train_images": 24, "dev_images": 8,
            "dev": {"quality": 48.0 + 2 * i, "parameter_speedup": 1.7, "compute_speedup": 1.5,
                    "wall_clock_vs_full_depth": 1.25}}

    def drafter(kind, accept, vs_full):
        dev = [{"name": "e2-k4", "draft_layer": 2, "draft_length": 4, "draft_threshold": None,
                "acceptance_rate": accept, "tokens_per_verification": 3.0, "layer_calls_per_token": 5.0,
                "vs_full_depth": vs_full},
               {"name": "e4-k8-a0.5", "draft_layer": 4, "draft_length": 8, "draft_threshold": 0.5,
                "acceptance_rate": accept, "tokens_per_verification": 4.0, "layer_calls_per_token": 5.5,
                "vs_full_depth": vs_full}]
        return {"kind": kind, "exit_layers": [2, 4], "dev": dev,
                "best": {"name": "e4-k8-a0.5", "draft_layer": 4, "draft_length": 8, "draft_threshold": 0.5},
                "test": {"identical_outputs": 12 - i, "outputs": 12, "acceptance_rate": accept,
                         "tokens_per_verification": 4.0, "layer_calls_per_token": 5.5, "tokens_per_second": 150.0,
                         "vs_full_depth": vs_full + 0.1 * i, "vs_hf_generate": 2 * vs_full}}

    spec = {"drafters": {"FREE": drafter("transformer", 0.75, 1.5), "DeeBLIP": drafter("linear", 0.25, 0.9)},
            "num_layers": 6, "dev_images": 8, "test_images": 12, "speed_images": 2}
    return {"backbone": {"metrics": metrics}, "methods": {"FREE": row, "DeeBLIP": dict(row, setting=0.9)},
            "curves": {"FREE": curve, "DeeBLIP": curve}, "plan": plan, "speculative": spec}


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}")[1].split("\n## ")[0]


def test_plan_and_speculative_sections_and_the_plan_rows_of_table4_and_fig4b(tmp_path):
    from freevlm.reproduce.tables import TABLES, fig4b, plan, speculative, table4
    from freevlm.reproduce.tables.base import Report

    names = [t.render.__module__.rsplit(".", 1)[1] for t in TABLES]
    assert {"plan", "speculative"} <= set(names) and names.index("table9") < names.index("plan")
    cfg = quick_config()
    cfg.methods, cfg.ablations = ("FREE", "DeeBLIP"), ()
    report = Report([_fake_seed(0), _fake_seed(1)], cfg, tmp_path)

    t4 = "\n".join(table4.render(report))
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in t4.splitlines() if line.startswith("|")][2:]
    assert [r[0] for r in rows] == ["backbone (full depth)", "FREE", "FREE + plan", "DeeBLIP"]
    planned = rows[2]
    assert planned[1:8] == ["22.0 ± 1.4", "60.0 ± 7.1", "30.0 ± 0.0", "50.0 ± 0.0", "1.80 ± 0.00", "1.60 ± 0.00",
                            "1.40 ± 0.14"]
    assert "exits [2, 4], alpha 0.7, propagate / exits [2, 4], alpha 0.7, propagate, gated" in planned[8]
    assert planned[9] == "1,000 + gates"

    f4 = "\n".join(fig4b.render(report))
    line = next(ln for ln in f4.splitlines() if ln.startswith("| FREE + plan"))
    assert [c.strip() for c in line.split("|")[1:-1]] == ["FREE + plan", "49.00", "1.70", "1.50", "1.25 ± 0.00"]
    assert "first 8 dev images" in f4

    ep = "\n".join(plan.render(report))
    assert ep.startswith("## Exit plan")
    assert "| 0    | exits [2, 4], alpha 0.7, propagate " in ep
    assert "exit 4, 8 drafts" in ep and "120 / 100" in ep and "+20%" in ep and "-10%" in ep
    summary = next(ln for ln in ep.splitlines() if ln.startswith("| early exit (plan)"))
    assert [c.strip() for c in summary.split("|")[1:-1]] == ["early exit (plan)", "120 ± 0", "100 ± 0", "20.0 ± 0.0",
                                                            "1.00 ± 0.00", "2.00 ± 0.00", "0.50 ± 0.00"]

    sp = "\n".join(speculative.render(report))
    assert sp.startswith("## Speculative decoding (lossless): which drafter is best")
    free = next(ln for ln in sp.splitlines() if ln.startswith("| FREE (transformer)"))
    cells = [c.strip() for c in free.split("|")[1:-1]]
    assert cells[1] == "exit 4, 8 drafts, adaptive 0.5 / exit 4, 8 drafts, adaptive 0.5"
    assert cells[2:] == ["75.0 ± 0.0", "4.00 ± 0.00", "5.50 ± 0.00", "12/12; 11/12", "150 ± 0", "1.55 ± 0.07",
                         "3.00 ± 0.00"]
    assert "| DeeBLIP (linear)" in sp and "**Best drafter here: FREE** (1.55x" in sp
    assert "ranked: FREE 1.55x, DeeBLIP 0.95x)" in sp
    assert "| DeeBLIP  | e2-k4" in sp or "| DeeBLIP | e2-k4" in sp

    bare = Report([{k: v for k, v in _fake_seed(0).items() if k not in ("plan", "speculative")}], cfg, tmp_path)
    assert plan.render(bare) == [] and speculative.render(bare) == []
    assert "FREE + plan" not in "\n".join(table4.render(bare)) + "\n".join(fig4b.render(bare))


def test_drafters_are_free_then_the_methods_whose_exits_can_draft():
    from freevlm.reproduce.tables.speculative import draft_layers, drafter_names, grid

    trained = dict.fromkeys(["DeeBLIP", "FREE", "MuE", "PABEE-BLIP", "per-layer-linear", "no-adversarial"])
    assert drafter_names(("DeeBLIP", "FREE", "MuE", "PABEE-BLIP", "LeeBERT"), trained) == [
        "FREE", "DeeBLIP", "MuE", "PABEE-BLIP"]
    assert draft_layers([2, 4]) == [2, 4] and draft_layers([3, 6, 8, 10]) == [3, 8] and draft_layers([5]) == [5]
    assert grid([2, 4]) == [(2, 4, None), (2, 8, None), (4, 4, None), (4, 8, None), (2, 8, 0.5), (4, 8, 0.5)]


def test_a_full_depth_plan_says_why():
    from freevlm.reproduce.tables.plan import _because, describe

    nothing_faster = {"early_exit": {"exits": []}, "evaluated": []}
    none_kept = {"early_exit": {"exits": []}, "evaluated": [{"exits": [2]}]}
    assert _because({"early_exit": {"exits": [2]}, "evaluated": [{}]}) is None
    assert describe({"exits": [], "full_depth_because": _because(nothing_faster)}) == (
        "full depth (no candidate predicted faster than full depth)")
    assert describe({"exits": [], "full_depth_because": _because(none_kept)}) == (
        "full depth (no candidate within the quality bound on dev)")
    assert describe({"exits": [4], "threshold": 0.9, "kv_policy": "catch_up", "gated": True}) == (
        "exits [4], alpha 0.9, catch_up, gated")
