"""Decoding speed of the demo's trained model: every decode path side by side, in one run (results: BENCHMARKS.md).

Paths, timed interleaved image by image (each repeat runs every path on image 1, then every path on image 2, ...),
median of `--repeats` after a warm-up pass, generated tokens/s:

- `hf`: the VLM's own transformers `generate` (`backbone.hf_generate`), greedy;
- `full`: freevlm's engine at full depth (the reference of the ratios);
- `ee@alpha`: FREE early exit with the confidence criterion at each alpha (default: the paper's 0.5 ... 1.0);
- `spec e=E L=L [a=A]`: lossless self-speculative decoding drafted by the exit at layer E, up to L drafts per round
  (A: adaptive, stop drafting once the exit's confidence falls below it); the best one is marked.

for each batch size (`--batch-sizes`, default 1 and 8) at each torch thread count (`--threads`, default 1 and 2).
Accounting is the same for every path: images are decoded from disk once, before timing; every timed call includes
the processor (resize, tokenise), the vision encoder and Q-Former, the prompt's prefill and the decoding loop.
Tokens are counted up to and including each row's EOS. An untimed pass first records what each path produced:
the mean exit layer and the paper's parameter speedup of early exit, the speculative statistics (acceptance rate,
tokens per verification, layer calls per token), and whether speculative (and HF) tokens equal full depth's.

    python benchmarks/decode_speed.py --run runs/demo            # the checkpoints `make demo` / `freevlm demo` leave
    python benchmarks/decode_speed.py --run runs/demo --train    # train whatever of that run is missing first
    python benchmarks/decode_speed.py --quick                    # a fast smoke run (2 images, 2 repeats)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from freevlm.backbones import load_backbone
from freevlm.data.images import load_image
from freevlm.data.synthetic import load_synthetic_captions
from freevlm.default import DefaultConfig, prepare_data
from freevlm.errors import FreeVLMError
from freevlm.eval.efficiency import measure_throughput, parameter_speedup
from freevlm.eval.evaluate import PAPER_THRESHOLDS
from freevlm.eval.report import markdown_table
from freevlm.exits import load_exits
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.generation.speculative import SpeculativeStats
from freevlm.machine import system_info
from freevlm.train.batches import CAPTION_PROMPT, encode_prompts

DEFAULT_SPEC = ["4:4", "4:8:0.5", "9:8"]  # (draft exit, draft length[, adaptive alpha_draft]) settings tried


def run_paths(run: Path, seed: int) -> tuple[Path, Path]:
    return run / f"stage1-s{seed}" / "backbone", run / f"free-s{seed}" / "exits"


def train_run(run: Path, seed: int) -> None:
    """Train what the demo trains (pretraining, stage 1, FREE exits), resuming or reusing what `run` holds."""
    from freevlm.data.splits import split_by_image
    from freevlm.default import pretrained_default
    from freevlm.demo import demo_stage1, demo_stage2
    from freevlm.train.batches import caption_examples
    from freevlm.train.stage1 import train_backbone
    from freevlm.train.stage2 import train_exits

    start = time.perf_counter()
    data_root, backbone = pretrained_default(run, DefaultConfig(), seed=seed, progress=False)
    train, _ = split_by_image(load_synthetic_captions(data_root, "val"), seed)
    s1 = demo_stage1()
    s1.loop.seed, s1.loop.progress = seed, False
    train_backbone(backbone, caption_examples(train), s1, run / f"stage1-s{seed}", resume=True)
    s2 = demo_stage2()
    s2.loop.seed, s2.loop.progress = seed, False
    train_exits(backbone, caption_examples(train), s2, run / f"free-s{seed}", resume=True)
    print(f"trained {run} in {time.perf_counter() - start:.0f} s")


def load_run(run: Path, seed: int, train: bool) -> tuple[EarlyExitVLM, Path]:
    """The demo's fine-tuned backbone and FREE exits from a run folder, and the synthetic data root."""
    backbone_dir, exits_dir = run_paths(run, seed)
    missing = [p for p in (backbone_dir / "config.json", exits_dir) if not p.exists()]
    if missing and train:
        train_run(run, seed)
    elif missing:
        raise FreeVLMError(
            f"no trained demo run at {run} (missing {', '.join(map(str, missing))}): run `freevlm demo --out {run}` "
            f"(or `make demo` for runs/demo) first, pass --run pointing to such a folder, or add --train to train "
            f"one here (pretraining, stage 1, stage 2: several CPU minutes)")
    backbone = load_backbone(backbone_dir)
    exits = load_exits(exits_dir, backbone.lm)
    data_root = prepare_data(run / "data", DefaultConfig())  # the synthetic data (regenerated if absent)
    return EarlyExitVLM(backbone, exits), data_root


def parse_spec(text: str, exit_layers: list[int]) -> tuple[int, int, float | None]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise FreeVLMError(f"--spec settings are E:L or E:L:ALPHA, got {text!r}")
    e, length = int(parts[0]), int(parts[1])
    if e not in exit_layers:
        raise FreeVLMError(f"--spec draft exit {e} is not one of the run's exits {exit_layers}")
    return e, length, float(parts[2]) if len(parts) == 3 else None


def spec_name(e: int, length: int, alpha: float | None) -> str:
    return f"spec e={e} L={length}" + (f" a={alpha}" if alpha is not None else "")


def chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def rows_of(res) -> list[list[int]]:
    """Each row's generated ids up to and including its EOS."""
    seqs = res.sequences.tolist()
    return [seqs[i][: len(t)] for i, t in enumerate(res.trace)]


def hf_rows(bb, out, prompt_len: int) -> list[list[int]]:
    eos = bb.lm.config.eos_token_id
    gen = out[:, 1:] if bb.lm.is_encoder_decoder else out[:, prompt_len:]
    return [row[: next((i + 1 for i, t in enumerate(row) if t == eos), len(row))] for row in gen.tolist()]


def measure_config(vlm: EarlyExitVLM, images: list, batch: int, paths: dict[str, DecodeOptions], max_new: int,
                   repeats: int) -> dict:
    """One (threads, batch) cell: an untimed pass (what each path produced), then the interleaved timing."""
    bb = vlm.backbone
    n = bb.lm.num_layers
    batches = chunks(images, batch)
    prompts = [[CAPTION_PROMPT] * len(c) for c in batches]

    def ours(i: int, opts: DecodeOptions):
        return lambda: vlm.generate(batches[i], prompts[i], opts, tokenizer_decode=False)

    def hf(i: int):
        def fn():  # the processor inside the timing, as vlm.generate has it
            enc = encode_prompts(bb, batches[i], prompts[i])
            enc = {k: v.to(vlm.device) for k, v in enc.items()}
            out = bb.hf_generate(max_new_tokens=max_new, num_beams=1, do_sample=False, **enc)
            return hf_rows(bb, out, enc["input_ids"].shape[1])
        return fn

    # untimed pass: tokens, exit layers, speculative statistics
    produced: dict[str, list[list[int]]] = {"hf": [r for i in range(len(batches)) for r in hf(i)()]}
    info: dict[str, dict] = {}
    for name, opts in paths.items():
        tokens, layers, stats = [], [], SpeculativeStats() if opts.mode == "speculative" else None
        for i in range(len(batches)):
            res = ours(i, opts)()
            tokens += rows_of(res)
            layers += [x for row in res.exit_layers for x in row]
            if stats is not None:
                stats.add(res.speculative)
        produced[name] = tokens
        entry = {"tokens": sum(map(len, tokens))}
        if opts.mode == "early_exit":
            entry.update(mean_exit_layer=statistics.fmean(layers), parameter_speedup=parameter_speedup(layers, n))
        if stats is not None:
            entry.update(stats.to_json(n), equals_full=tokens == produced["full"])
        info[name] = entry
    info["hf"] = {"tokens": sum(map(len, produced["hf"])), "equals_full": produced["hf"] == produced["full"]}

    def counted_hf(i: int):
        fn = hf(i)
        return lambda: sum(map(len, fn()))

    def counted_ours(i: int, opts: DecodeOptions):
        fn = ours(i, opts)
        return lambda: fn().num_tokens

    runs = {"hf": [counted_hf(i) for i in range(len(batches))]}
    for name, opts in paths.items():
        runs[name] = [counted_ours(i, opts) for i in range(len(batches))]
    with torch.no_grad():
        timed = measure_throughput(runs, repeats=repeats, warmup=1)
    full_tps, hf_tps = timed["full"]["tokens_per_second"], timed["hf"]["tokens_per_second"]
    for name, t in timed.items():
        t.update(info[name])
        t["vs_full"] = t["tokens_per_second"] / full_tps
        t["vs_hf"] = t["tokens_per_second"] / hf_tps
    specs = [k for k in timed if k.startswith("spec")]
    best = max(specs, key=lambda k: timed[k]["tokens_per_second"]) if specs else None
    return {"batch": batch, "images": len(images), "calls_per_path": len(batches), "paths": timed,
            "best_speculative": best}


def print_config(threads: int, cell: dict) -> None:
    rows = []
    for name, t in cell["paths"].items():
        notes = []
        if "mean_exit_layer" in t:
            notes.append(f"mean exit layer {t['mean_exit_layer']:.2f}, param x {t['parameter_speedup']:.2f}")
        if "acceptance_rate" in t:
            notes.append(f"accept {t['acceptance_rate']:.2f}, tok/verif {t['tokens_per_verification']:.2f}, "
                         f"layer calls/tok {t['layer_calls_per_token']:.1f}")
        if "equals_full" in t:
            notes.append("tokens == full" if t["equals_full"] else "tokens DIFFER from full")
        if name == cell["best_speculative"]:
            notes.append("best speculative")
        rows.append([name, t["tokens_per_second"], t["tokens"], t["vs_full"], t["vs_hf"], "; ".join(notes)])
    print(f"\n## {threads} thread(s), batch {cell['batch']} ({cell['images']} images, {cell['calls_per_path']} "
          f"call(s) per path per repeat)\n")
    print(markdown_table(["path", "tok/s", "tokens", "vs full", "vs HF", "notes"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo", help="a trained demo run folder (freevlm demo --out RUN)")
    parser.add_argument("--train", action="store_true", help="train the run's missing checkpoints first")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (its stage1-s<seed>, free-s<seed>)")
    parser.add_argument("--images", type=int, default=8, help="test images timed (batch b uses max(N, 2b))")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median), after one warm-up pass")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--alphas", type=float, nargs="+", default=list(PAPER_THRESHOLDS))
    parser.add_argument("--spec", nargs="+", default=DEFAULT_SPEC, help="speculative settings E:L[:ALPHA_DRAFT]")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 images, 2 repeats, batch 1 and 2")
    parser.add_argument("--out", default="benchmarks/results/decode_speed.json")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats, args.batch_sizes = 2, 2, [1, 2]
    start = time.perf_counter()
    torch.manual_seed(0)
    try:
        vlm, data_root = load_run(Path(args.run), args.seed, args.train)
        specs = [parse_spec(s, list(vlm.exits.layers)) for s in args.spec]
    except FreeVLMError as err:
        sys.exit(f"decode_speed: {err}")
    base = DecodeOptions(max_new_tokens=args.max_new_tokens)
    paths = {"full": replace(base, mode="full")}
    paths.update({f"ee@{a:g}": replace(base, threshold=a) for a in args.alphas})
    paths.update({spec_name(e, length, a): replace(base, mode="speculative", draft_layer=e, draft_length=length,
                                                   draft_threshold=a) for e, length, a in specs})
    test = load_synthetic_captions(data_root, "test")
    need = max(max(args.images, 2 * b) for b in args.batch_sizes) if not args.quick else args.images * 2
    pil = [load_image(s.image_path) for s in test[:need]]
    machine = system_info()
    machine["threads"] = args.threads
    lm = vlm.backbone.lm
    print(f"machine: {machine}")
    print(f"model: {args.run}, LM {lm.num_layers} layers, hidden {lm.hidden_size}, exits {list(vlm.exits.layers)}; "
          f"up to {args.max_new_tokens} new tokens, greedy; median of {args.repeats} after a warm-up")
    results = {"machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "model": {"run": args.run, "lm_layers": lm.num_layers, "hidden": lm.hidden_size,
                         "exit_layers": list(vlm.exits.layers)}, "configs": []}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch_sizes:
            count = args.images if args.quick else max(args.images, 2 * batch)
            cell = measure_config(vlm, pil[:count], batch, paths, args.max_new_tokens, args.repeats)
            cell["threads"] = threads
            print_config(threads, cell)
            results["configs"].append(cell)
    summary = [[c["threads"], c["batch"], c["paths"]["hf"]["tokens_per_second"],
                c["paths"]["full"]["tokens_per_second"],
                *(c["paths"][f"ee@{a:g}"]["vs_full"] for a in args.alphas),
                f"{c['best_speculative']}: {c['paths'][c['best_speculative']]['vs_full']:.2f}"
                if c["best_speculative"] else "-",
                all(c["paths"][k]["equals_full"] for k in c["paths"] if k.startswith("spec"))]
               for c in results["configs"]]
    print("\n## summary (early exit and speculative as tokens/s ratios vs full depth)\n")
    print(markdown_table(["threads", "batch", "HF tok/s", "full tok/s", *(f"ee@{a:g}" for a in args.alphas),
                          "best speculative", "spec == full"], summary))
    results["seconds"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwritten {args.out} ({results['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
