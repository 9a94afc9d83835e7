"""ms/token of every decode path at BLIP-2 OPT-2.7B size on a GPU, beside the memory-bandwidth floor.

The model is a `Blip2ForConditionalGeneration` whose LM has OPT-2.7B's shape (OPTConfig: hidden 2560, 32 layers, 32
heads, FFN 10240, vocabulary 50272) with random bf16 weights and a small vision side (timing does not depend on the
values; the vision encoder and Q-Former run once per call, in the prefill), and FREE exit transformers at the paper's
layers [3, 6, 9, 12, 24, 27, 30] (Tables 10 and 11). Random weights never make a confident exit, so exits are forced:

- `hf`: transformers' `generate` (eager, dynamic cache), greedy;
- `full graphs` / `full eager`: freevlm's engine at full depth, with the static step captured as CUDA graphs
  (`generation/graphs.py`, the default on CUDA) and without;
- `exit@k`: only the exit at layer k is checked, with a criterion that always fires: every token leaves at k (the
  exit transformer and the head run; the skipped layers' K/V are propagated, the default policy);
- `table11 <dataset>`: every exit checked, and each token leaves at the exit that Table 11's fractions for that
  dataset draw for it (VQA-v2 by default: 2% at layer 3, ..., 17% at layer 30, the remaining 19% at the final
  layer); the confidence is still computed at every check, as FREE's criterion does;
- `checks only`: every exit checked, none taken (the bare cost of the 7 checks);
- `spec e=E L=L`: lossless self-speculative decoding drafted by the exit at E (acceptance depends on the random
  weights, so it is reported, and tokens are compared with full depth's).

Every call generates a fixed number of tokens (EOS disabled). Each path is timed at `--short` and at `--short +
--tokens` new tokens, interleaved path by path, median of `--repeats` after a warm-up; decode ms/token = (long -
short) / tokens, which leaves out the prefill and the per-call CUDA-graph capture. `floor` is the bytes of LM weights
a token's step reads (layers run, exit transformers and heads checked, K/V projections of propagated layers) over
`--bandwidth-gbs` (H200: ~4800 GB/s), per step of the batch (weights are read once for all rows).

Tables go to stderr; the JSON goes to stdout, and to $OUT/gpu_decode.json when $OUT is set (and to --out).

    python benchmarks/gpu_decode.py                          # on a GPU: about 3-5 minutes on an H200
    python benchmarks/gpu_decode.py --device cpu --tiny      # a seconds-long smoke run of the script on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import Blip2Processor, BlipImageProcessorPil

from freevlm.backbones.tiny import TinySize, build_tiny
from freevlm.data.synthetic import SyntheticConfig
from freevlm.default import default_tokenizer
from freevlm.eval.report import markdown_table
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.criteria import Confidence
from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.speculative import DraftSettings, SpeculativeStats
from freevlm.generation.vocab import HeadSubset
from freevlm.machine import system_info
from freevlm.train.batches import CAPTION_PROMPT, encode_prompts

# OPT-2.7B's LM (Appendix D.1) with a small vision side: 224 px, 14 px patches, a 2-layer 256-wide ViT and Q-Former
OPT_2_7B = TinySize(vocab_size=50272, lm_layers=32, lm_hidden=2560, lm_heads=32, lm_ffn=10240, vision_hidden=256,
                    vision_layers=2, qformer_layers=2, image_size=224, patch_size=14, num_query_tokens=32,
                    max_positions=2048)
# the smoke-test shape: the same depth (so the paper's exit layers apply as they are), tiny widths
TINY = TinySize(vocab_size=512, lm_layers=32, lm_hidden=64, lm_heads=4, lm_ffn=128, vision_hidden=32,
                vision_layers=1, qformer_layers=1, image_size=32, patch_size=8, num_query_tokens=4, max_positions=256)
# SmolLM2-135M's LM (the real VLM's, `freevlm demo --real`): 30 layers, 576 wide, 9 heads / 3 K-V heads, a 49k head
SMOLLM2 = TinySize(vocab_size=49152, lm_layers=30, lm_hidden=576, lm_heads=9, lm_kv_heads=3, lm_ffn=1536,
                   vision_hidden=256, vision_layers=2, qformer_layers=2, image_size=224, patch_size=14,
                   num_query_tokens=32, max_positions=2048)
EXIT_LAYERS = [3, 6, 9, 12, 24, 27, 30]  # Table 10 (OPT); the columns of Table 11
SHAPES = {  # name -> (family, size, exit layers, default speculative settings)
    "opt-2.7b": ("blip2-opt", OPT_2_7B, EXIT_LAYERS, ["24:4", "30:6"]),
    "smollm2": ("minigpt4-llama", SMOLLM2, [6, 11, 22, 25], ["6:4", "22:4"]),  # the real VLM's exits
    "tiny": ("blip2-opt", TINY, EXIT_LAYERS, ["24:4", "30:6"]),
}
TABLE11 = {  # fraction of tokens leaving at each exit (Table 11); the rest reach the final layer
    "vqa-v2": [0.02, 0.07, 0.13, 0.09, 0.15, 0.18, 0.17],
    "ok-vqa": [0.03, 0.09, 0.11, 0.09, 0.13, 0.15, 0.18],
    "vizwiz": [0.01, 0.06, 0.09, 0.08, 0.11, 0.17, 0.22],
}


@dataclass
class Drawn:
    """An exit criterion for timing: each token draws the exit it leaves at from `fractions` (one per checked exit,
    in layer order; all zero: never leaves, though every exit is checked). The criterion is asked once per exit in
    layer order (the engine's contract), so a per-step counter knows which exit is asking. The exit's confidence is
    computed as FREE's criterion computes it, so the check costs what a real one does."""

    fractions: list[float]
    seed: int = 0
    needs_logits: bool = True
    generator: torch.Generator | None = field(default=None, repr=False)

    def never_exits(self) -> bool:
        return False

    def new_step(self, batch_size: int, device) -> dict:
        if self.generator is None:  # one stream of draws for the whole run (the engine's device does not change)
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return {"u": torch.rand(batch_size, device=device, generator=self.generator), "k": 0}

    def __call__(self, state, rows, logits, hidden, prev_hidden) -> torch.Tensor:
        k = state["k"]
        state["k"] = k + 1
        confident = torch.softmax(logits.float(), dim=-1).amax(dim=-1) >= 0  # always true: FREE's check, paid for
        cumulative = sum(self.fractions[: k + 1]) if k < len(self.fractions) else 1.0
        return confident & (state["u"][rows] < cumulative)


@dataclass
class DecodePath:
    name: str
    kind: str  # hf | engine
    criterion: object = None
    check_layers: list[int] | None = None
    static: bool | None = None  # None: the engine's default (CUDA graphs on CUDA)
    draft: DraftSettings | None = None
    subset: HeadSubset | None = None  # exit checks score these token ids only


def build(family: str, size: TinySize, exit_layers: list[int], device: str, dtype: torch.dtype):
    tok = default_tokenizer(SyntheticConfig())
    processor = Blip2Processor(BlipImageProcessorPil(size={"height": size.image_size, "width": size.image_size}), tok,
                               num_query_tokens=size.num_query_tokens)
    with torch.device(device):
        backbone = build_tiny(family, size, processor=processor, seed=0)
        exits = build_exits(backbone.lm, ExitSpec("transformer", list(exit_layers)))
    backbone.model.to(dtype).eval()
    exits.to(dtype).eval()
    return backbone, exits


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def floor_bytes(lm, exits, mix: list[tuple[float, int, int]]) -> float:
    """Expected LM weight bytes a decode step reads, for a mix of (probability, exit layer reached (N: final), exits
    checked): the layers run, one exit transformer and one LM head per check, the final norm and head for tokens
    reaching the end, and the K/V projections of every skipped layer and unchecked later exit (propagation)."""
    n = lm.num_layers
    layer = nbytes(lm.layers[0])
    exit_layer = nbytes(exits.exits[0]) if exits is not None and len(exits.exits) else layer
    head = lm.lm_head.weight.numel() * lm.lm_head.weight.element_size()
    norm = nbytes(lm.norm) if getattr(lm, "norm", None) is not None else 0
    attn = lm.layers[0].self_attn
    kv = nbytes(attn.k_proj) + nbytes(attn.v_proj)
    total = 0.0
    for p, reached, checked in mix:
        b = reached * layer + checked * (exit_layer + head + norm)
        if reached >= n:
            b += head + norm
        else:
            b += (n - reached) * kv
        total += p * b
    return total


def force_acceptance(lm, exits, layer: int) -> None:
    """Zero the residual writes of every layer past `layer` and of the exit transformer at `layer`: the final hidden
    state is then h_layer, and so is the exit's output, so the exit's drafts are full depth's tokens. Every matrix
    keeps its shape, so a step costs what it did (decoding is memory-bound: time follows bytes read)."""
    def zero(block):
        for name, p in block.named_parameters():
            if name.split(".")[-2] in ("out_proj", "o_proj", "fc2", "down_proj"):
                p.data.zero_()

    for i in range(layer, lm.num_layers):  # 0-based: layers layer+1 .. N
        zero(lm.layers[i])
    zero(exits.exits[list(exits.layers).index(layer)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="opt-2.7b", choices=sorted(SHAPES), help="the LM's shape")
    parser.add_argument("--tiny", action="store_true", help="--shape tiny (32 layers, hidden 64): a smoke run")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64, help="tokens timed per call beyond --short")
    parser.add_argument("--short", type=int, default=8, help="new tokens of the short call (prefill + capture)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--spec", nargs="+", default=None, help="speculative settings E:L (E an exit; default: "
                        "the shape's)")
    parser.add_argument("--subsets", type=int, nargs="*", default=[],
                        help="head subset sizes K: checks-only and the first speculative setting also run with exit "
                        "heads scoring K tokens (generation/vocab.py; random models: the K lowest ids)")
    parser.add_argument("--force-accept", action="store_true",
                        help="zero the residual writes (attention output and FFN down projections) of every layer "
                        "past the first speculative setting's exit and of that exit's transformer: its drafts then "
                        "equal full depth's tokens (100%% acceptance) at unchanged cost per layer; only full depth "
                        "and that setting run")
    parser.add_argument("--no-hf", action="store_true", help="leave out transformers generate")
    parser.add_argument("--paths", nargs="*", default=None,
                        help="run only the paths whose name starts with one of these (full depth always runs)")
    parser.add_argument("--table11", default="vqa-v2", choices=sorted(TABLE11))
    parser.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="GPU memory bandwidth, GB/s (H200)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) / float32 (default on CPU)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_decode: no CUDA device here; pass --device cpu --tiny for a smoke run")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device != "cpu" else torch.float32)
    family, size, exit_layers, default_spec = SHAPES["tiny" if args.tiny else args.shape]
    spec = args.spec or default_spec
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    torch.manual_seed(0)
    backbone, exits = build(family, size, exit_layers, args.device, dtype)
    lm = backbone.lm
    n = lm.num_layers
    machine = system_info()
    machine.update(cuda=torch.version.cuda, device=args.device)
    lm_bytes = nbytes(lm.layers) + lm.lm_head.weight.numel() * lm.lm_head.weight.element_size()
    log(f"machine: {machine}")
    log(f"model built in {time.perf_counter() - start:.0f} s: LM {n} layers x hidden {lm.hidden_size}, "
        f"{sum(p.numel() for p in backbone.model.parameters()) / 1e9:.2f}B parameters in all, LM layers + head "
        f"{lm_bytes / 1e9:.2f} GB ({dtype}); exits {list(exits.layers)}; bandwidth {args.bandwidth_gbs:g} GB/s")

    fractions = TABLE11[args.table11] if len(exit_layers) == len(EXIT_LAYERS) else None  # Table 11 is OPT's
    paths = [] if args.no_hf else [DecodePath("hf", "hf")]
    paths += [DecodePath("full graphs", "engine", static=None), DecodePath("full eager", "engine", static=False)]
    for k in exit_layers:
        paths.append(DecodePath(f"exit@{k}", "engine", Confidence(1e-9), [k]))
    if fractions is not None:
        paths.append(DecodePath(f"table11 {args.table11}", "engine", Drawn(fractions)))
    paths.append(DecodePath("checks only", "engine", Drawn([0.0] * len(exit_layers))))
    ranking = torch.arange(lm.vocab_size)
    for k in args.subsets:
        paths.append(DecodePath(f"checks only subset {k}", "engine", Drawn([0.0] * len(exit_layers)),
                                subset=HeadSubset(ranking[:k], lm.vocab_size)))
    for i, text in enumerate(spec):
        e, length = (int(x) for x in text.split(":"))
        paths.append(DecodePath(f"spec e={e} L={length}", "engine", draft=DraftSettings(e, length)))
        if i == 0:
            for k in args.subsets:
                paths.append(DecodePath(f"spec e={e} L={length} subset {k}", "engine", draft=DraftSettings(
                    e, length, head_subset=HeadSubset(ranking[:k], lm.vocab_size))))
    if args.paths is not None:
        paths = [p for p in paths if p.name in ("full graphs", "full eager") or p.name.startswith(tuple(args.paths))]
    if args.force_accept:
        e = int(spec[0].split(":")[0])
        force_acceptance(lm, exits, e)
        paths = [p for p in paths if p.name in ("full graphs", "full eager") or p.name.startswith(f"spec e={e} ")]

    def floor_ms(p: DecodePath) -> float | None:
        if p.draft is not None or p.subset is not None:
            return None  # depends on acceptance (see layer calls per token); subsets: not modelled
        if p.check_layers is not None:
            mix = [(1.0, p.check_layers[0], 1)]
        elif isinstance(p.criterion, Drawn):
            fr = p.criterion.fractions
            mix = [(f, k, i + 1) for i, (f, k) in enumerate(zip(fr, exit_layers))]
            mix.append((1.0 - sum(fr), n, len(exit_layers)))
        else:
            mix = [(1.0, n, 0)]
        return floor_bytes(lm, exits, mix) / (args.bandwidth_gbs * 1e9) * 1e3

    image = Image.fromarray((torch.rand(size.image_size, size.image_size, 3,
                                        generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    gen_config = backbone.model.generation_config
    results = {"machine": machine, "settings": vars(args), "model": {
        "shape": "tiny" if args.tiny else args.shape, "size": size.__dict__, "dtype": str(dtype),
        "exit_layers": exit_layers, "forced_acceptance": args.force_accept, "lm_weight_bytes": lm_bytes,
        "table11_fractions": fractions}, "batches": {}}

    for batch in args.batch_sizes:
        enc = encode_prompts(backbone, [image] * batch, [CAPTION_PROMPT] * batch)
        enc = {k: v.to(args.device) for k, v in enc.items()}
        pixels = enc["pixel_values"].to(dtype)
        prompt_len = enc["input_ids"].shape[1]

        def call(p: DecodePath, new: int, stats: SpeculativeStats | None = None, enc=enc, pixels=pixels,
                 prompt_len=prompt_len):
            with torch.no_grad():
                if p.kind == "hf":
                    out = backbone.hf_generate(pixels, enc["input_ids"], enc["attention_mask"], max_new_tokens=new,
                                               min_new_tokens=new, do_sample=False, num_beams=1)
                    sync()
                    return out[:, prompt_len:]
                lm_inputs = backbone.prepare(pixels, enc["input_ids"], enc["attention_mask"])
                res = generate_from_inputs(lm, exits, lm_inputs, criterion=p.criterion, draft=p.draft,
                                           check_layers=p.check_layers, static=p.static, generation_config=gen_config,
                                           head_subset=p.subset,
                                           max_new_tokens=new, eos_token_id=[])
                sync()
                if stats is not None:
                    stats.add(res.speculative)
                return res

        long = args.short + args.tokens
        info = {}
        full_path = next(p for p in paths if p.name == "full graphs")
        reference = call(full_path, long).sequences.tolist()  # full depth's tokens
        failed = {}  # a path that raises is reported and left out; the others still run
        for p in paths:  # warm-up, and what each path produced
            stats = SpeculativeStats() if p.draft is not None else None
            try:
                out = call(p, long, stats)
                entry = {}
                if p.kind == "hf":
                    entry["equals_full"] = out.tolist() == reference
                else:
                    layers = [x for row in out.exit_layers for x in row]
                    entry["mean_exit_layer"] = statistics.fmean(layers)
                    entry["equals_full"] = out.sequences.tolist() == reference
                if stats is not None:
                    entry.update(stats.to_json(n))
                call(p, args.short)
                info[p.name] = entry
            except Exception as exc:  # noqa: BLE001 - reported per path
                failed[p.name] = f"{type(exc).__name__}: {exc}"
                log(f"{p.name}: FAILED {failed[p.name]}")
        live = [p for p in paths if p.name not in failed]
        times = {p.name: {"short": [], "long": []} for p in live}
        for _ in range(args.repeats):
            for p in list(live):
                try:
                    for key, new in (("short", args.short), ("long", long)):
                        t0 = time.perf_counter()
                        call(p, new)
                        times[p.name][key].append(time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001 - reported per path
                    failed[p.name] = f"{type(exc).__name__} while timed: {exc}"
                    log(f"{p.name}: FAILED {failed[p.name]}")
                    live.remove(p)
        rows, table = [], {}
        full_ms = None
        for p in live:
            short, lng = statistics.median(times[p.name]["short"]), statistics.median(times[p.name]["long"])
            ms = (lng - short) / args.tokens * 1e3
            full_ms = ms if p.name == "full graphs" else full_ms
            fl = floor_ms(p)
            entry = {**info[p.name], "ms_per_token": ms, "tokens_per_second": batch * 1e3 / ms if ms > 0 else None,
                     "end_to_end_ms_per_token": lng / long * 1e3, "prefill_and_short_ms": short * 1e3,
                     "floor_ms_per_token": fl, "seconds": times[p.name]}
            table[p.name] = entry
        for name, e in table.items():
            e["vs_full_graphs"] = full_ms / e["ms_per_token"] if e["ms_per_token"] > 0 else None
            notes = []
            if "acceptance_rate" in e:
                notes.append(f"accept {e['acceptance_rate']:.2f}, tok/verif {e['tokens_per_verification']:.2f}, "
                             f"layer calls/tok {e['layer_calls_per_token']:.1f}")
            if "mean_exit_layer" in e and not name.startswith(("full", "spec")):
                notes.append(f"mean exit layer {e['mean_exit_layer']:.1f}")
            notes.append("tokens == full" if e["equals_full"] else "tokens differ from full")
            fl = e["floor_ms_per_token"]
            rows.append([name, e["ms_per_token"], fl if fl is not None else "-",
                         e["ms_per_token"] / fl if fl else "-", e["vs_full_graphs"], e["end_to_end_ms_per_token"],
                         "; ".join(notes)])
        rows += [[name, "-", "-", "-", "-", "-", f"FAILED: {why}"] for name, why in failed.items()]
        log(f"\n## batch {batch} ({args.tokens} tokens timed after {args.short}; prompt {prompt_len} tokens; "
            f"median of {args.repeats})\n")
        log(markdown_table(["path", "decode ms/token", "floor ms", "x floor", "speed vs full graphs",
                            "end-to-end ms/token", "notes"], rows))
        table.update({name: {"error": why} for name, why in failed.items()})
        results["batches"][str(batch)] = table
    results["seconds"] = time.perf_counter() - start
    log(f"\ndone in {results['seconds']:.0f} s")
    text = json.dumps(results, indent=2, default=str)
    print(text)
    name = f"gpu_decode_{results['model']['shape']}{'_forced' * args.force_accept}.json"
    for target in ([Path(os.environ["OUT"]) / name] if os.environ.get("OUT") else []) + (
            [Path(args.out)] if args.out else []):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


if __name__ == "__main__":
    main()
