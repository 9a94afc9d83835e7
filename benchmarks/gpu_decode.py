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
from freevlm.machine import system_info
from freevlm.train.batches import CAPTION_PROMPT, encode_prompts

# OPT-2.7B's LM (Appendix D.1) with a small vision side: 224 px, 14 px patches, a 2-layer 256-wide ViT and Q-Former
OPT_2_7B = TinySize(vocab_size=50272, lm_layers=32, lm_hidden=2560, lm_heads=32, lm_ffn=10240, vision_hidden=256,
                    vision_layers=2, qformer_layers=2, image_size=224, patch_size=14, num_query_tokens=32,
                    max_positions=2048)
# the smoke-test shape: the same depth (so the paper's exit layers apply as they are), tiny widths
TINY = TinySize(vocab_size=512, lm_layers=32, lm_hidden=64, lm_heads=4, lm_ffn=128, vision_hidden=32,
                vision_layers=1, qformer_layers=1, image_size=32, patch_size=8, num_query_tokens=4, max_positions=256)
EXIT_LAYERS = [3, 6, 9, 12, 24, 27, 30]  # Table 10 (OPT); the columns of Table 11
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


def build(size: TinySize, device: str, dtype: torch.dtype):
    tok = default_tokenizer(SyntheticConfig())
    processor = Blip2Processor(BlipImageProcessorPil(size={"height": size.image_size, "width": size.image_size}), tok,
                               num_query_tokens=size.num_query_tokens)
    with torch.device(device):
        backbone = build_tiny("blip2-opt", size, processor=processor, seed=0)
        exits = build_exits(backbone.lm, ExitSpec("transformer", list(EXIT_LAYERS)))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a small model (32 layers, hidden 64): a smoke run")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64, help="tokens timed per call beyond --short")
    parser.add_argument("--short", type=int, default=8, help="new tokens of the short call (prefill + capture)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--spec", nargs="+", default=["24:4", "30:6"], help="speculative settings E:L (E an exit)")
    parser.add_argument("--table11", default="vqa-v2", choices=sorted(TABLE11))
    parser.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="GPU memory bandwidth, GB/s (H200)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) / float32 (default on CPU)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_decode: no CUDA device here; pass --device cpu --tiny for a smoke run")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device != "cpu" else torch.float32)
    size = TINY if args.tiny else OPT_2_7B
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    torch.manual_seed(0)
    backbone, exits = build(size, args.device, dtype)
    lm = backbone.lm
    n = lm.num_layers
    machine = system_info()
    machine.update(cuda=torch.version.cuda, device=args.device)
    lm_bytes = nbytes(lm.layers) + lm.lm_head.weight.numel() * lm.lm_head.weight.element_size()
    log(f"machine: {machine}")
    log(f"model built in {time.perf_counter() - start:.0f} s: LM {n} layers x hidden {lm.hidden_size}, "
        f"{sum(p.numel() for p in backbone.model.parameters()) / 1e9:.2f}B parameters in all, LM layers + head "
        f"{lm_bytes / 1e9:.2f} GB ({dtype}); exits {list(exits.layers)}; bandwidth {args.bandwidth_gbs:g} GB/s")

    fractions = TABLE11[args.table11]
    paths = [DecodePath("hf", "hf"), DecodePath("full graphs", "engine", static=None),
             DecodePath("full eager", "engine", static=False)]
    for k in EXIT_LAYERS:
        paths.append(DecodePath(f"exit@{k}", "engine", Confidence(1e-9), [k]))
    paths.append(DecodePath(f"table11 {args.table11}", "engine", Drawn(fractions)))
    paths.append(DecodePath("checks only", "engine", Drawn([0.0] * len(EXIT_LAYERS))))
    for text in args.spec:
        e, length = (int(x) for x in text.split(":"))
        paths.append(DecodePath(f"spec e={e} L={length}", "engine", draft=DraftSettings(e, length)))

    def floor_ms(p: DecodePath) -> float | None:
        if p.draft is not None:
            return None  # depends on acceptance; see layer calls per token
        if p.check_layers is not None:
            mix = [(1.0, p.check_layers[0], 1)]
        elif isinstance(p.criterion, Drawn):
            fr = p.criterion.fractions
            mix = [(f, k, i + 1) for i, (f, k) in enumerate(zip(fr, EXIT_LAYERS))]
            mix.append((1.0 - sum(fr), n, len(EXIT_LAYERS)))
        else:
            mix = [(1.0, n, 0)]
        return floor_bytes(lm, exits, mix) / (args.bandwidth_gbs * 1e9) * 1e3

    image = Image.fromarray((torch.rand(size.image_size, size.image_size, 3,
                                        generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    gen_config = backbone.model.generation_config
    results = {"machine": machine, "settings": vars(args), "model": {
        "size": size.__dict__, "dtype": str(dtype), "exit_layers": EXIT_LAYERS, "lm_weight_bytes": lm_bytes,
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
                                           max_new_tokens=new, eos_token_id=[])
                sync()
                if stats is not None:
                    stats.add(res.speculative)
                return res

        long = args.short + args.tokens
        info = {}
        reference = call(paths[1], long).sequences.tolist()  # full depth's tokens
        for p in paths:  # warm-up, and what each path produced
            stats = SpeculativeStats() if p.draft is not None else None
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
        times = {p.name: {"short": [], "long": []} for p in paths}
        for _ in range(args.repeats):
            for p in paths:
                for key, new in (("short", args.short), ("long", long)):
                    t0 = time.perf_counter()
                    call(p, new)
                    times[p.name][key].append(time.perf_counter() - t0)
        rows, table = [], {}
        full_ms = None
        for p in paths:
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
        log(f"\n## batch {batch} ({args.tokens} tokens timed after {args.short}; prompt {prompt_len} tokens; "
            f"median of {args.repeats})\n")
        log(markdown_table(["path", "decode ms/token", "floor ms", "x floor", "speed vs full graphs",
                            "end-to-end ms/token", "notes"], rows))
        results["batches"][str(batch)] = table
    results["seconds"] = time.perf_counter() - start
    log(f"\ndone in {results['seconds']:.0f} s")
    text = json.dumps(results, indent=2, default=str)
    print(text)
    for target in ([Path(os.environ["OUT"]) / "gpu_decode.json"] if os.environ.get("OUT") else []) + (
            [Path(args.out)] if args.out else []):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


if __name__ == "__main__":
    main()
