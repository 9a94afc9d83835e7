"""CapFilt's caption rankers (§3.4): a score per (image, sampled caption); higher = a better match.

Every ranker has one interface, `ranker(backbone, candidates) -> scores` (a float tensor, one score per candidate
`Example`, whose `target` is the caption), so `capfilt_targets` takes any of them:

- `ClipRanker`: the paper's ranker. Any local CLIP checkpoint folder (`CLIPModel`: config, weights, a tokenizer and
  `preprocessor_config.json`; e.g. a copy of openai/clip-vit-large-patch14, or the embedded default's tiny CLIP);
  the score is the cosine similarity of the projected, normalised image and text embeddings. Images go through
  `CLIPImageProcessorPil` (PIL, no torchvision); each distinct image is embedded once per call.
- `ItmRanker`: a BLIP-2 image-text matching head (`Blip2ForImageTextRetrieval`, e.g. Salesforce/blip2-itm-vit-g):
  the log-probability of "match" from the ITM head, as BLIP's own CapFilt filter uses.
- `LikelihoodRanker`: the backbone's own length-normalised log-likelihood of the caption given the image (needs no
  second model; it ranks what the backbone already believes, so it filters little).
- `RandomRanker`: random scores, the control.

`load_ranker("clip-folder" | "likelihood" | "random")` picks one; a bad folder fails with one FreeVLMError line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from freevlm.data.images import load_image
from freevlm.errors import FreeVLMError
from freevlm.losses import IGNORE
from freevlm.train.batches import Collator, Example
from freevlm.train.forward import teacher_forced

RANKER_CHOICES = "likelihood, random, or a CLIP / BLIP-2 image-text retrieval checkpoint folder"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


class CaptionRanker(Protocol):
    def __call__(self, backbone, candidates: list[Example]) -> torch.Tensor:
        """A score per candidate (higher = better match of caption and image)."""
        ...


def _chunks(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class LikelihoodRanker:
    """Mean log-probability per token of the candidate caption given the image, under the backbone's final layer."""

    def __init__(self, batch_size: int = 32):
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, backbone, candidates: list[Example]) -> torch.Tensor:
        collate = Collator(backbone, train=True)
        scores = [torch.zeros(0)]
        for chunk in _chunks(candidates, self.batch_size):
            batch = collate(chunk).to(next(backbone.model.parameters()).device)
            tf = teacher_forced(backbone, batch, keep=set(), logits=True)
            mask = tf.targets != IGNORE
            logp = torch.log_softmax(tf.logits.float(), -1)
            tok = logp.gather(-1, tf.targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores.append(((tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)).cpu())
        return torch.cat(scores)


class RandomRanker:
    """Uniform random scores from its own seeded generator (the global RNG is left alone)."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, backbone, candidates: list[Example]) -> torch.Tensor:
        return torch.rand(len(candidates), generator=self.generator)


def _folder(path: str | Path) -> tuple[Path, dict]:
    folder = Path(path)
    if not folder.is_dir():
        raise FreeVLMError(f"ranker folder not found: {folder} (--ranker takes {RANKER_CHOICES})")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FreeVLMError(f"ranker folder {folder} has no config.json (not a transformers checkpoint folder)")
    try:
        return folder, json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise FreeVLMError(f"unreadable ranker config {config_file}: {err}") from None


def _load(what: str, folder: Path, load):
    """`load()`, with whatever transformers raises for a broken folder turned into one line."""
    from safetensors import SafetensorError

    try:
        return load()
    except (OSError, ValueError, TypeError, KeyError, SafetensorError) as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise FreeVLMError(f"cannot load the {what} of ranker {folder}: {reason}") from None


def _check_weights(folder: Path) -> None:
    """The safetensors headers read and checked against the file sizes before transformers loads them."""
    from freevlm.backbones.common import weight_keys

    try:
        weight_keys(folder)
    except FreeVLMError as err:
        raise FreeVLMError(f"cannot load the weights of ranker {folder}: {err}") from None


def _tokenizer(folder: Path):
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FreeVLMError(f"no tokenizer in ranker folder {folder} (expected one of {', '.join(_TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    return _load("tokenizer", folder, lambda: AutoTokenizer.from_pretrained(folder))


def _image_processor(folder: Path, cls):
    if not (folder / "preprocessor_config.json").is_file():
        raise FreeVLMError(f"no image processor in ranker folder {folder} (preprocessor_config.json)")
    return _load("image processor", folder, lambda: cls.from_pretrained(folder))


def _device_of(backbone, default: torch.device) -> torch.device:
    if backbone is None:
        return default
    return next(backbone.model.parameters()).device


def _image_index(candidates: list[Example]) -> tuple[list[Path], torch.Tensor]:
    """The distinct images of `candidates` (first-seen order) and each candidate's index into them."""
    paths = list(dict.fromkeys(Path(c.image_path) for c in candidates))
    position = {p: i for i, p in enumerate(paths)}
    return paths, torch.tensor([position[Path(c.image_path)] for c in candidates], dtype=torch.long)


class ClipRanker:
    """Cosine similarity of CLIP's projected, normalised image and text embeddings."""

    def __init__(self, path: str | Path, batch_size: int = 64):
        from transformers import CLIPImageProcessorPil, CLIPModel

        folder, config = _folder(path)
        if config.get("model_type") != "clip":
            raise _not_a_ranker(folder, config)
        self.folder, self.batch_size = folder, batch_size
        self.tokenizer = _tokenizer(folder)
        self.image_processor = _image_processor(folder, CLIPImageProcessorPil)
        _check_weights(folder)
        self.model: nn.Module = _load("weights", folder, lambda: CLIPModel.from_pretrained(folder)).eval()
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def __call__(self, backbone, candidates: list[Example]) -> torch.Tensor:
        if not candidates:
            return torch.zeros(0)
        device = _device_of(backbone, next(self.model.parameters()).device)
        self.model.to(device)
        paths, index = _image_index(candidates)
        images = torch.cat([self.embed_images(chunk, device) for chunk in _chunks(paths, self.batch_size)])
        texts = torch.cat([self.embed_texts([c.target for c in chunk], device)
                           for chunk in _chunks(candidates, self.batch_size)])
        return (images[index.to(device)] * texts).sum(-1).float().cpu()

    def embed_images(self, paths: list[Path], device) -> torch.Tensor:
        pixels = self.image_processor(images=[load_image(p) for p in paths], return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(device, self.model.dtype)).pooler_output
        return nn.functional.normalize(out.float(), dim=-1)

    def embed_texts(self, texts: list[str], device) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self.model.get_text_features(input_ids=enc["input_ids"].to(device),
                                           attention_mask=enc["attention_mask"].to(device)).pooler_output
        return nn.functional.normalize(out.float(), dim=-1)


class ItmRanker:
    """log P(match) from a BLIP-2 image-text matching head (`Blip2ForImageTextRetrieval`, ITM mode)."""

    def __init__(self, path: str | Path, batch_size: int = 32):
        from transformers import Blip2ForImageTextRetrieval, BlipImageProcessorPil

        folder, config = _folder(path)
        if config.get("model_type") != "blip-2" or "Blip2ForImageTextRetrieval" not in config.get("architectures", []):
            raise _not_a_ranker(folder, config)
        self.folder, self.batch_size = folder, batch_size
        self.tokenizer = _tokenizer(folder)
        self.image_processor = _image_processor(folder, BlipImageProcessorPil)
        _check_weights(folder)
        self.model: nn.Module = _load("weights", folder,
                                      lambda: Blip2ForImageTextRetrieval.from_pretrained(folder)).eval()
        self.max_length = min(self.model.config.qformer_config.max_position_embeddings, 128)

    @torch.no_grad()
    def __call__(self, backbone, candidates: list[Example]) -> torch.Tensor:
        if not candidates:
            return torch.zeros(0)
        m = self.model
        device = _device_of(backbone, next(m.parameters()).device)
        m.to(device)
        paths, index = _image_index(candidates)
        # The vision encoder (ViT-g on the real model) runs once per distinct image, not once per candidate: this is
        # the ITM branch of `Blip2ForImageTextRetrieval.forward` with the image embeddings computed up front.
        vision = []
        for chunk in _chunks(paths, self.batch_size):
            pixels = self.image_processor(images=[load_image(p) for p in chunk], return_tensors="pt")["pixel_values"]
            vision.append(m.vision_model(pixel_values=pixels.to(device, m.dtype)).last_hidden_state)
        image_embeds = torch.cat(vision)
        scores = []
        for rows in _chunks(list(range(len(candidates))), self.batch_size):
            enc = self.tokenizer([candidates[i].target for i in rows], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(device)
            img = image_embeds[index[rows].to(device)]
            queries = m.query_tokens.expand(len(rows), -1, -1)
            mask = torch.cat([torch.ones(queries.shape[:2], dtype=torch.long, device=device), enc["attention_mask"]],
                             dim=1)
            out = m.qformer(query_embeds=m.embeddings(input_ids=enc["input_ids"], query_embeds=queries),
                            query_length=queries.shape[1], attention_mask=mask, encoder_hidden_states=img,
                            encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long, device=device))
            hidden = out.last_hidden_state[:, : queries.shape[1]].to(m.itm_head.weight.dtype)
            logits = m.itm_head(hidden).mean(dim=1)
            scores.append(torch.log_softmax(logits.float(), -1)[:, 1].cpu())
        return torch.cat(scores)


def _not_a_ranker(folder: Path, config: dict) -> FreeVLMError:
    kind = config.get("model_type", "unknown")
    arch = ", ".join(config.get("architectures") or []) or "no architectures"
    return FreeVLMError(f"ranker folder {folder} holds a {kind!r} model ({arch}); --ranker takes a CLIP model "
                        "(model_type 'clip') or a BLIP-2 Blip2ForImageTextRetrieval, or likelihood / random")


def load_ranker(spec: str | Path, seed: int = 0) -> CaptionRanker:
    """'likelihood', 'random' (seeded by `seed`), or a checkpoint folder: CLIP or BLIP-2 image-text retrieval."""
    if str(spec) == "likelihood":
        return LikelihoodRanker()
    if str(spec) == "random":
        return RandomRanker(seed)
    folder, config = _folder(spec)
    if config.get("model_type") == "clip":
        return ClipRanker(folder)
    if "Blip2ForImageTextRetrieval" in config.get("architectures", []):
        return ItmRanker(folder)
    raise _not_a_ranker(folder, config)
