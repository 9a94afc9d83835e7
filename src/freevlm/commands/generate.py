"""`freevlm generate`: caption or answer images, with each token's exit layer and tokens/s beside full depth."""

from __future__ import annotations

from pathlib import Path

from freevlm.commands.common import (
    check_inputs,
    checked_decoding,
    decode_options,
    decoding_mode,
    load_vlm,
    read_plan_for,
)
from freevlm.errors import FreeVLMError
from freevlm.eval.efficiency import CostModel, compute_speedup, parameter_speedup
from freevlm.eval.report import markdown_table
from freevlm.train.batches import CAPTION_PROMPT


def generate(
    backbone: Path, image: list[Path], prompt: str = CAPTION_PROMPT, exits: Path | None = None,
    mode: str = "early_exit", criterion: str = "confidence", threshold: float | None = None,
    kv_policy: str | None = None,
    num_beams: int = 1, max_new_tokens: int = 30, draft_layer: int | None = None, draft_length: int | None = None,
    draft_threshold: float | None = None, draft_record: Path | None = None, plan: Path | None = None,
    max_cache_gb: float | None = None, compare: bool = True, draft_exits: Path | None = None,
) -> None:
    """Caption / answer images; print each token's exit layer, the speedups, and tokens/s beside full depth.

    backbone: transformers checkpoint folder
    image: one or more image files
    prompt: the text prompt (captioning: 'a photo of'; VQA: 'Question: ... Answer:')
    exits: exit checkpoint folder (from train-exits); without it, full-depth decoding
    mode: early_exit (FREE, lossy) | full | speculative (an exit drafts, full depth verifies: lossless)
    criterion: early exit: confidence | entropy | patience | similarity
    threshold: early exit: the criterion's setting (confidence: alpha in (0, 1]; 1 never exits; default 0.8)
    kv_policy: early exit: what skipped layers' caches get: propagate | copy | catch_up (default propagate)
    num_beams: beam width (Table 10: 5)
    max_new_tokens: generation length limit
    draft_layer: speculative: the drafting exit's layer (default: the record's, else the first exit)
    draft_length: speculative: drafts per round at most (default: the record's, else 8)
    draft_threshold: speculative: stop drafting when the exit's confidence falls below this (adaptive)
    draft_record: speculative: a speculative.json from `freevlm sweep --mode speculative` (or its folder)
    plan: a plan.json from `freevlm plan` (or its folder): its exits, alpha, gates, KV policy / draft setting
    max_cache_gb: refuse a generate call whose KV cache would pass this many GiB (default: the device's free memory)
    compare: also decode at full depth and with transformers' generate, and print tokens/s side by side
    draft_exits: speculative: separate drafting exits (e.g. train-exits --variant kd, one layer); default: --exits
    """
    threshold, kv_policy = checked_decoding(plan, mode, criterion, threshold, kv_policy, num_beams, max_new_tokens,
                                            draft_layer, draft_length, draft_threshold, draft_record, max_cache_gb)
    check_inputs(backbone, exits, draft_exits)
    for path in image:
        if not Path(path).is_file():
            raise FreeVLMError(f"image not found: {path}")
    mode = decoding_mode(mode, exits, draft_exits)
    plan_ = read_plan_for(plan, exits)
    opts = decode_options(criterion, threshold, kv_policy, num_beams, max_new_tokens, mode, draft_layer,
                          draft_length, draft_threshold, draft_record, plan_, max_cache_gb)
    vlm = load_vlm(backbone, exits, plan_, draft_exits)
    res = vlm.generate(list(image), [prompt] * len(image), opts)
    tok = vlm.backbone.processor.tokenizer
    n = vlm.backbone.lm.num_layers
    for path, text, trace, layers, seq in zip(image, res.texts, res.trace, res.exit_layers, res.sequences):
        print(f"{path}: {text}")
        pieces = [f"{tok.convert_ids_to_tokens(int(seq[t]))}@{layer}" for (t, _), layer in zip(trace, layers)]
        print("  token@layer: " + " ".join(pieces) + f"   (layer {n} = the final layer)")
    cost = CostModel.from_modules(vlm.backbone.lm, vlm.exits)
    flat = [x for seq in res.exit_layers for x in seq]
    print(f"parameter speedup {parameter_speedup(flat, n):.2f}x, compute speedup "
          f"{compute_speedup(res.records, res.live_rows, cost):.2f}x")
    if res.speculative is not None:
        st = res.speculative
        print(f"speculative: {st.acceptance_rate:.0%} of drafts accepted, {st.tokens_per_verification:.2f} tokens per "
              f"verification, {st.layer_calls_per_token(n):.2f} layer calls per token (full depth: {n})")
    if compare:
        from freevlm.eval.evaluate import speed_comparison
        from freevlm.train.batches import Example

        examples = [Example(str(p), p, prompt, None) for p in image]
        timing = speed_comparison(vlm, examples, opts, repeats=3)
        rows = [[k, v["tokens_per_second"]] for k, v in timing.items() if k != "ratios"]
        print(markdown_table(["path", "tokens/s"], rows))
        print(", ".join(f"{k} = {v:.2f}x" for k, v in timing["ratios"].items()))
