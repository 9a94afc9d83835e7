"""Run a backbone (with or without exits) over a dataset split: predictions, metrics, exit statistics, speedups.

Generation is sharded over processes with `accelerate` (each process decodes its share of the examples; the main
process gathers the predictions and scores them). Speedups follow `eval/efficiency.py`; wall-clock here is the
time spent inside `generate`, for the side-by-side comparison see `speed_comparison`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from freevlm.data.images import load_image
from freevlm.data.records import CaptionSample, DialogSample, VQASample
from freevlm.eval.captioning import caption_metrics, fast_caption_metrics
from freevlm.eval.efficiency import CostModel, exit_fractions, measure_throughput, parameter_speedup, work_totals
from freevlm.eval.visdial import gt_rank, visdial_metrics
from freevlm.eval.vqa import aggregate_vqa, gqa_accuracy, vizwiz_answerability, vqa_accuracy
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.generation.criteria import make_criterion
from freevlm.generation.speculative import SpeculativeStats
from freevlm.losses import IGNORE
from freevlm.train.batches import CAPTION_PROMPT, VQA_TEMPLATE, Collator, Example, encode_prompts
from freevlm.train.forward import teacher_forced

PAPER_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # §4: alpha is chosen from this set on the development split


@dataclass
class EvalResult:
    task: str  # "caption" / "vqa" / "gqa" / "vizwiz" / "visdial"
    metrics: dict[str, float]
    speed: dict[str, float]  # parameter_speedup, compute_speedup, tokens, seconds, tokens_per_second
    exit_fractions: dict[int, float]  # exit layer -> fraction of tokens (N = final layer)
    options: dict = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)  # key, prediction, exit_layers

    def to_json(self) -> dict:
        d = asdict(self)
        d["exit_fractions"] = {str(k): v for k, v in self.exit_fractions.items()}
        return d


def _chunks(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass
class Decoded:
    """Predictions of one decode pass over examples, with the work and time spent (summed over processes)."""

    preds: list[dict]  # key, prediction, exit_layers
    full: float  # reference (full-depth) work of the generated tokens, in parameters touched
    actual: float  # work actually done
    seconds: float  # time inside generate (the slowest process's)
    speculative: SpeculativeStats | None = None


def decode(vlm: EarlyExitVLM, examples: list[Example], options: DecodeOptions, *, batch_size: int = 32,
           progress: bool = True, pixel_noise: float = 0.0, noise_seed: int = 0, desc: str = "decode") -> Decoded:
    """Decode every example (this process's shard of them); predictions and work totals of all processes."""
    state = PartialState()
    cost = CostModel.from_modules(vlm.backbone.lm, vlm.exits)
    preds, full, actual, seconds = [], 0.0, 0.0, 0.0
    spec = SpeculativeStats() if options.mode == "speculative" else None
    with state.split_between_processes(examples) as shard:
        batches = list(_chunks(shard, batch_size))
        bar = tqdm(batches, desc=desc, disable=not (progress and state.is_main_process), leave=False)
        for i, chunk in enumerate(bar):
            res = vlm.generate([e.image_path for e in chunk], [e.prompt for e in chunk], options,
                               pixel_noise=pixel_noise, noise_seed=noise_seed + i)
            seconds += res.seconds
            for e, text, layers in zip(chunk, res.texts, res.exit_layers):
                preds.append({"key": e.key, "prediction": text, "exit_layers": layers})
            step_full, step_actual = work_totals(res.records, res.live_rows, cost)
            full, actual = full + step_full, actual + step_actual
            if spec is not None:
                spec.add(res.speculative)
    totals = gather_object([(full, actual, seconds, spec)])
    preds = gather_object(preds)
    if spec is not None:
        spec = SpeculativeStats()
        for t in totals:
            spec.add(t[3])
    return Decoded(preds, sum(t[0] for t in totals), sum(t[1] for t in totals), max(t[2] for t in totals), spec)


def _speed(d: Decoded, num_layers: int, exit_layers: list[int]) -> tuple[dict, dict]:
    layers = [layer for p in d.preds for layer in p["exit_layers"]]
    speed = {
        "parameter_speedup": parameter_speedup(layers, num_layers),
        "compute_speedup": d.full / d.actual if d.actual else 1.0,
        "tokens": len(layers),
        "seconds": d.seconds,
        "tokens_per_second": len(layers) / d.seconds if d.seconds else 0.0,
    }
    if d.speculative is not None:
        speed["speculative"] = d.speculative.to_json(num_layers)
    return speed, exit_fractions(layers, exit_layers, num_layers)


def _exit_layers(vlm) -> list[int]:
    return list(vlm.exits.layers) if vlm.exits is not None else []


def evaluate_captions(vlm, samples: list[CaptionSample], options: DecodeOptions, *, prompt: str = CAPTION_PROMPT,
                      official: bool = True, spice: bool = False, **decode_kwargs) -> EvalResult:
    """BLEU/METEOR/ROUGE-L/CIDEr (pycocoevalcap; `official=False`: in-process BLEU-4 and CIDEr only)."""
    examples = [Example(s.image_id, s.image_path, prompt, None) for s in samples]
    decoded = decode(vlm, examples, options, desc="captions", **decode_kwargs)
    preds = decoded.preds
    refs = {s.image_id: s.captions for s in samples}
    hyps = {p["key"]: p["prediction"] for p in preds}
    metrics = caption_metrics(hyps, refs, spice=spice) if official else fast_caption_metrics(hyps, refs)
    speed, fractions = _speed(decoded, vlm.backbone.lm.num_layers, _exit_layers(vlm))
    return EvalResult("caption", metrics, speed, fractions, asdict(options), preds)


def evaluate_vqa(vlm, samples: list[VQASample], options: DecodeOptions, *, metric: str = "vqa",
                 template: str = VQA_TEMPLATE, **decode_kwargs) -> EvalResult:
    """VQA accuracy (VQAv2 / OK-VQA / VizWiz, + VizWiz answerability) or GQA exact match."""
    examples = [Example(s.question_id, s.image_path, template.format(s.question), None) for s in samples]
    decoded = decode(vlm, examples, options, desc=metric, **decode_kwargs)
    preds = decoded.preds
    by_key = {p["key"]: p for p in preds}
    records = []
    for s in samples:
        pred = by_key[s.question_id]["prediction"]
        acc = gqa_accuracy(pred, s.answers[0]) if metric == "gqa" else vqa_accuracy(pred, s.answers)
        by_key[s.question_id]["accuracy"] = acc
        records.append({"accuracy": acc, "answer_type": s.answer_type})
    agg = aggregate_vqa(records)
    metrics = {"accuracy": agg["overall"], **{f"accuracy/{k}": v for k, v in agg["per_answer_type"].items()}}
    if metric == "vizwiz" and all(s.answerable is not None for s in samples):
        said = [by_key[s.question_id]["prediction"].strip().lower() == "unanswerable" for s in samples]
        metrics.update({f"answerability/{k}": v for k, v in
                        vizwiz_answerability(said, [bool(s.answerable) for s in samples]).items()})
    speed, fractions = _speed(decoded, vlm.backbone.lm.num_layers, _exit_layers(vlm))
    return EvalResult(metric, metrics, speed, fractions, asdict(options), preds)


def dialog_prompt(s: DialogSample) -> str:
    turns = " ".join(f"Q: {q} A: {a}" for q, a in s.history)
    return f"{s.caption}. {turns} Q: {s.question} A:".replace("  ", " ")


@torch.no_grad()
def candidate_log_likelihoods(vlm, examples: list[Example], options: DecodeOptions, batch_size: int = 100):
    """Sum of per-token log-probabilities of each example's target under the early-exit model.

    Scored teacher-forced: every token's hidden states are the full-depth ones (as the catch-up KV policy leaves
    them); at each token the exits are consulted in layer order with the decoding criterion and the token's
    log-probability is read from the exit where it fires, or from the final layer. With exits off it is the
    backbone's own log-likelihood.
    """
    bb, exits = vlm.backbone, vlm.exits if options.uses_exits else None
    criterion = make_criterion(options.criterion, options.threshold) if exits is not None else None
    collate = Collator(bb, train=True)
    device = vlm.device
    scores, layers_used = [], []
    for chunk in _chunks(examples, batch_size):
        batch = collate(chunk).to(device)
        keep = set(exits.layers) | {layer - 1 for layer in exits.layers} if exits is not None else set()
        tf = teacher_forced(bb, batch, keep=keep, logits=True)
        logp = torch.log_softmax(tf.logits.float(), -1)
        chosen = torch.full(tf.targets.shape, bb.lm.num_layers, device=device)
        if exits is not None and not criterion.never_exits():
            flat_rows = torch.arange(tf.targets.numel(), device=device)
            crit_state = criterion.new_step(tf.targets.numel(), device)
            undecided = torch.ones(tf.targets.numel(), dtype=torch.bool, device=device)
            flat_logp = logp.flatten(0, 1).clone()
            for layer, exit_ in zip(exits.layers, exits.exits):
                h = tf.states[layer]
                state = exit_.state(bb.lm, h, tf.ctx, None)
                ex_logits = exit_.logits(bb.lm, state).flatten(0, 1)
                prev_h = tf.states.get(layer - 1, h).flatten(0, 1)
                rows = flat_rows[undecided]
                go = criterion(crit_state, rows, ex_logits[rows], h.flatten(0, 1)[rows], prev_h[rows])
                leaving = rows[go]
                flat_logp[leaving] = torch.log_softmax(ex_logits[leaving].float(), -1)
                chosen.view(-1)[leaving] = layer
                undecided[leaving] = False
            logp = flat_logp.view_as(logp)
        mask = tf.targets != IGNORE
        tok = logp.gather(-1, tf.targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores.extend(((tok * mask).sum(-1)).tolist())
        layers_used.extend(chosen[mask].tolist())
    return scores, layers_used


def evaluate_visdial(vlm, samples: list[DialogSample], options: DecodeOptions, batch_size: int = 100,
                     progress: bool = True) -> EvalResult:
    """MRR (and R@k, mean rank) by ranking the 100 candidate answers by their early-exit log-likelihood."""
    ranks, preds, all_layers = [], [], []
    for s in tqdm(samples, desc="visdial", leave=False, disable=not progress):
        prompt = dialog_prompt(s)
        examples = [Example(f"{s.image_id}/{s.round_id}/{j}", s.image_path, prompt, c)
                    for j, c in enumerate(s.candidates)]
        scores, layers = candidate_log_likelihoods(vlm, examples, options, batch_size)
        all_layers.extend(layers)
        gt = s.candidates[s.gt_index]
        rank = gt_rank(scores, s.gt_index)
        ranks.append(rank)
        preds.append({"key": f"{s.image_id}/{s.round_id}", "prediction": s.candidates[max(range(len(scores)),
                      key=scores.__getitem__)], "ground_truth": gt, "rank": rank})
    num_layers = vlm.backbone.lm.num_layers
    speed = {"parameter_speedup": parameter_speedup(all_layers, num_layers), "tokens": len(all_layers)}
    return EvalResult("visdial", visdial_metrics(ranks), speed,
                      exit_fractions(all_layers, _exit_layers(vlm), num_layers), asdict(options), preds)


def speed_comparison(vlm, examples: list[Example], options: DecodeOptions, *, repeats: int = 3,
                     batch_size: int = 1, hf_generate: bool = True, pixel_noise: float = 0.0,
                     also: dict[str, DecodeOptions] | None = None) -> dict:
    """Tokens/s of decoding with `options` vs our full depth vs the VLM's own `generate`, side by side.

    Paths are named by mode ("early_exit" / "speculative"), plus "full_depth", "hf_generate" and any `also` paths
    (name -> options). Every path decodes the same examples; early exit produces its own tokens, so tokens/s (not
    seconds) is compared. Paths alternate item by item; median of `repeats` after one warm-up. `ratios` holds every
    path's tokens/s over full depth's and over transformers'. `hf_generate=False` leaves transformers out;
    `pixel_noise` (Table 6) perturbs the images of our paths alike and needs `hf_generate=False`.
    """
    if pixel_noise and hf_generate:
        raise ValueError("pixel_noise applies to freevlm's decoding paths only; pass hf_generate=False")
    bb = vlm.backbone
    batches = list(_chunks(examples, batch_size))
    paths = {} if options.mode == "full" else {options.mode: options}
    paths.update(also or {})
    paths["full_depth"] = replace(options, mode="full")

    def vlm_item(chunk, opts: DecodeOptions):
        images, prompts = [e.image_path for e in chunk], [e.prompt for e in chunk]
        return lambda: vlm.generate(images, prompts, opts, pixel_noise=pixel_noise, tokenizer_decode=False).num_tokens

    def hf_item(chunk):
        enc = encode_prompts(bb, [load_image(e.image_path) for e in chunk], [e.prompt for e in chunk])
        enc = {k: v.to(vlm.device) for k, v in enc.items()}
        eos = bb.lm.config.eos_token_id

        def fn():
            out = bb.hf_generate(max_new_tokens=options.max_new_tokens, num_beams=options.num_beams,
                                 do_sample=False, **enc)
            gen = out[:, 1:] if bb.lm.is_encoder_decoder else out[:, enc["input_ids"].shape[1]:]
            return sum(next((i + 1 for i, t in enumerate(row) if t == eos), len(row)) for row in gen.tolist())

        return fn

    runs = {name: [vlm_item(c, opts) for c in batches] for name, opts in paths.items()}
    if hf_generate:
        runs["hf_generate"] = [hf_item(c) for c in batches]
    with torch.no_grad():
        result = measure_throughput(runs, repeats=repeats)
    fd = result["full_depth"]["tokens_per_second"]
    ratios = {f"{name}_vs_full_depth": result[name]["tokens_per_second"] / fd for name in paths if name != "full_depth"}
    if hf_generate:
        hf = result["hf_generate"]["tokens_per_second"]
        ratios.update({f"{name}_vs_hf_generate": result[name]["tokens_per_second"] / hf for name in paths})
    result["ratios"] = ratios
    return result


def select_threshold(results: dict[float, EvalResult], metric: str) -> float:
    """§4: the best-performing alpha on the development split; ties go to the smallest alpha (the fastest)."""
    best = max(r.metrics[metric] for r in results.values())
    return min(a for a, r in results.items() if r.metrics[metric] >= best)
