"""Pretraining a random BLIP-2-architecture VLM, standing in for BLIP-2's own two pretraining stages.

BLIP-2 pretrains in two stages: (1) vision-language representation learning, where the Q-Former learns to extract
text-relevant visual features (ITC/ITM/ITG losses, LM absent), then (2) generative learning through the LM. A random
tiny model needs the same order: trained end to end from scratch, the LM learns the text prior within a few dozen
steps and starts ignoring the image tokens before the Q-Former has learned to carry any image information, and
grounding never appears in a CPU budget. So:

- `representation_warmup` is our stage (1): the vision encoder and Q-Former learn to predict the bag of words of an
  image's caption from the query outputs (a cheap grounding objective in place of ITC/ITM, which need a text
  encoder and negatives); the LM is not involved.
- stage (2) is `train_backbone` (stage1.py) with every part trainable, on captions and VQA.

`init_qformer_for_scratch` also widens the Q-Former's cross-attention initialisation: BLIP-2 starts its Q-Former from
BERT-base, while at the usual N(0, 0.02) a random cross-attention is uniform over image patches, and its average over
a mostly-background image carries almost no per-image signal.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from freevlm.train.batches import Collator, Example


@dataclass
class WarmupConfig:
    steps: int = 200  # optimizer steps of the bag-of-words objective
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    progress: bool = True


def init_qformer_for_scratch(model: nn.Module, std: float = 0.1, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.qformer.named_parameters():
            if p.dim() == 2 and "crossattention" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _bag_of_words(tokenizer, texts: list[str], vocab: int) -> torch.Tensor:
    target = torch.zeros(len(texts), vocab)
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        target[i, ids] = 1.0
    return target


def representation_warmup(backbone, examples: list[Example], cfg: WarmupConfig) -> list[float]:
    """Train the vision encoder + Q-Former to predict each caption's words from the queries (max over queries of a
    linear read-out); returns the loss per step. The read-out is discarded afterwards."""
    model = backbone.model
    tokenizer = backbone.processor.tokenizer
    vocab = len(tokenizer)
    torch.manual_seed(cfg.seed)
    readout = nn.Linear(model.config.qformer_config.hidden_size, vocab)
    groups = backbone.parameter_groups()
    params = groups["vision"] + groups["qformer"]
    optimizer = torch.optim.AdamW([*params, *readout.parameters()], lr=cfg.lr)
    order = list(examples)
    random.Random(cfg.seed).shuffle(order)
    collate = Collator(backbone, train=False)
    model.train()
    losses = []
    for step in tqdm(range(cfg.steps), desc="pretrain: representation", disable=not cfg.progress, leave=False):
        start = (step * cfg.batch_size) % len(order)
        chunk = order[start : start + cfg.batch_size] or order[: cfg.batch_size]
        batch = collate(chunk)
        vision = model.vision_model(batch.pixel_values).last_hidden_state
        queries = model.query_tokens.expand(len(chunk), -1, -1)
        ones = torch.ones(vision.shape[:2], dtype=torch.long)
        text = {"input_ids": None} if backbone.family == "instructblip" else {}  # InstructBLIP's takes an instruction
        out = model.qformer(query_embeds=queries, encoder_hidden_states=vision, encoder_attention_mask=ones, **text)
        logits = readout(out.last_hidden_state).amax(dim=1)  # (B, V): a word is present if some query says so
        target = _bag_of_words(tokenizer, [e.target for e in chunk], vocab)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses
