"""Early-exit decoding driven by transformers' own `generate`: greedy, beam search, sampling, batching, padding.

`EarlyExitLM` presents the backbone's LM to transformers' `GenerationMixin` as an ordinary causal (or seq2seq) LM
whose `forward` runs one `ExitEngine` step. transformers therefore owns everything around the step: the cache object,
attention-mask growth, beam bookkeeping, logits processors and stopping criteria, so that with exits disabled
(alpha = 1, or no exits) the tokens are those of the VLM's own `generate`, greedy or beam. Beam search reorders the
exit caches with the backbone cache through `_reorder_cache`.

`generate()` is the convenience entry point: images + prompts in, text + token ids + per-token exit layers out.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, Seq2SeqLMOutput

from freevlm.backbones.base import LanguageModel
from freevlm.exits import ExitStack
from freevlm.generation.criteria import Confidence
from freevlm.generation.engine import ExitEngine, StepRecord
from freevlm.generation.kv import SkipPolicy, self_attention_cache


class EarlyExitLM(PreTrainedModel, GenerationMixin):
    """The backbone's LM with exits, as a model transformers' `generate` can drive. Holds no weights of its own."""

    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, lm: LanguageModel, engine: ExitEngine):
        super().__init__(copy.deepcopy(lm.config))
        # plain attributes, not submodules: the weights belong to the backbone and the exit stack
        self.__dict__["lm"] = lm
        self.__dict__["engine"] = engine
        self._device_ref = next(iter(lm.layers.parameters()))

    @property
    def device(self) -> torch.device:
        return self._device_ref.device

    @property
    def dtype(self) -> torch.dtype:
        return self._device_ref.dtype

    def get_encoder(self, modality=None):
        return self.lm.encoder

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
        decoder_input_ids=None, decoder_attention_mask=None, encoder_outputs=None, use_cache=None, **kwargs,
    ):
        lm = self.lm
        if lm.is_encoder_decoder:
            ids, mask, embeds = decoder_input_ids, decoder_attention_mask, None
            encoder = (encoder_outputs[0], attention_mask)
        else:
            ids, mask, embeds, encoder = input_ids, attention_mask, inputs_embeds, None
        past = self_attention_cache(past_key_values).get_seq_length(0)
        h0 = lm.embed(ids, embeds, position_ids, mask, past)
        logits = self.engine.step(h0, mask, position_ids, past_key_values, encoder, prefill=past == 0)
        output_cls = Seq2SeqLMOutput if lm.is_encoder_decoder else CausalLMOutputWithPast
        return output_cls(logits=logits[:, None, :], past_key_values=past_key_values)

    def _reorder_cache(self, past_key_values, beam_idx):
        past_key_values.reorder_cache(beam_idx)
        self.engine.reorder(beam_idx)
        return past_key_values


@dataclass
class GenerationResult:
    """What early-exit generation produced, token by token."""

    sequences: torch.Tensor  # (R, T) generated token ids, prompt removed, padded with pad_token_id
    texts: list[str]  # decoded sequences (empty strings when no tokenizer was given)
    exit_layers: list[list[int]]  # per sequence, the layer each generated token left at (N = final layer)
    trace: list[list[tuple[int, int]]]  # per sequence, the (step, batch row) that produced each token
    records: list[StepRecord]  # per step, per row: what the engine ran (step 0 is the prompt's prefill)
    num_layers: int  # N, the LM's depth
    seconds: float  # wall-clock time of the whole generate call
    live_rows: list[torch.Tensor]  # per step, rows whose output was still used (unfinished sequences / beams)
    logits: tuple[torch.Tensor, ...] | None = None  # per step (rows, V), when asked for with output_logits=True
    cache: object = None  # the backbone's KV cache after generation (transformers Cache)
    engine: ExitEngine | None = None  # holds the exit cache and, under catch-up, the tokens still pending


def _token_trace(sequences, beam_indices, eos_ids, pad_id, num_steps):
    """(step, row) of every generated token up to and including the first EOS, for each returned sequence."""
    traces, live = [], []
    for r in range(sequences.shape[0]):
        trace = []
        for t in range(sequences.shape[1]):
            row = r if beam_indices is None else int(beam_indices[r, t])
            if row < 0:
                break
            trace.append((t, row))
            if int(sequences[r, t]) in eos_ids:
                break
        traces.append(trace)
    if beam_indices is None:  # greedy/sampling: a row is live at step t until (and including) its EOS step
        lengths = torch.tensor([len(tr) for tr in traces])
        live = [torch.nonzero(lengths > t).flatten() for t in range(num_steps)]
    else:  # beam search: every running beam is live at every step
        width = beam_indices.max().item() + 1 if beam_indices.numel() else 0
        live = [torch.arange(width) for _ in range(num_steps)]
    return traces, live


@torch.no_grad()
def generate_from_inputs(
    lm: LanguageModel, exits: ExitStack | None, lm_inputs, *, criterion=None, policy: SkipPolicy | None = None,
    tokenizer=None, **generate_kwargs,
) -> GenerationResult:
    """Early-exit generation from prepared LM inputs (see `VLMBackbone.prepare`).

    `generate_kwargs` go to transformers' `generate` (max_new_tokens, num_beams, do_sample, length_penalty, ...).
    With `criterion=None` the exits are not consulted: full-depth layer-by-layer decoding.
    """
    engine = ExitEngine(lm, exits, criterion or Confidence(1.0), policy or SkipPolicy())
    model = EarlyExitLM(lm, engine)
    gen_cfg = dict(do_sample=False, return_dict_in_generate=True)
    gen_cfg.update(generate_kwargs)
    inputs = dict(inputs_embeds=lm_inputs.inputs_embeds, attention_mask=lm_inputs.attention_mask)
    if not lm.is_encoder_decoder:
        inputs["input_ids"] = lm_inputs.input_ids
    start = time.perf_counter()
    out = model.generate(**inputs, **gen_cfg)
    seconds = time.perf_counter() - start
    prompt_len = 1 if lm.is_encoder_decoder else lm_inputs.input_ids.shape[1]
    sequences = out.sequences[:, prompt_len:]
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    beam_indices = getattr(out, "beam_indices", None)
    traces, live = _token_trace(sequences, beam_indices, eos_ids, model.generation_config.pad_token_id,
                                len(engine.records))
    exit_layers = [[int(engine.records[t].exit_layer[row]) for t, row in tr] for tr in traces]
    texts = [""] * len(traces)
    if tokenizer is not None:
        texts = [tokenizer.decode([int(sequences[i, t]) for t, _ in tr], skip_special_tokens=True).strip()
                 for i, tr in enumerate(traces)]
    return GenerationResult(
        sequences, texts, exit_layers, traces, engine.records, lm.num_layers, seconds, live,
        getattr(out, "logits", None), getattr(out, "past_key_values", None), engine,
    )
