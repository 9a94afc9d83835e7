"""A tiny CLIP for the embedded default: transformers' `CLIPModel` built from config and trained contrastively.

§3.4 ranks CapFilt's sampled captions with CLIP ViT-L/14. Offline there is no CLIP checkpoint, so the embedded
default trains its own on the synthetic train split's (image, reference caption) pairs: InfoNCE in both directions
(image -> text over the batch's captions, text -> image over the batch's images), as CLIP is trained. Two additions
suit a 2000-image corpus whose captions differ in single words:

- **hard negatives** (as NegCLIP): each pair brings `hard_negatives` near-miss captions (one attribute or one object
  changed, `synthetic.wrong_captions`) into its image -> text softmax. With in-batch negatives alone a small CLIP
  learns which words co-occur with an image but not which colour goes with which shape, while the captions a
  backbone samples are mostly near misses;
- **no false negatives**: a caption that describes the same objects as a batch image's own caption (`meaning`) is
  masked out of that image's softmax instead of being pushed away (single-object images repeat often).

The result is saved as an ordinary CLIP checkpoint folder (weights + config, image processor, tokenizer), which
`freevlm.rankers.load_ranker` reads like any local CLIP.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from freevlm.data.images import load_image
from freevlm.train.loop import (
    LoopConfig,
    OptimConfig,
    config_dict,
    fit,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    open_run,
)


@dataclass
class ClipConfig:
    """Sizes and training of the tiny CLIP (both towers share the width and depth)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    ffn: int = 128
    patch_size: int = 8
    projection_dim: int = 64
    max_text_tokens: int = 40  # longest caption (tokens, with start and end); the synthetic ones have <= 30
    hard_negatives: int = 3  # near-miss captions per pair added to its image -> text softmax (0: plain CLIP)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", lr=2e-3, warmup_steps=20,
                                                                   weight_decay=0.01))
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=2, batch_size=128))


@dataclass
class ContrastivePair:
    image_path: Path
    text: str
    negatives: list[str] = field(default_factory=list)  # hard negatives: wrong captions for this image


def build_tiny_clip(cfg: ClipConfig, tokenizer, image_size: int, seed: int = 0):
    """(random `CLIPModel`, its `CLIPImageProcessorPil`) for `tokenizer`'s vocabulary and square images."""
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.ffn,
                          num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                          max_position_embeddings=cfg.max_text_tokens, projection_dim=cfg.projection_dim,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=cfg.hidden, intermediate_size=cfg.ffn, num_hidden_layers=cfg.layers,
                              num_attention_heads=cfg.heads, image_size=image_size, patch_size=cfg.patch_size,
                              projection_dim=cfg.projection_dim)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=cfg.projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    return model, processor


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE with hard negatives and masked false negatives, as one module (for DDP)."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        img = self.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        txt = self.model.get_text_features(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"]).pooler_output
        img, txt = nn.functional.normalize(img, dim=-1), nn.functional.normalize(txt, dim=-1)
        logits = self.model.logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, B + B * negatives)
        logits = logits.masked_fill(batch["same_meaning"], float("-inf"))
        n = img.shape[0]
        target = torch.arange(n, device=logits.device)
        image_to_text = nn.functional.cross_entropy(logits, target)
        text_to_image = nn.functional.cross_entropy(logits[:, :n].T, target)
        return (image_to_text + text_to_image) / 2


def train_clip(model: CLIPModel, tokenizer, image_processor, pairs: list[ContrastivePair], cfg: ClipConfig,
               out: str | Path, meaning: Callable[[str], Hashable] | None = None, resume: bool = True) -> dict:
    """Train `model` in place on `pairs` (accelerate, checkpoints in `out`); returns the last epoch's mean loss.

    `meaning(text)` says when two captions describe the same image content (default: the same text): such a caption
    is not a negative for an image whose own caption means the same.
    """
    meaning = meaning or (lambda text: text)
    accelerator = make_accelerator()
    run = open_run(out, config_dict({"stage": "clip"}, cfg, {"pairs": len(pairs)}), resume, accelerator)
    # Every image and caption is preprocessed once: the towers are tiny, so decoding PNGs each epoch would dominate.
    paths = list(dict.fromkeys(p.image_path for p in pairs))
    index = {path: i for i, path in enumerate(paths)}
    pixels = torch.cat([image_processor(images=[load_image(p) for p in paths[i : i + 256]],
                                        return_tensors="pt")["pixel_values"] for i in range(0, len(paths), 256)])

    def encode(texts):
        return tokenizer(texts, truncation=True, max_length=cfg.max_text_tokens)["input_ids"]

    positives = encode([p.text for p in pairs])
    k = cfg.hard_negatives
    negatives = [encode(p.negatives[:k]) if k else [] for p in pairs]
    if k and any(len(n) < k for n in negatives):
        raise ValueError(f"every pair needs {k} hard negatives (ClipConfig.hard_negatives)")
    keys = [meaning(p.text) for p in pairs]
    neg_keys = [[meaning(t) for t in p.negatives[:k]] for p in pairs]
    pad = tokenizer.pad_token_id

    def collate(ids: list[int]) -> dict:
        rows = [positives[i] for i in ids] + [t for i in ids for t in negatives[i]]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        text_keys = [keys[i] for i in ids] + [key for i in ids for key in neg_keys[i]]
        same = torch.tensor([[j != a and text_keys[j] == keys[i] for j in range(len(rows))]
                             for a, i in enumerate(ids)])
        return {"pixel_values": pixels[[index[pairs[i].image_path] for i in ids]], "input_ids": input_ids,
                "attention_mask": (input_ids != pad).long(), "same_meaning": same}

    model.train()
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, -(-len(pairs) // cfg.loop.batch_size))
    module, optimizer, scheduler = accelerator.prepare(ContrastiveLoss(model), optimizer, scheduler)

    def step(batch: dict) -> dict[str, float]:
        loss = module(batch)
        accelerator.backward(loss)
        if cfg.optim.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item()}

    means = fit(accelerator, list(range(len(pairs))), collate, step, cfg.loop, run, "clip", [scheduler], resume)
    model.eval()
    model.requires_grad_(False)
    return means


def save_clip(model: CLIPModel, tokenizer, image_processor, folder: Path) -> None:
    """An ordinary CLIP checkpoint folder: config + weights, preprocessor_config.json, tokenizer files."""
    import shutil

    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
