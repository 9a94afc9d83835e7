"""`freevlm demo`: the whole method once, on the embedded default, in a few CPU minutes.

setup -> fit -> validate, as the paper's protocol (§4) lays it out:
1. synthetic data + tiny BLIP-2-architecture VLM, pretrained (cached);
2. stage 1: fine-tune the backbone on 80% of the validation split (captions);
3. stage 2: FREE exits (semi-supervised: CE + adversarial) on the same 80%;
4. choose alpha on the other 20% (the development split), and plan: which exits to check, gates, KV policy, and
   the speculative mode's drafting exit, from costs measured on this machine (`freevlm plan`);
5. report on the test split: quality with and without exits, the three speedups, exit fractions, and wall-clock
   tokens/s of full depth, FREE (at the chosen alpha and with its plan), lossless speculative decoding, and
   transformers' generate, measured side by side.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from freevlm.data.splits import split_by_image, split_record
from freevlm.data.synthetic import load_synthetic_captions
from freevlm.default import DefaultConfig, describe_default, pretrained_default
from freevlm.eval.bootstrap import cider_difference, format_interval
from freevlm.eval.evaluate import PAPER_THRESHOLDS, evaluate_captions, select_threshold, speed_comparison
from freevlm.eval.planning import make_plan, scored_result
from freevlm.eval.report import markdown_table
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.generation.criteria import make_criterion
from freevlm.machine import system_info
from freevlm.outputs import write_json
from freevlm.planning.plan import apply_plan, read_plan, write_plan
from freevlm.train.batches import CAPTION_PROMPT, Example, caption_examples
from freevlm.train.loop import LoopConfig, OptimConfig
from freevlm.train.stage1 import Stage1Config, train_backbone
from freevlm.train.stage2 import ExitTrainConfig, train_exits

DEFAULT_ALPHA = DecodeOptions().threshold  # 0.8, the paper's Table 10 value


def demo_stage1() -> Stage1Config:
    # The paper's 10 epochs at 1e-5 suit a pretrained 3.8B model; the tiny default gets a few epochs at 1e-4.
    return Stage1Config(optim=OptimConfig(name="adam", lr=1e-4, decay_every_epochs=3),
                        loop=LoopConfig(epochs=2, batch_size=32))


def demo_stage2(exit_layers=None) -> ExitTrainConfig:
    # Scaled for a ~200-step run on a 128-wide LM: Table 10's 500 warm-up steps -> 20; lr 1e-5 -> 1e-3 for the exits
    # and 1e-4 for the discriminators (at 1e-3 they oscillate); discriminator hidden 3072 -> 512, since 3072 on a
    # 128-wide model would cost about two LM layers per position and dominate the run.
    return ExitTrainConfig(exit_layers=exit_layers, optim=OptimConfig(name="adamw", lr=1e-3, warmup_steps=20),
                           discriminator_lr=1e-4, discriminator_hidden=512, loop=LoopConfig(epochs=3, batch_size=32))


def demo(out: str | Path = "runs/demo", seed: int = 0, speed_images: int = 16, progress: bool = True,
         config: DefaultConfig | None = None, stage1: Stage1Config | None = None,
         stage2: ExitTrainConfig | None = None, plan_train: int = 300, plan_dev: int | None = None) -> dict:
    """Run the demo; `config`, `stage1`, `stage2` override the embedded default's settings (tests use tiny ones)."""
    out = Path(out)
    start = time.perf_counter()
    cfg = config or DefaultConfig()
    print("[1/5] embedded default: synthetic data + tiny BLIP-2 (OPT LM), pretraining (cached after the first run)")
    data_root, backbone = pretrained_default(out, cfg, seed=seed, progress=progress)
    info = _describe(backbone)
    val = load_synthetic_captions(data_root, "val")
    train, dev = split_by_image(val, seed)
    test = load_synthetic_captions(data_root, "test")
    print(f"      data: {len(train)} train / {len(dev)} dev images (80/20 of val), {len(test)} test images")

    print("[2/5] stage 1: fine-tune the backbone (Q-Former, projection, vision; LM frozen) on the 80%")
    s1 = stage1 or demo_stage1()
    s1.loop.seed, s1.loop.progress = seed, progress
    train_backbone(backbone, caption_examples(train), s1, out / f"stage1-s{seed}", resume=True)

    print("[3/5] stage 2: FREE exits (exit transformer + frozen head, CE + adversarial) on the 80%")
    s2 = stage2 or demo_stage2()
    s2.loop.seed, s2.loop.progress = seed, progress
    exits, _ = train_exits(backbone, caption_examples(train), s2, out / f"free-s{seed}", resume=True)
    vlm = EarlyExitVLM(backbone, exits)
    split = split_record(train, dev, seed, 0.8)
    return compare(vlm, out, seed, train, dev, test, model=info, model_label="BLIP-2-arch tiny (full depth)",
                   split=split, config={"default": asdict(cfg), "stage1": asdict(s1), "stage2": asdict(s2)},
                   start=start, speed_images=speed_images, plan_train=plan_train, plan_dev=plan_dev,
                   progress=progress)


def demo_real(out: str | Path = "runs/real", seed: int = 0, progress: bool = True, config=None, *, lm=None,
              tokenizer=None, plan_train: int = 300) -> dict:
    """The demo on the real embedded VLM (`freevlm.real`): the embedded default's trained ViT + Q-Former in front of
    SmolLM2-135M-Instruct, its projection trained (stage 1), FREE exits (stage 2), then the same alpha choice, plan
    and test comparison as `demo`, every quality figure with its paired-bootstrap interval. `lm`/`tokenizer` replace
    SmolLM2 (tests: a tiny random Llama)."""
    from freevlm.real import RealConfig, real_backbone, real_draft_exits, real_exits, real_splits

    out = Path(out)
    start = time.perf_counter()
    cfg = config or RealConfig()
    print("[1/5] the embedded default's data and trained ViT + Q-Former (pretrained once, cached) in front of "
          f"{'SmolLM2-135M-Instruct (GGUF converted once, cached)' if lm is None else 'the given LM'}; stage 1: "
          f"the projection alone ({cfg.stage1.loop.max_steps} steps of {cfg.stage1.loop.batch_size}, cached)")
    data_root, backbone = real_backbone(out, cfg, seed, lm=lm, tokenizer=tokenizer, progress=progress)
    info = _describe(backbone)
    train, dev, test = real_splits(data_root, seed, cfg)
    print(f"      data: {len(train)} train / {len(dev)} dev / {len(test)} test images")
    print(f"[2/5] (stage 1 done) stage 2: FREE exits at layers {list(cfg.stage2.exit_layers)} "
          f"({cfg.stage2.loop.max_steps} steps of {cfg.stage2.loop.batch_size}, cached)")
    exits = real_exits(backbone, out, train, cfg, seed, progress=progress)
    draft = None
    if cfg.draft is not None:
        print(f"      speculative mode's drafting exit at layer {cfg.draft.exit_layers[0]}: distilled on the model's "
              f"own greedy captions of the training images ({cfg.draft.loop.max_steps} steps, cached)")
        draft = real_draft_exits(backbone, out, train, cfg, seed, progress=progress)
    vlm = EarlyExitVLM(backbone, exits, draft_exits=draft)
    print("[3/5] (stage 2 done)")
    return compare(vlm, out, seed, train, dev, test, model=info, model_label="SmolLM2-135M VLM (full depth)",
                   split=split_record(train, dev, seed, 0.8), config=asdict(cfg), start=start,
                   speed_images=cfg.speed_images, plan_train=plan_train, plan_dev=None, progress=progress,
                   batch_size=cfg.eval_batch_size, head_subsets=cfg.draft_subsets)


def _describe(backbone) -> dict:
    info = describe_default(backbone)
    print(f"      LM: {info['lm_layers']} layers x {info['lm_layer_parameters']:,} params; LM head "
          f"{info['lm_head_parameters']:,} params (= {info['head_cost_in_layers']:.2f} layers); vocabulary "
          f"{info['vocabulary']}")
    return info


def decodes_as_full_depth(options: DecodeOptions) -> bool:
    """Whether these options decode as full depth by construction: mode "full" (a full-depth plan applies as that),
    or ungated early exit whose criterion never fires (confidence at alpha = 1, entropy at 0), where the engine checks
    no exit (tested against transformers `generate` in tests/generation/test_engine.py)."""
    if options.mode == "full":
        return True
    return (options.mode == "early_exit" and options.gates is None
            and make_criterion(options.criterion, options.threshold).never_exits())


def compare(vlm: EarlyExitVLM, out: Path, seed: int, train, dev, test, *, model: dict, model_label: str, split: dict,
            config: dict, start: float, speed_images: int, plan_train: int, plan_dev: int | None, progress: bool,
            batch_size: int = 32, head_subsets: tuple[int, ...] = ()) -> dict:
    """Steps 4-5 of every demo: alpha on dev, the plan, then test quality (with paired-bootstrap intervals of each
    CIDEr difference to full depth) and wall-clock tokens/s of every path side by side; prints the tables, writes
    out/demo_report.json."""
    phases = {}  # seconds per step of the comparison (where a demo's time goes)
    tick = time.perf_counter()

    def phase(name: str):
        nonlocal tick
        now = time.perf_counter()
        phases[name] = now - tick
        tick = now

    print(f"[4/5] choose alpha on the dev split from {list(PAPER_THRESHOLDS)} (fast in-process CIDEr)")
    sweep = {a: evaluate_captions(vlm, dev, DecodeOptions(threshold=a), official=False, progress=progress,
                                  batch_size=batch_size) for a in PAPER_THRESHOLDS}
    alpha = select_threshold(sweep, "CIDEr")
    phase("alpha sweep (dev)")
    print("      plan: gates, exits to check, KV policy and the speculative draft setting from measured costs")
    # the planner's gates see a subset of the training split (a demo budget); its quality bound is checked on the
    # whole dev split, against the upper end of the drop's bootstrap interval
    # the sweep's alpha = 1 decodes as full depth (no exit is checked): the planner reuses it on the same dev images
    full_dev = scored_result("caption", dev, sweep[1.0]) if plan_dev is None and 1.0 in sweep and \
        decodes_as_full_depth(DecodeOptions(threshold=1.0)) else None
    plan = make_plan(vlm, "caption", train[:plan_train], dev[:plan_dev], out / f"plan-s{seed}", candidates=4,
                     draft_lengths=(4, 8), spec_images=8, batch_size=batch_size, head_subsets=head_subsets,
                     full_dev=full_dev, progress=progress)
    write_plan(out / f"plan-s{seed}", plan)
    # applied as `--plan` applies it: read back, so that its gates and token ranking (saved relative to the plan's
    # folder) resolve wherever the demo runs from
    resolved = read_plan(out / f"plan-s{seed}")
    planned = apply_plan(DecodeOptions(), resolved)
    speculative = apply_plan(DecodeOptions(mode="speculative"), resolved)
    phase("plan (gates, costs, dev decodes)")

    # The paper picks "the best-performing threshold" on dev, which can be alpha = 1 (no exit at all) when no exit
    # beats the final layer; Table 10 lists 0.8, so the demo also shows that setting side by side.
    shown = [alpha] if alpha == DEFAULT_ALPHA else [alpha, DEFAULT_ALPHA]
    print(f"[5/5] test split ({len(test)} images): full depth, FREE at alpha={' and '.join(map(str, shown))}, "
          f"FREE + plan, speculative; wall-clock on {speed_images} images, batch 1")
    full = evaluate_captions(vlm, test, DecodeOptions(mode="full"), progress=progress, batch_size=batch_size)

    def on_test(options: DecodeOptions):  # a decode that is full depth by construction is not run twice
        if decodes_as_full_depth(options):
            return full
        return evaluate_captions(vlm, test, options, progress=progress, batch_size=batch_size)

    free = {a: on_test(DecodeOptions(threshold=a)) for a in shown}
    with_plan = on_test(planned)
    spec = on_test(speculative)
    phase("test decodes")
    full_text = {p["key"]: p["prediction"] for p in full.predictions}
    identical = sum(p["prediction"] == full_text[p["key"]] for p in spec.predictions)
    refs = {s.image_id: s.captions for s in test}
    speed_examples = [Example(s.image_id, s.image_path, CAPTION_PROMPT, None) for s in test[:speed_images]]
    # one interleaved run: every path's ratio to full depth and to transformers' generate is measured side by side
    also = {**{f"FREE alpha={a}": DecodeOptions(threshold=a) for a in shown}, "FREE + plan": planned,
            "speculative (lossless)": speculative}
    same_as_full = [name for name, options in also.items() if decodes_as_full_depth(options)]
    wall = speed_comparison(vlm, speed_examples, DecodeOptions(mode="full"), repeats=3, batch_size=1,
                            also={k: v for k, v in also.items() if k not in same_as_full})
    phase("wall-clock table")

    labels = {DEFAULT_ALPHA: f"FREE, alpha={DEFAULT_ALPHA} (Table 10)", alpha: f"FREE, alpha={alpha} (chosen on dev)"}
    rows, intervals = [], {}
    for name, r in ((model_label, full), *((labels[a], free[a]) for a in shown), ("FREE + plan", with_plan),
                    ("speculative (lossless)", spec)):
        m = r.metrics
        if r is full:
            shift = "-"
        else:
            intervals[name] = cider_difference(full_text, {p["key"]: p["prediction"] for p in r.predictions}, refs,
                                               seed=seed)
            shift = format_interval(intervals[name])
        rows.append([name, 100 * m["BLEU-4"], 100 * m["METEOR"], 100 * m["ROUGE-L"], 100 * m["CIDEr"], shift,
                     r.speed["parameter_speedup"], r.speed["compute_speedup"]])
    print(f"\nQuality on the synthetic test split, {len(test)} images (x100, as the paper prints; CIDEr vs full "
          "depth: difference and paired-bootstrap 95% interval):")
    print(markdown_table(["model", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CIDEr vs full [95% CI]",
                          "param speedup", "compute speedup"], rows))
    print("\nDev-split sweep (alpha -> in-process CIDEr x100, speedups):")
    print(markdown_table(["alpha", "CIDEr", "param speedup", "compute speedup"],
                         [[a, 100 * r.metrics["CIDEr"], r.speed["parameter_speedup"], r.speed["compute_speedup"]]
                          for a, r in sweep.items()]))
    for a in shown:
        print(f"\nFraction of test tokens leaving at each exit, alpha={a} (last column: the final layer):")
        print(markdown_table([f"layer {k}" for k in free[a].exit_fractions], [list(free[a].exit_fractions.values())]))
    ee, sp = plan["early_exit"], plan["speculative"]
    print(f"\nPlan (dev split, costs measured here; `freevlm plan`; bound: {plan['quality_bound']}):")
    if ee["exits"]:
        print(f"  early exit: check exits {ee['exits']} of {list(vlm.exits.layers)} at alpha {ee['threshold']}, "
              f"{'gated' if ee['gated'] else 'ungated'}, KV policy {ee['kv_policy']}; dev CIDEr drop "
              f"{ee['quality_drop']:.2f} (95% upper end {ee.get('quality_drop_bound', ee['quality_drop']):.2f}, "
              f"bound {plan['max_quality_drop']}), predicted {ee['predicted_speedup']:.2f}x full depth")
    else:
        print(f"  early exit: no exit configuration kept dev CIDEr within {plan['max_quality_drop']}: full depth")
    if sp:
        which = "the drafting exit" if vlm.draft_exits is not None else "exit"
        size = sp.get("head_subset")
        subset = "" if size is None else f", its head scoring the {size} most frequent tokens"
        print(f"  speculative: draft with {which} {sp['draft_layer']}, up to {sp['draft_length']} drafts"
              f"{'' if sp['draft_threshold'] is None else ', adaptive at ' + str(sp['draft_threshold'])}{subset}; "
              f"{sp['acceptance_rate']:.0%} of drafts accepted on dev")
    print(f"  speculative output equals full depth on {identical}/{len(spec.predictions)} test images")
    print(f"\nWall-clock on {len(speed_examples)} test images, batch 1, paths interleaved, median of 3 after a "
          f"warm-up ({system_info()['cpu']}, {torch.get_num_threads()} threads):")
    names = [k for k in wall if k != "ratios"]
    print(markdown_table(["path", "tokens/s", "tokens", "vs full depth", "vs HF generate"],
                         [[k, wall[k]["tokens_per_second"], wall[k]["tokens"],
                           wall[k]["tokens_per_second"] / wall["full_depth"]["tokens_per_second"],
                           wall[k]["tokens_per_second"] / wall["hf_generate"]["tokens_per_second"]] for k in names]))
    if same_as_full:
        print(f"  not timed apart: {', '.join(same_as_full)} (each decodes as full depth: no exit is checked)")
    print("\nTime per step of the comparison: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in phases.items()))
    report = {"alpha": alpha, "model": model, "split": split, "seed": seed, "test_images": len(test),
              "full_depth": full.to_json(), "free": free[alpha].to_json(),
              "free_at_table10_alpha": free[DEFAULT_ALPHA].to_json(),
              "free_plan": with_plan.to_json(), "speculative": spec.to_json(),
              "cider_vs_full_depth": intervals,
              "speculative_identical_to_full": [identical, len(spec.predictions)], "plan": plan,
              "sweep": {str(a): r.to_json() for a, r in sweep.items()}, "wall_clock": wall,
              "not_timed_apart": same_as_full, "phases_seconds": phases, "system": system_info(),
              "config": config, "seconds": time.perf_counter() - start}
    write_json(out / "demo_report.json", report, default=str)
    print(f"\ndone in {report['seconds'] / 60:.1f} min; report: {out / 'demo_report.json'}")
    return report
