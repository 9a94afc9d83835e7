"""A word-level tokenizer for the embedded default, built offline with `tokenizers` from the synthetic grammar.

The synthetic captions and questions use a few dozen lowercase words, so a word-level vocabulary keeps the LM head
tiny: with ~100 words the head of a 128-wide LM costs well under one decoder layer, whereas a 50k BPE vocabulary
would make the head cost as much as ~20 layers and no exit could save time. Special token ids match
`freevlm.backbones.tiny` (pad=0, bos=1, eos=2, unk=3, image placeholder=4).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]


# CLIP's own names. The text tower pools at the first end-of-text token, and transformers' CLIP treats a config with
# eos_token_id == 2 as a pre-2023 checkpoint and pools at the largest token id instead: so end-of-text is id 3 here.
CLIP_SPECIAL_TOKENS = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]


def _word_vocab(texts: Iterable[str], extra_words: Iterable[str], special: list[str]) -> dict[str, int]:
    words = sorted({w for text in texts for w in text.split()} | set(extra_words))
    vocab = {tok: i for i, tok in enumerate(special)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    return vocab


def build_word_tokenizer(texts: Iterable[str], extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Every whitespace-separated word of `texts` (plus `extra_words`) becomes one token, after the special tokens.

    Prompts get a leading `<s>`, as OPT's tokenizer adds one; decoding joins words with single spaces.
    """
    vocab = _word_vocab(texts, extra_words, SPECIAL_TOKENS)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins word tokens with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<image>"],  # placeholders; the processors look it up by text
    )


def build_clip_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """The same word-level vocabulary laid out as a CLIP text tokenizer: `<|startoftext|> words <|endoftext|>`, with
    ids pad=0, unk=1, start=2, end=3 (see CLIP_SPECIAL_TOKENS). Saved into a CLIP folder, `AutoTokenizer` reads it."""
    pad, unk, bos, eos = CLIP_SPECIAL_TOKENS
    core = Tokenizer(models.WordLevel(vocab=_word_vocab(texts, (), CLIP_SPECIAL_TOKENS), unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, 2), (eos, 3)])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, unk_token=unk, bos_token=bos, eos_token=eos)
