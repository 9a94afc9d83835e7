"""The embedded default: synthetic data + a tiny BLIP-2-architecture VLM, pretrained here in a few CPU minutes.

Nothing is downloaded. The data is `freevlm.data.synthetic` (coloured shapes, captions, VQA). The model is a real
`Blip2ForConditionalGeneration` at toy size: a 3-layer ViT on 64x64 images, a 2-layer Q-Former with 8 queries, and a
12-layer OPT LM (hidden 128) with a word-level vocabulary, so the LM head costs a small fraction of one layer
(`describe_default` prints both counts). Since the model starts random and the unsupervised variants skip stage 1,
a seeded pretraining on the synthetic *train* split (all parts trainable, captions + VQA) stands in for BLIP-2's
pretraining before any variant; it is cached on disk per (data, model, seed).

CapFilt (§3.4) ranks sampled captions with CLIP, so the default also trains its own tiny `CLIPModel` on the same
train split (`train.contrastive`), saved beside the backbone as an ordinary CLIP folder, `pretrain-s<seed>/clip`
(`default_clip_path`), that `--ranker PATH` loads like any other.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from transformers import Blip2Processor, BlipImageProcessorPil, InstructBlipProcessor

from freevlm.backbones import load_backbone
from freevlm.backbones.tiny import TinySize, build_tiny
from freevlm.data.synthetic import (
    SyntheticConfig,
    caption_meaning,
    corpus_text,
    load_synthetic_captions,
    load_synthetic_vqa,
    write_synthetic,
    wrong_captions,
)
from freevlm.data.tokenizer import build_clip_word_tokenizer, build_word_tokenizer
from freevlm.eval.efficiency import count_parameters
from freevlm.outputs import write_json
from freevlm.train.batches import CAPTION_PROMPT, VQA_TEMPLATE, caption_examples, vqa_examples
from freevlm.train.contrastive import ClipConfig, ContrastivePair, build_tiny_clip, save_clip, train_clip
from freevlm.train.loop import LoopConfig, OptimConfig
from freevlm.train.pretrain import WarmupConfig, init_qformer_for_scratch, representation_warmup
from freevlm.train.stage1 import Stage1Config, train_backbone

PROMPT_WORDS = " ".join([CAPTION_PROMPT, VQA_TEMPLATE.format(""), "Q: A:"])


@dataclass
class DefaultConfig:
    family: str = "blip2-opt"  # the architecture (backbones.tiny.FAMILIES); Q-Former families only
    data: SyntheticConfig = field(default_factory=SyntheticConfig)
    model: TinySize = field(default_factory=lambda: TinySize(
        lm_layers=12, lm_hidden=128, lm_heads=4, lm_ffn=512, vision_hidden=96, vision_layers=3, qformer_layers=2,
        image_size=64, patch_size=8, num_query_tokens=8, max_positions=128,
    ))
    pretrain: Stage1Config = field(default_factory=lambda: Stage1Config(
        train_parts=("vision", "qformer", "projection", "lm"),
        optim=OptimConfig(name="adamw", lr=2e-3, warmup_steps=30, weight_decay=0.01),
        loop=LoopConfig(epochs=1, batch_size=64),
    ))
    pretrain_vqa: bool = True  # add the train split's VQA questions to pretraining (Table 2/3 need VQA)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)  # BLIP-2 stage-1 stand-in: Q-Former grounding
    clip: ClipConfig | None = field(default_factory=ClipConfig)  # CapFilt's ranker (None: no CLIP is trained)


def default_tokenizer(data: SyntheticConfig):
    return build_word_tokenizer(corpus_text(data), extra_words=PROMPT_WORDS.split())


def build_default_model(cfg: DefaultConfig, seed: int):
    """The random (untrained) default VLM with its processor."""
    tok = default_tokenizer(cfg.data)
    size = TinySize(**{**asdict(cfg.model), "vocab_size": len(tok)})
    image_processor = BlipImageProcessorPil(size={"height": size.image_size, "width": size.image_size})
    if cfg.family.startswith("instructblip"):
        processor = InstructBlipProcessor(image_processor, tok, tok, num_query_tokens=size.num_query_tokens)
    elif cfg.family.startswith(("blip2", "minigpt4")):
        processor = Blip2Processor(image_processor, tok, num_query_tokens=size.num_query_tokens)
    else:
        raise ValueError(f"the embedded default supports Q-Former families, not {cfg.family!r}")
    return build_tiny(cfg.family, size, processor=processor, seed=seed)


def describe_default(backbone) -> dict:
    lm = backbone.lm
    return {
        "total_parameters": count_parameters(backbone.model),
        "lm_layer_parameters": count_parameters(lm.layers[0]),
        "lm_head_parameters": count_parameters(lm.lm_head),
        "lm_layers": lm.num_layers,
        "vocabulary": lm.vocab_size,
        "head_cost_in_layers": count_parameters(lm.lm_head) / count_parameters(lm.layers[0]),
    }


def prepare_data(root: str | Path, cfg: DefaultConfig) -> Path:
    return write_synthetic(cfg.data, Path(root)).root


def _pretrain_folder(root: Path, cfg: DefaultConfig, seed: int) -> Path:
    return root / (f"pretrain-s{seed}" if cfg.family == "blip2-opt" else f"pretrain-{cfg.family}-s{seed}")


def default_clip_path(root: str | Path, cfg: DefaultConfig | None = None, seed: int = 0) -> Path:
    """Where `pretrained_default` saves the embedded default's tiny CLIP (a CLIP checkpoint folder)."""
    return _pretrain_folder(Path(root), cfg or DefaultConfig(), seed) / "clip"


def _pretrained_clip(root: Path, cfg: DefaultConfig, seed: int, progress: bool) -> Path:
    """The embedded default's tiny CLIP, trained on the synthetic train split once (cached per data, CLIP config and
    seed, independently of the backbone's cache); returns its folder. It lives inside the backbone's pretraining run
    folder, so it is made after the backbone (`pretrained_default`)."""
    clip_cfg = cfg.clip or ClipConfig()
    data_root = prepare_data(root / "data", cfg)
    folder = default_clip_path(root, cfg, seed)
    stamp = folder.parent / "clip-identity.json"
    clip_cfg = replace(clip_cfg, loop=replace(clip_cfg.loop, seed=seed, progress=progress))
    described = asdict(clip_cfg)
    described["loop"].pop("progress")  # progress bars do not change the weights
    identity = json.loads(json.dumps({"data": asdict(cfg.data), "clip": described}))
    if stamp.is_file():
        if (folder / "config.json").is_file() and json.loads(stamp.read_text()) == identity:
            return folder
        shutil.rmtree(folder.parent / "clip-run", ignore_errors=True)  # a finished run of another configuration
        stamp.unlink()
    tokenizer = build_clip_word_tokenizer(corpus_text(cfg.data))
    model, image_processor = build_tiny_clip(clip_cfg, tokenizer, cfg.data.image_size, seed=seed)
    rng = random.Random(f"freevlm-clip-negatives:{seed}")
    pairs = [ContrastivePair(s.image_path, caption, wrong_captions(s.extra["objects"], rng, cfg.data,
                                                                   clip_cfg.hard_negatives))
             for s in load_synthetic_captions(data_root, "train") for caption in s.captions]
    train_clip(model, tokenizer, image_processor, pairs, clip_cfg, folder.parent / "clip-run",
               meaning=caption_meaning, resume=True)
    save_clip(model, tokenizer, image_processor, folder)
    write_json(stamp, identity)
    return folder


def pretrained_default(root: str | Path, cfg: DefaultConfig | None = None, seed: int = 0, progress: bool = True):
    """(data root, pretrained backbone) of the embedded default; trains once, then loads from root/pretrain-s{seed}.
    With `cfg.clip` set, the tiny CLIP ranker is trained too, after the backbone (`_pretrained_clip`)."""
    cfg = cfg or DefaultConfig()
    root = Path(root)
    data_root = prepare_data(root / "data", cfg)
    backbone = _pretrained_backbone(root, data_root, cfg, seed, progress)
    if cfg.clip is not None:  # after the backbone: its run folder must be a fresh or matching run when it trains
        _pretrained_clip(root, cfg, seed, progress)
    return data_root, backbone


def _pretrained_backbone(root: Path, data_root: Path, cfg: DefaultConfig, seed: int, progress: bool):
    out = _pretrain_folder(root, cfg, seed)
    done = out / "backbone" / "config.json"
    identity = {"family": cfg.family, "data": asdict(cfg.data), "model": asdict(cfg.model),
                "pretrain": asdict(cfg.pretrain), "pretrain_vqa": cfg.pretrain_vqa, "warmup": asdict(cfg.warmup),
                "seed": seed}
    stamp = out / "identity.json"
    if done.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(identity)):
        return load_backbone(out / "backbone")
    backbone = build_default_model(cfg, seed)
    captions = load_synthetic_captions(data_root, "train")
    init_qformer_for_scratch(backbone.model, seed=seed)
    # copies: the caller's config (and so the identity above) stays as given, whatever seed and progress this call uses
    warmup = replace(cfg.warmup, seed=seed, progress=progress)
    representation_warmup(backbone, caption_examples(captions, every_caption=False), warmup)
    examples = caption_examples(captions)
    if cfg.pretrain_vqa:
        examples += vqa_examples(load_synthetic_vqa(data_root, "train"))
    pre = replace(cfg.pretrain, loop=replace(cfg.pretrain.loop, seed=seed, progress=progress))
    train_backbone(backbone, examples, pre, out, stage="pretrain", resume=True)
    write_json(stamp, identity)
    return backbone
