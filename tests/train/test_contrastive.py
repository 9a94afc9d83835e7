"""The tiny CLIP's contrastive training: InfoNCE both ways with hard negatives and masked false negatives; the loss
falls on a fixed small set, and the saved folder is an ordinary CLIP checkpoint that `load_ranker` reads."""

from __future__ import annotations

import json

import torch

from freevlm.data.images import load_image
from freevlm.data.tokenizer import build_clip_word_tokenizer
from freevlm.rankers import ClipRanker, load_ranker
from freevlm.train.batches import Example
from freevlm.train.contrastive import (
    ClipConfig,
    ContrastiveLoss,
    ContrastivePair,
    build_tiny_clip,
    save_clip,
    train_clip,
)
from freevlm.train.loop import LoopConfig, OptimConfig
from tests.train.conftest import COLOURS, colour_task

SMALL = ClipConfig(hidden=32, ffn=64, layers=1, heads=2, patch_size=8, projection_dim=16, hard_negatives=1,
                   optim=OptimConfig(name="adamw", lr=3e-3), loop=LoopConfig(epochs=40, batch_size=8, progress=False))


def test_false_negatives_are_masked_out_of_the_softmax():
    tok = build_clip_word_tokenizer(["a red blue square"])
    model, _ = build_tiny_clip(SMALL, tok, image_size=32)
    ids = tok(["a red square", "a blue square", "a red square"], padding=True, return_tensors="pt")["input_ids"]
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": ids, "attention_mask": (ids != 0).long(),
             "same_meaning": torch.tensor([[False, False, False], [False, False, False]])}
    loss = ContrastiveLoss(model)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
        txt = torch.nn.functional.normalize(model.get_text_features(input_ids=ids).pooler_output)
        logits = model.logit_scale.exp() * img @ txt.T
        plain = loss(batch)
        # text 2 (image 0's hard negative) says what image 1's caption says: it is no negative for image 1
        batch["same_meaning"] = torch.tensor([[False, False, False], [False, False, True]])
        masked = loss(batch)
    target = torch.arange(2)
    ce = torch.nn.functional.cross_entropy
    expected_plain = (ce(logits, target) + ce(logits[:, :2].T, target)) / 2
    expected_masked = (ce(torch.stack([logits[0], torch.cat([logits[1, :2], torch.tensor([-torch.inf])])]), target)
                       + ce(logits[:, :2].T, target)) / 2
    torch.testing.assert_close(plain, expected_plain)
    torch.testing.assert_close(masked, expected_masked)


def test_contrastive_loss_falls_and_the_saved_folder_is_a_clip_checkpoint(tmp_path):
    _, examples = colour_task(tmp_path / "data")  # 4 colours x 2 shapes, "a <colour> <shape>"
    tok = build_clip_word_tokenizer([e.target for e in examples])
    model, processor = build_tiny_clip(SMALL, tok, image_size=32, seed=0)
    pairs = []
    for e in examples:
        colour, shape = e.target.split()[1:]
        wrong = f"a {COLOURS[(COLOURS.index(colour) + 1) % 4]} {shape}"  # a near miss: the next colour
        pairs.append(ContrastivePair(e.image_path, e.target, [wrong]))
    train_clip(model, tok, processor, pairs, SMALL, tmp_path / "run")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    save_clip(model, tok, processor, tmp_path / "clip")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "clip").iterdir()}
    ranker = load_ranker(tmp_path / "clip")
    assert isinstance(ranker, ClipRanker)
    cands = [Example(p.image_path.stem, p.image_path, "", t) for p in pairs for t in (p.text, *p.negatives)]
    scores = ranker(None, cands)
    with torch.no_grad():  # the folder holds the trained weights: the in-memory model gives the same cosines
        pixels = processor(images=[load_image(p.image_path) for p in pairs], return_tensors="pt")["pixel_values"]
        img = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output)
        enc = tok([c.target for c in cands], padding=True, return_tensors="pt")
        txt = torch.nn.functional.normalize(model.get_text_features(**enc).pooler_output)
    torch.testing.assert_close(scores, (img.repeat_interleave(2, 0) * txt).sum(-1), rtol=1e-4, atol=1e-5)
