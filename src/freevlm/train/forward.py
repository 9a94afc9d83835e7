"""Teacher-forced forward through the backbone, layer by layer, keeping the hidden states that exits train on.

The same adapter calls serve decoding and training, so the states an exit is trained on are the states it sees at
inference. `targets[b, t]` is the token position t must predict (IGNORE where no loss applies): for decoder-only LMs
that is the next token's label, for encoder-decoder LMs the decoder position's own label.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from freevlm.backbones.base import LayerContext
from freevlm.backbones.common import image_rows, per_image
from freevlm.train.batches import IGNORE, Batch


@dataclass
class TeacherForced:
    states: dict[int, torch.Tensor]  # layer i (1-based; 0 = embeddings) -> (B, T, D) hidden state after it
    final: torch.Tensor  # (B, T, D) h_N, the last layer's output before the final norm
    ctx: LayerContext  # the full-sequence layer context (causal mask, positions, encoder states)
    targets: torch.Tensor  # (B, T) next-token targets aligned with positions; IGNORE where no loss
    logits: torch.Tensor | None  # (B, T, V) final-layer logits when asked for; (M, V) with `at_targets`

    @property
    def mask(self) -> torch.Tensor:
        """(B, T): the positions that carry a loss."""
        return self.targets != IGNORE


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """T5's decoder inputs: the start token, then the labels shifted by one (IGNORE -> pad)."""
    out = labels.new_full(labels.shape, pad_id)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = start_id
    return out.masked_fill(out == IGNORE, pad_id)


class FrozenImageFeatures:
    """The LM-input image features of a frozen backbone, computed once per distinct image and then reused.

    Exit training (stage 2) never changes the vision encoder, Q-Former or projection, and runs the backbone in eval
    mode, so an image's features are a function of its pixels (and of InstructBLIP's Q-Former instruction). Caption
    data hold every image once per reference caption and once per epoch, so without a cache the vision side is
    recomputed 10-15 times per image: about a tenth of an exit-training step on the embedded default, and more on a
    real BLIP-2, whose ViT-g is the largest frozen part after the LM. transformers has no such cache, hence this one.

    Rows are keyed by a hash of their own inputs (pixels and any extra vision inputs), so no ids are needed and a row
    can only ever get its own image's features. Caching stops adding once `max_bytes` are held (a real BLIP-2 OPT
    needs 32 x 2560 floats = 320 KB per image); rows beyond that are computed every time.
    """

    def __init__(self, backbone, max_bytes: float = 4e9):
        self.backbone, self.max_bytes = backbone, max_bytes
        self.store: dict[bytes, torch.Tensor] = {}
        self.bytes = 0

    def _vision_extra(self, batch: Batch) -> dict:
        names = self.backbone.vision_inputs
        return {k: v for k, v in batch.extra.items() if names is None or k in names}

    def _key(self, batch: Batch, row: int) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        pixels, extra = image_rows(batch.pixel_values, self._vision_extra(batch), [row])
        if self.backbone.family in ("idefics3", "smolvlm"):
            # (1, tiles, 3, H, W), padded with all-zero tiles (which the model drops) up to the batch's most: a row's
            # key holds its real tiles only, so the same image has the same key in any batch
            real = pixels[0].flatten(1).ne(0).any(1)
            tiles = pixels.shape[1]
            pixels = pixels[:, real]
            extra = {k: v[:, real] if v.dim() > 2 and v.shape[1] == tiles else v for k, v in extra.items()}
        for t in (pixels, *(extra[k] for k in sorted(extra))):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()

    @torch.no_grad()
    def __call__(self, batch: Batch) -> torch.Tensor:
        """(sum of Q_b, D) features of the batch's images, row after row, computing only the ones not seen before.
        Rows may hold different numbers, told by their image placeholders (Qwen2-VL, LLaVA-OneVision: an image's
        size; Idefics3/SmolVLM: an image's tiles)."""
        keys = [self._key(batch, r) for r in range(batch.input_ids.shape[0])]
        missing = [r for r, k in enumerate(keys) if k not in self.store]
        fresh = {}
        if missing:
            pixels, extra = image_rows(batch.pixel_values, self._vision_extra(batch), missing)
            counts = (batch.input_ids[missing] == self.backbone.image_token_id).sum(1).tolist()
            feats = per_image(self.backbone.image_features(pixels, **extra), counts)
            for r, f in zip(missing, feats):
                fresh[keys[r]] = f
                if self.bytes + f.numel() * f.element_size() <= self.max_bytes:
                    self.store[keys[r]] = f.clone()
                    self.bytes += f.numel() * f.element_size()
        return torch.cat([fresh[k] if k in fresh else self.store[k] for k in keys])


def teacher_forced(backbone, batch: Batch, keep: set[int] | None = None, logits: bool = False,
                   image_features: torch.Tensor | None = None, at_targets: bool = False) -> TeacherForced:
    """Run the whole sequence through the LM; keep h_i for i in `keep` (all layers when None). `at_targets`: the
    final logits only at the M positions that carry a loss (row-major), not at the image, prompt and padding
    positions; on a real LM the head is ~7 layers' work, and most positions carry no loss. `image_features`:
    the batch's precomputed image features (a `FrozenImageFeatures` result), else the vision side runs."""
    lm = backbone.lm
    inputs = backbone.prepare(batch.pixel_values, batch.input_ids, batch.attention_mask,
                              image_features=image_features, **batch.extra)
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
        ctx = lm.context(hidden, inputs.attention_mask, None, 0, inputs.position_ids)
        targets = torch.full_like(batch.labels, IGNORE)
        targets[:, :-1] = batch.labels[:, 1:]
    states = {0: hidden} if 0 in keep else {}
    for i, layer in enumerate(lm.layers, start=1):
        hidden = lm.run_layer(layer, hidden, ctx, None)
        if i in keep:
            states[i] = hidden
    out_logits = None
    if logits:
        out_logits = lm.head(lm.final_norm(hidden[targets != IGNORE] if at_targets else hidden))
    return TeacherForced(states, hidden, ctx, targets, out_logits)
