"""From dataset records to model batches: (image, prompt, target) examples, and their tokenisation.

Prompts go through the backbone's own transformers processor (so BLIP-2's query placeholders, InstructBLIP's
Q-Former instruction and LLaVA's patch placeholders are laid out exactly as transformers expects); targets are
appended as plain token ids + EOS. Decoder-only LMs get one sequence (prompt, target) with labels on the target;
encoder-decoder LMs get the prompt as encoder input and the target as labels.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import torch

from freevlm.data.images import load_image
from freevlm.data.records import CaptionSample, VQASample

IGNORE = -100
CAPTION_PROMPT = "a photo of"  # §4: "For image captioning, we use a prompt as 'a photo of'"
VQA_TEMPLATE = "Question: {} Answer:"  # BLIP-2's zero-shot VQA prompt


@dataclass
class Example:
    key: str  # image id (captions) or question id (VQA), for bookkeeping and scoring
    image_path: Path
    prompt: str
    target: str | None  # caption / answer; None when unlabelled


def caption_examples(samples: list[CaptionSample], prompt: str = CAPTION_PROMPT, every_caption: bool = True):
    """One example per (image, reference caption), as BLIP-2 fine-tunes; or one per image (its first caption)."""
    out = []
    for s in samples:
        captions = s.captions if every_caption else s.captions[:1]
        out.extend(Example(s.image_id, s.image_path, prompt, c) for c in captions or [None])
    return out


def majority_answer(answers: list[str]) -> str | None:
    """The most frequent human answer (ties: the first seen), the usual VQA fine-tuning target."""
    if not answers:
        return None
    counts = collections.Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def vqa_examples(samples: list[VQASample], template: str = VQA_TEMPLATE):
    return [Example(s.question_id, s.image_path, template.format(s.question), majority_answer(s.answers))
            for s in samples]


@dataclass
class Batch:
    keys: list[str]
    pixel_values: torch.Tensor  # (B, 3, H, W)
    input_ids: torch.Tensor  # (B, T) prompt (+ target, decoder-only) token ids
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor | None = None  # (B, T) decoder-only / (B, L) encoder-decoder; IGNORE where no loss
    extra: dict = field(default_factory=dict)  # e.g. InstructBLIP's qformer_input_ids / qformer_attention_mask

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(self.keys, move(self.pixel_values), move(self.input_ids), move(self.attention_mask),
                     move(self.labels), {k: move(v) for k, v in self.extra.items()})


def encode_prompts(backbone, images, prompts: list[str], padding_side: str = "left") -> dict:
    """Images + prompts through the backbone's processor: pixel_values, input_ids, attention_mask (+ extra)."""
    tokenizer = backbone.processor.tokenizer
    tokenizer.padding_side = padding_side
    texts = [backbone.image_prompt(p) for p in prompts]
    enc = backbone.processor(images=images, text=texts, padding=True, return_tensors="pt")
    return dict(enc)


def _split(enc: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    extra = {k: v for k, v in enc.items() if k not in ("pixel_values", "input_ids", "attention_mask")}
    return enc["pixel_values"], enc["input_ids"], enc["attention_mask"], extra


class Collator:
    """Examples -> Batch. `train=True` appends targets with labels; otherwise prompts only, left-padded."""

    def __init__(self, backbone, train: bool = True, max_target_tokens: int = 32):
        self.backbone = backbone
        self.train = train
        self.max_target_tokens = max_target_tokens

    def target_ids(self, text: str) -> list[int]:
        tok = self.backbone.processor.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"][: self.max_target_tokens]
        return ids + [tok.eos_token_id]

    def __call__(self, examples: list[Example]) -> Batch:
        images = [load_image(e.image_path) for e in examples]
        keys = [e.key for e in examples]
        if not self.train:
            pixels, ids, mask, extra = _split(encode_prompts(self.backbone, images, [e.prompt for e in examples]))
            return Batch(keys, pixels, ids, mask, None, extra)
        pixels, ids, mask, extra = _split(encode_prompts(self.backbone, images, [e.prompt for e in examples], "right"))
        targets = [self.target_ids(e.target) for e in examples]
        pad = self.backbone.processor.tokenizer.pad_token_id
        if self.backbone.lm.is_encoder_decoder:
            labels = _pad([t for t in targets], IGNORE)
            return Batch(keys, pixels, ids, mask, labels, extra)
        rows, label_rows = [], []
        for r, tgt in enumerate(targets):
            prompt = ids[r, : int(mask[r].sum())].tolist()  # right padding: the real tokens come first
            rows.append(prompt + tgt)
            label_rows.append([IGNORE] * len(prompt) + tgt)
        full = _pad(rows, pad)
        return Batch(keys, pixels, full, (_pad([[1] * len(r) for r in rows], 0)), _pad(label_rows, IGNORE), extra)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)
