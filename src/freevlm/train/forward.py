"""Teacher-forced forward through the backbone, layer by layer, keeping the hidden states that exits train on.

The same adapter calls serve decoding and training, so the states an exit is trained on are the states it sees at
inference. `targets[b, t]` is the token position t must predict (IGNORE where no loss applies): for decoder-only LMs
that is the next token's label, for encoder-decoder LMs the decoder position's own label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from freevlm.backbones.base import LayerContext
from freevlm.train.batches import IGNORE, Batch


@dataclass
class TeacherForced:
    states: dict[int, torch.Tensor]  # layer i (1-based; 0 = embeddings) -> (B, T, D) hidden state after it
    final: torch.Tensor  # (B, T, D) h_N, the last layer's output before the final norm
    ctx: LayerContext  # the full-sequence layer context (causal mask, positions, encoder states)
    targets: torch.Tensor  # (B, T) next-token targets aligned with positions; IGNORE where no loss
    logits: torch.Tensor | None  # (B, T, V) final-layer logits, when asked for


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """T5's decoder inputs: the start token, then the labels shifted by one (IGNORE -> pad)."""
    out = labels.new_full(labels.shape, pad_id)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = start_id
    return out.masked_fill(out == IGNORE, pad_id)


def teacher_forced(backbone, batch: Batch, keep: set[int] | None = None, logits: bool = False) -> TeacherForced:
    """Run the whole sequence through the LM; keep h_i for i in `keep` (all layers when None)."""
    lm = backbone.lm
    inputs = backbone.prepare(batch.pixel_values, batch.input_ids, batch.attention_mask, **batch.extra)
    n = lm.num_layers
    keep = set(range(n + 1)) if keep is None else set(keep)
    if lm.is_encoder_decoder:
        cfg = lm.config
        encoder = (lm.encode(inputs.inputs_embeds, inputs.attention_mask), inputs.attention_mask)
        dec_ids = shift_right(batch.labels, cfg.decoder_start_token_id, cfg.pad_token_id)
        hidden = lm.embed(dec_ids, None, None, None, 0)
        ctx = lm.context(hidden, None, None, 0, None, encoder)
        targets = batch.labels
    else:
        hidden = lm.embed(None, inputs.inputs_embeds, None, inputs.attention_mask, 0)
        ctx = lm.context(hidden, inputs.attention_mask, None, 0, None)
        targets = torch.full_like(batch.labels, IGNORE)
        targets[:, :-1] = batch.labels[:, 1:]
    states = {0: hidden} if 0 in keep else {}
    for i, layer in enumerate(lm.layers, start=1):
        hidden = lm.run_layer(layer, hidden, ctx, None)
        if i in keep:
            states[i] = hidden
    out_logits = lm.head(lm.final_norm(hidden)) if logits else None
    return TeacherForced(states, hidden, ctx, targets, out_logits)
