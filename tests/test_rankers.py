"""CapFilt rankers: CLIP and BLIP-2 ITM folders built from config load through `--ranker PATH` and score as their
models do; bad folders fail with one line."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import (
    Blip2Config,
    Blip2ForImageTextRetrieval,
    BlipImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
)

from freevlm.cli import main
from freevlm.data.tokenizer import build_word_tokenizer
from freevlm.errors import FreeVLMError
from freevlm.rankers import ClipRanker, ItmRanker, LikelihoodRanker, RandomRanker, load_ranker
from freevlm.train.batches import Example

TEXTS = ["a red circle", "two blue squares", "a small green triangle", "a red circle"]


def _images(folder, n=2):
    paths = []
    for i, colour in enumerate([(220, 40, 40), (40, 80, 220)][:n]):
        path = folder / f"img{i}.png"
        Image.new("RGB", (32, 32), colour).save(path)
        paths.append(path)
    return paths


def _clip_bpe_tokenizer(folder):
    """CLIP's own byte-pair tokenizer, saved as openai's checkpoints ship it (vocab.json + merges.txt), over single
    letters (no merges)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.save_pretrained(folder)
    (folder / "tokenizer.json").unlink()  # load from the BPE files, the harder path
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return tok


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A CLIP checkpoint folder as a user would have one: CLIPModel.save_pretrained + CLIP's BPE tokenizer + the
    image processor config, here at a tiny size built from config."""
    folder = tmp_path_factory.mktemp("clip")
    tok = _clip_bpe_tokenizer(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_a_clip_folder_loads_through_ranker_path_and_scores_the_cosine_of_its_embeddings(clip_folder, tmp_path):
    ranker = load_ranker(str(clip_folder))
    assert isinstance(ranker, ClipRanker)
    paths = _images(tmp_path)
    cands = [Example(str(i), paths[i % 2], "", t) for i, t in enumerate(TEXTS)]
    scores = ranker(None, cands)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    # the same numbers from CLIPModel's own forward: logits_per_image = logit_scale * cosine
    model = CLIPModel.from_pretrained(clip_folder).eval()
    tok = CLIPTokenizer.from_pretrained(clip_folder)
    assert len(tok) == 54 and tok("a b")["input_ids"] == [0, 3, 5, 1]  # <start> a</w> b</w> <end>
    pixels = CLIPImageProcessorPil.from_pretrained(clip_folder)(images=[Image.open(p) for p in paths],
                                                                return_tensors="pt")["pixel_values"]
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       pixel_values=pixels).logits_per_image / model.logit_scale.exp()
    expected = torch.stack([logits[i % 2, i] for i in range(4)])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    # batching does not change the scores (images are embedded once per call, texts in chunks)
    again = ClipRanker(clip_folder, batch_size=1)(None, [*cands, cands[0]])
    torch.testing.assert_close(again[:4], scores, rtol=1e-4, atol=1e-5)
    assert again[4] == pytest.approx(float(scores[0]), abs=1e-5)


@pytest.fixture(scope="module")
def itm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("itm")
    tok = build_word_tokenizer(TEXTS)
    tok.save_pretrained(folder)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                            pad_token_id=tok.pad_token_id, use_qformer_text_input=True),
        num_query_tokens=4, image_text_hidden_size=16)
    torch.manual_seed(0)
    Blip2ForImageTextRetrieval(config).save_pretrained(folder)
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_a_blip2_itm_folder_ranks_by_the_match_probability_of_its_itm_head(itm_folder, tmp_path):
    ranker = load_ranker(itm_folder)
    assert isinstance(ranker, ItmRanker)
    paths = _images(tmp_path)
    cands = [Example(str(i), paths[i % 2], "", t) for i, t in enumerate(TEXTS)]
    scores = ranker(None, cands)
    assert scores.shape == (4,) and bool((scores <= 0).all())  # log-probabilities
    torch.testing.assert_close(ranker(None, cands), scores)  # deterministic
    # equal to Blip2ForImageTextRetrieval's own ITM forward, which runs the vision encoder once per pair
    model = Blip2ForImageTextRetrieval.from_pretrained(itm_folder).eval()
    pixels = BlipImageProcessorPil.from_pretrained(itm_folder)(images=[Image.open(paths[i % 2]) for i in range(4)],
                                                               return_tensors="pt")["pixel_values"]
    enc = build_word_tokenizer(TEXTS)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    use_image_text_matching_head=True)
    torch.testing.assert_close(scores, torch.log_softmax(out.logits_per_image, -1)[:, 1], rtol=1e-4, atol=1e-5)


def test_named_rankers():
    assert isinstance(load_ranker("likelihood"), LikelihoodRanker)
    r = load_ranker("random", seed=3)
    assert isinstance(r, RandomRanker)
    cands = [Example("k", "unused", "", t) for t in TEXTS]
    torch.testing.assert_close(r(None, cands), RandomRanker(3)(None, cands))  # seeded, own generator


def _bad_folders(tmp_path, clip_folder, itm_folder):
    import shutil

    def copy(name, drop=()):
        dst = tmp_path / name
        shutil.copytree(clip_folder, dst)
        for pattern in drop:
            for f in dst.glob(pattern):
                f.unlink()
        return dst

    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_text("")
    opt = tmp_path / "opt"
    opt.mkdir()
    (opt / "config.json").write_text(json.dumps({"model_type": "opt", "architectures": ["OPTForCausalLM"]}))
    blip2_gen = tmp_path / "blip2-gen"
    shutil.copytree(itm_folder, blip2_gen)
    cfg = json.loads((blip2_gen / "config.json").read_text())
    (blip2_gen / "config.json").write_text(json.dumps({**cfg, "architectures": ["Blip2ForConditionalGeneration"]}))
    return {
        "missing": (tmp_path / "nowhere", "ranker folder not found"),
        "no config": (no_config, "has no config.json (not a transformers checkpoint folder)"),
        "not a CLIP": (opt, "holds a 'opt' model (OPTForCausalLM); --ranker takes a CLIP model"),
        "a BLIP-2 generator": (blip2_gen, "holds a 'blip-2' model (Blip2ForConditionalGeneration)"),
        "no tokenizer": (copy("no-tok", ["vocab.json", "merges.txt", "tokenizer*.json", "special_tokens_map.json"]),
                         "no tokenizer in ranker folder"),
        "no image processor": (copy("no-proc", ["preprocessor_config.json"]), "no image processor in ranker folder"),
        "no weights": (copy("no-weights", ["model.safetensors"]), "cannot load the weights of ranker"),
    }


def test_bad_ranker_folders_fail_with_one_clear_line(tmp_path, clip_folder, itm_folder, capsys):
    for case, (folder, message) in _bad_folders(tmp_path, clip_folder, itm_folder).items():
        with pytest.raises(FreeVLMError) as err:
            load_ranker(folder)
        assert message in str(err.value) and "\n" not in str(err.value), case
        # through the CLI: refused before the backbone is even opened (it does not exist here)
        code = main(["train-exits", "--backbone", str(tmp_path / "no-backbone"), "--out", str(tmp_path / "run"),
                     "--variant", "capfilt", "--ranker", str(folder), "--no-progress"])
        err_text = capsys.readouterr().err
        assert code == 2 and err_text.startswith("error: ") and message in err_text, case
        assert err_text.count("\n") == 1, case
