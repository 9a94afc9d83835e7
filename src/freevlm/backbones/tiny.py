"""Tiny random models of every supported architecture, built from config in milliseconds.

They are real transformers architectures (the same classes as BLIP-2 OPT-2.7B or InstructBLIP Vicuna-7B) at toy
sizes, so every code path that runs on a real checkpoint runs on them: tests build them on CPU, and the embedded
default VLM (`default_vlm_config`) is one of them, trained on the synthetic data.

Special token ids are shared by every tiny model so one word-level tokenizer serves all of them (see
`freevlm.data.tokenizer`): pad=0, bos=1, eos=2, unk=3, image placeholder=4.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    Blip2Config,
    CLIPVisionConfig,
    Idefics3Config,
    InstructBlipConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaOnevisionConfig,
    OPTConfig,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    SmolVLMConfig,
    T5Config,
)

from freevlm.backbones import blip2, idefics3, instructblip, llava, llava_onevision, qwen2_vl
from freevlm.backbones.common import VLMBackbone

PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = 0, 1, 2, 3, 4

FAMILIES = ("blip2-opt", "blip2-t5", "minigpt4-llama", "instructblip-llama", "instructblip-t5", "llava-llama",
            "qwen2vl-qwen2", "qwen25vl-qwen2", "onevision-qwen2", "smolvlm-llama")
# tiny models that are built but not in FAMILIES: their code is another family's (Idefics3 is SmolVLM's)
ALSO_BUILT = ("idefics3-llama",)
# Qwen2-VL's images: one (t, h, w) patch grid per image, cycled over a batch's rows so that its images differ in size
QWEN_GRIDS = ((1, 4, 4), (1, 2, 4), (1, 4, 6), (1, 6, 2))
# LLaVA-OneVision's images: (height, width) per row, in units of the tiny tower's input size (anyres tiles)
ONEVISION_SIZES = ((1, 1), (1, 2), (2, 1), (1.5, 1.25))
# Idefics3/SmolVLM's images: tiles per row (one tile is one vision-tower input; 3 = 1 x 2 tiles + the global view),
# cycled over a batch's rows so that its images differ in size
SMOLVLM_TILES = (3, 1, 2, 5)


@dataclass
class TinySize:
    vocab_size: int = 64  # LM vocabulary (>= the tokenizer's size)
    lm_layers: int = 4  # LM decoder layers (T5: decoder blocks, and as many encoder blocks: transformers 5.23
    # sizes the generation cache from the encoder depth, so unequal depths break its own T5 generate)
    lm_hidden: int = 32  # LM hidden size
    lm_heads: int = 4  # LM attention heads (Llama: 2 key/value heads, so grouped-query attention is exercised)
    lm_kv_heads: int | None = None  # Llama key/value heads (None: half the heads)
    lm_ffn: int = 64  # LM feed-forward size
    vision_hidden: int = 32  # vision encoder (and Q-Former) hidden size
    vision_layers: int = 2  # vision encoder layers
    qformer_layers: int = 2  # Q-Former layers
    image_size: int = 32  # input resolution
    patch_size: int = 8  # ViT patch size
    num_query_tokens: int = 4  # Q-Former queries = image tokens seen by the LM
    scale_factor: int = 2  # Idefics3/SmolVLM pixel shuffle: (image_size / patch_size / scale_factor)^2 tokens a tile
    max_positions: int = 128  # OPT learned positions / Llama max_position_embeddings
    dropout: float = 0.0  # LM dropout (0 keeps training deterministic; OPT-2.7B ships 0.1)


def _lm_config(kind: str, s: TinySize):
    common = dict(vocab_size=s.vocab_size, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if kind == "opt":
        return OPTConfig(
            hidden_size=s.lm_hidden, num_hidden_layers=s.lm_layers, num_attention_heads=s.lm_heads, ffn_dim=s.lm_ffn,
            word_embed_proj_dim=s.lm_hidden, max_position_embeddings=s.max_positions, dropout=s.dropout,
            attention_dropout=s.dropout, **common,
        )
    if kind == "llama":
        return LlamaConfig(
            hidden_size=s.lm_hidden, num_hidden_layers=s.lm_layers, num_attention_heads=s.lm_heads,
            num_key_value_heads=s.lm_kv_heads or max(1, s.lm_heads // 2), intermediate_size=s.lm_ffn,
            max_position_embeddings=s.max_positions, attention_dropout=s.dropout, tie_word_embeddings=False, **common,
        )
    if kind == "t5":
        return T5Config(
            d_model=s.lm_hidden, d_kv=s.lm_hidden // s.lm_heads, d_ff=s.lm_ffn, num_layers=s.lm_layers,
            num_decoder_layers=s.lm_layers, num_heads=s.lm_heads, feed_forward_proj="gated-gelu",
            dropout_rate=s.dropout, decoder_start_token_id=PAD_ID, relative_attention_num_buckets=8,
            relative_attention_max_distance=32, is_encoder_decoder=True, tie_word_embeddings=False, **common,
        )
    if kind == "qwen2":  # Qwen2-VL's text config (QKV biases, GQA, M-RoPE over head_dim / 2 = 2 + 1 + 1 sections)
        return dict(
            hidden_size=s.lm_hidden, num_hidden_layers=s.lm_layers, num_attention_heads=s.lm_heads,
            num_key_value_heads=s.lm_kv_heads or max(1, s.lm_heads // 2), intermediate_size=s.lm_ffn,
            max_position_embeddings=s.max_positions, attention_dropout=s.dropout, tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=100.0,  # low: positions < 100 turn every section
                                 mrope_section=_mrope_section(s.lm_hidden // s.lm_heads)), **common,
        )
    raise ValueError(f"unknown tiny LM kind {kind!r}; expected opt, llama, t5 or qwen2")


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of the rotary frequencies (head_dim / 2 of them) into temporal, height, width sections, in
    Qwen2-VL's proportions (16, 24, 24 of 64)."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qformer_vision(s: TinySize) -> tuple[dict, dict]:
    vision = dict(
        hidden_size=s.vision_hidden, intermediate_size=4 * s.vision_hidden, num_hidden_layers=s.vision_layers,
        num_attention_heads=max(1, s.vision_hidden // 16), image_size=s.image_size, patch_size=s.patch_size,
        initializer_range=0.02,  # BLIP-2's default (1e-10) assumes pretrained weights; tiny models start random
    )
    qformer = dict(
        vocab_size=s.vocab_size, hidden_size=s.vision_hidden, num_hidden_layers=s.qformer_layers,
        num_attention_heads=max(1, s.vision_hidden // 16), intermediate_size=4 * s.vision_hidden,
        encoder_hidden_size=s.vision_hidden, cross_attention_frequency=1, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return vision, qformer


def tiny_config(family: str, size: TinySize | None = None):
    """The transformers config of a tiny `family` model (one of FAMILIES)."""
    s = size or TinySize()
    arch, lm_kind = family.split("-")
    text = _lm_config(lm_kind, s)
    if arch in ("blip2", "minigpt4"):
        vision, qformer = _qformer_vision(s)
        return Blip2Config(
            vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
            num_query_tokens=s.num_query_tokens, image_token_index=IMAGE_ID,
        )
    if arch == "instructblip":
        vision, qformer = _qformer_vision(s)
        return InstructBlipConfig(
            vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
            num_query_tokens=s.num_query_tokens, image_token_index=IMAGE_ID,
        )
    if arch == "llava":
        vision = CLIPVisionConfig(
            hidden_size=s.vision_hidden, intermediate_size=4 * s.vision_hidden, num_hidden_layers=s.vision_layers,
            num_attention_heads=max(1, s.vision_hidden // 16), image_size=s.image_size, patch_size=s.patch_size,
            projection_dim=s.vision_hidden,
        )
        return LlavaConfig(
            vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_ID,
            vision_feature_layer=-1, vision_feature_select_strategy="default",
            image_seq_length=(s.image_size // s.patch_size) ** 2,
        )
    if arch in ("qwen2vl", "qwen25vl"):
        ids = dict(image_token_id=IMAGE_ID, video_token_id=UNK_ID, vision_start_token_id=BOS_ID,
                   vision_end_token_id=BOS_ID)
        heads = max(1, s.vision_hidden // 16)
        if arch == "qwen2vl":
            vision = dict(depth=s.vision_layers, embed_dim=s.vision_hidden, hidden_size=s.lm_hidden, mlp_ratio=2,
                          num_heads=heads, patch_size=s.patch_size, spatial_merge_size=2, temporal_patch_size=2)
            return Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
        # window attention in the first layer, full attention in the last (as Qwen2.5-VL alternates them)
        vision = dict(depth=s.vision_layers, hidden_size=s.vision_hidden, intermediate_size=2 * s.vision_hidden,
                      num_heads=heads, out_hidden_size=s.lm_hidden, patch_size=s.patch_size, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=4 * s.patch_size, fullatt_block_indexes=[s.vision_layers - 1])
        return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    if arch == "onevision":  # SigLIP tiles of image_size, anyres up to 2 x 2 tiles, a Qwen2 LM with 1-D RoPE
        vision = dict(model_type="siglip_vision_model", hidden_size=s.vision_hidden,
                      intermediate_size=4 * s.vision_hidden, num_hidden_layers=s.vision_layers,
                      num_attention_heads=max(1, s.vision_hidden // 16), image_size=s.image_size,
                      patch_size=s.patch_size)
        text = {k: v for k, v in text.items() if k != "rope_parameters"}
        text.update(model_type="qwen2", rope_parameters=dict(rope_type="default", rope_theta=100.0))
        side = s.image_size
        return LlavaOnevisionConfig(
            vision_config=vision, text_config=text, image_token_index=IMAGE_ID, video_token_index=UNK_ID,
            vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
            image_grid_pinpoints=[[side * h, side * w] for h in (1, 2) for w in (1, 2)],
        )
    if arch in ("idefics3", "smolvlm"):
        vision = dict(
            hidden_size=s.vision_hidden, intermediate_size=4 * s.vision_hidden, num_hidden_layers=s.vision_layers,
            num_attention_heads=max(1, s.vision_hidden // 16), image_size=s.image_size, patch_size=s.patch_size,
        )
        cls = Idefics3Config if arch == "idefics3" else SmolVLMConfig
        return cls(vision_config=vision, text_config=text.to_dict(), image_token_id=IMAGE_ID,
                   scale_factor=s.scale_factor, pad_token_id=PAD_ID)
    raise ValueError(f"unknown tiny family {family!r}; expected one of {', '.join(FAMILIES + ALSO_BUILT)}")


def tiny_images(family: str, size: TinySize, batch: int, generator=None):
    """Random image inputs for `batch` prompts: (pixel_values, extra inputs, image tokens per row).

    Qwen2-VL's images differ in size across rows (`QWEN_GRIDS`): flat patches (sum of t*h*w, C*T*P*P) and their
    `image_grid_thw`. Idefics3/SmolVLM's images are split into tiles, as many per row as `SMOLVLM_TILES` says:
    (B, tiles, 3, H, W), rows with fewer tiles padded with all-zero ones (as its processor pads them). The other
    families take (B, 3, H, W) at the one size their vision tower has (LLaVA-OneVision: up to 5 tiles of it).
    """
    import torch

    if family.startswith("qwen"):
        grids = torch.tensor([QWEN_GRIDS[r % len(QWEN_GRIDS)] for r in range(batch)])
        patches = int(grids.prod(-1).sum())
        pixels = torch.randn(patches, 3 * 2 * size.patch_size**2, generator=generator)
        return pixels, {"image_grid_thw": grids}, [int(g.prod()) // 4 for g in grids]
    if family.startswith("onevision"):
        config = tiny_config(family, size)
        sizes = torch.tensor([[int(size.image_size * f) for f in ONEVISION_SIZES[r % len(ONEVISION_SIZES)]]
                              for r in range(batch)])
        tiles = 5  # the base tile + at most 2 x 2 anyres tiles (rows with fewer leave the rest unread)
        pixels = torch.randn(batch, tiles, 3, size.image_size, size.image_size, generator=generator)
        counts = [llava_onevision.image_tokens(config, int(h), int(w)) for h, w in sizes]
        return pixels, {"image_sizes": sizes}, counts
    if family.startswith(("idefics3", "smolvlm")):
        tiles = [SMOLVLM_TILES[r % len(SMOLVLM_TILES)] for r in range(batch)]
        pixels = torch.randn(batch, max(tiles), 3, size.image_size, size.image_size, generator=generator)
        for r, t in enumerate(tiles):
            pixels[r, t:] = 0.0
        return pixels, {}, [t * num_image_tokens(family, size) for t in tiles]
    pixels = torch.randn(batch, 3, size.image_size, size.image_size, generator=generator)
    return pixels, {}, [num_image_tokens(family, size)] * batch


def tiny_processor(family: str, tokenizer, size: TinySize | None = None):
    """The transformers-style processor of a tiny `family` model over `tokenizer` (a word-level one, see
    `freevlm.data.tokenizer`): images of `size.image_size` pixels. Idefics3/SmolVLM's adds its layout tokens to the
    tokenizer (see `idefics3.make_processor`): size the model's vocabulary by the tokenizer after this call."""
    from transformers import (
        Blip2Processor,
        BlipImageProcessorPil,
        InstructBlipProcessor,
        LlavaImageProcessorPil,
        LlavaOnevisionImageProcessorPil,
        LlavaProcessor,
        Qwen2VLImageProcessorPil,
    )

    s = size or TinySize()
    px = s.image_size
    if family.startswith("qwen"):  # images keep their size (within 1x-4x the tiny area), as Qwen2-VL's do
        images = Qwen2VLImageProcessorPil(patch_size=s.patch_size, merge_size=2, temporal_patch_size=2,
                                          min_pixels=px * px, max_pixels=4 * px * px)
        return qwen2_vl.processor(images, tokenizer, IMAGE_ID)
    if family.startswith("onevision"):
        side = s.image_size
        images = LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                                 image_grid_pinpoints=[[side * h, side * w] for h in (1, 2)
                                                                       for w in (1, 2)])
        return llava_onevision.processor(images, tokenizer, tiny_config(family, s))
    if family.startswith(("idefics3", "smolvlm")):  # up to 2 x 2 tiles of the tower's size, plus the global view
        return idefics3.make_processor(tokenizer, tiny_config(family, s))
    if family.startswith("llava"):
        images = LlavaImageProcessorPil(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
        return LlavaProcessor(images, tokenizer, patch_size=s.patch_size, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)
    images = BlipImageProcessorPil(size={"height": px, "width": px})
    if family.startswith("instructblip"):
        return InstructBlipProcessor(images, tokenizer, tokenizer, num_query_tokens=s.num_query_tokens)
    return Blip2Processor(images, tokenizer, num_query_tokens=s.num_query_tokens)


def num_image_tokens(family: str, size: TinySize | None = None) -> int:
    """How many placeholder tokens a prompt for this tiny model carries (Idefics3/SmolVLM: per image tile)."""
    s = size or TinySize()
    if family.startswith("qwen"):  # the first of QWEN_GRIDS (4 x 4 patches, merged 2 x 2)
        return (s.image_size // s.patch_size) ** 2 // 4
    if family.startswith("onevision"):  # a square image of the tower's size
        return llava_onevision.image_tokens(tiny_config(family, s), s.image_size, s.image_size)
    if family.startswith(("idefics3", "smolvlm")):
        return (s.image_size // s.patch_size // s.scale_factor) ** 2
    return (s.image_size // s.patch_size) ** 2 if family.startswith("llava") else s.num_query_tokens


def build_tiny(family: str, size: TinySize | None = None, processor=None, seed: int | None = None) -> VLMBackbone:
    """A tiny random backbone of `family`; `seed` makes its weights reproducible."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    config = tiny_config(family, size)
    module = {"blip2": blip2, "minigpt4": blip2, "instructblip": instructblip, "llava": llava, "qwen2vl": qwen2_vl,
              "qwen25vl": qwen2_vl, "onevision": llava_onevision, "idefics3": idefics3,
              "smolvlm": idefics3}[family.split("-")[0]]
    backbone = module.from_config(config, processor, name=f"tiny-{family}")
    query_tokens = getattr(backbone.model, "query_tokens", None)
    if query_tokens is not None:
        # transformers initialises the Q-Former queries to zeros (it expects pretrained weights); identical queries
        # stay identical under training, so a model trained from scratch starts them as LAVIS does: N(0, 0.02).
        with torch.no_grad():
            query_tokens.normal_(0.0, 0.02)
    return backbone
