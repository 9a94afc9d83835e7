"""Property-based tests of decoding (hypothesis) on tiny random models of every family.

Random prompts (lengths, tokens, padding), images, batch sizes, exit kinds and layers, criteria and thresholds, KV
policies, search settings (greedy, sampling, beams) and modes are drawn, and each example checks:

- decoding never crashes, and its output is well formed (one row per sequence, ids in the vocabulary, padding after
  the end, a row shorter than `max_new_tokens` ends on EOS, EOS nowhere else);
- every token's exit layer is one of the configured exits or the final layer (the final layer only, in mode
  "full" or when the criterion can never fire; the first exit only, when the criterion always fires);
- greedy tokens are the argmax of the logits the engine reports for them (`output_logits`), which are finite;
- at alpha = 1 (no exit fires, whether or not the exits are evaluated) the tokens are transformers' own `generate`'s,
  for greedy and beam search;
- mode "speculative" gives mode "full"'s tokens, whatever the drafting exit and draft settings;
- through the Python API (`EarlyExitVLM.generate`, random PIL images and prompt strings), every mode runs and
  speculative equals full.

The budget is bounded (`max_examples`, derandomized so CI is deterministic); models and exits are built once.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from freevlm.backbones.common import image_rows
from freevlm.backbones.tiny import BOS_ID, EOS_ID, FAMILIES, IMAGE_ID, PAD_ID, TinySize, build_tiny, tiny_images
from freevlm.errors import FreeVLMError
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.criteria import Confidence, make_criterion
from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.kv import POLICIES, SkipPolicy
from freevlm.generation.speculative import DraftSettings
from tests.conftest import make_eos_likely, pads_left

SIZE = TinySize(lm_layers=5)
N = SIZE.lm_layers
V = SIZE.vocab_size
TEXT_TOKENS = [BOS_ID, EOS_ID, 3] + list(range(IMAGE_ID + 1, V))  # anything but padding and the image placeholder
EXIT_KINDS = ("transformer", "linear", "frozen-head")


def budget(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.cache
def backbone(family: str):
    bb = build_tiny(family, SIZE, seed=0)
    make_eos_likely(bb, family, SIZE)  # rows (and beams) end at different steps: the EOS paths run too
    bb.model.eval()
    return bb


@functools.cache
def exit_stack(family: str, kind: str, layers: tuple[int, ...], seed_layer: str):
    torch.manual_seed(len(layers))
    exits = build_exits(backbone(family).lm, ExitSpec(kind, list(layers), seed_layer))
    if kind == "linear":  # a trained linear exit differs from the head it was initialised from
        with torch.no_grad():
            for e in exits.exits:
                for p in e.parameters():
                    p.add_(0.05 * torch.randn_like(p))
    return exits


class CheckedNeverFires(Confidence):
    """alpha = 1 with the exits still evaluated at every exit layer (plain alpha = 1 skips them altogether)."""

    def never_exits(self) -> bool:
        return False


# --- strategies ---------------------------------------------------------------------------------------------------


@st.composite
def prompt_batches(draw, families=FAMILIES, max_batch: int = 3):
    """(family, pixel_values, input_ids, attention_mask, extra) laid out as the family's processor does: BLIP-2 and
    InstructBLIP put the image placeholders first and pad between them and the text, LLaVA, Qwen2-VL, LLaVA-OneVision
    and Idefics3/SmolVLM pad on the far left (Idefics3/SmolVLM's images are 1-3 tiles of placeholders)."""
    family = draw(st.sampled_from(families))
    batch = draw(st.integers(1, max_batch))
    texts = [draw(st.lists(st.sampled_from(TEXT_TOKENS), min_size=0, max_size=6)) for _ in range(batch)]
    width = max(len(t) for t in texts) + 1
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.0, 1.0, 3.0]))
    g = torch.Generator().manual_seed(seed)
    # Qwen2-VL's and LLaVA-OneVision's differ in size across rows, Idefics3/SmolVLM's in tiles
    pixels, extra, n_imgs = tiny_images(family, SIZE, batch, g)
    if family.startswith(("idefics3", "smolvlm")):
        # image tiles: scale the real ones (a tile of zeros is padding, which the model skips: scale 0 would make
        # every tile padding); LLaVA-OneVision's tiles are all read or ignored by its image_sizes, so they scale as is
        real = pixels.flatten(2).ne(0).any(-1)[..., None, None, None]
        pixels = torch.where(real, scale * pixels + 0.5, pixels)
    else:
        pixels = scale * pixels
    width += max(n_imgs) if pads_left(family) else 0
    rows, masks = [], []
    for t, n_img in zip(texts, n_imgs):
        text = [BOS_ID] + t
        if pads_left(family):
            pad = [PAD_ID] * (width - len(text) - n_img)
            rows.append(pad + text[:1] + [IMAGE_ID] * n_img + text[1:])
            masks.append([0] * len(pad) + [1] * (1 + n_img + len(t)))
        else:
            pad = [PAD_ID] * (width - len(text))
            rows.append([IMAGE_ID] * n_img + pad + text)
            masks.append([1] * n_img + [0] * len(pad) + [1] * len(text))
    if family.startswith("instructblip"):
        q = draw(st.integers(1, 4))
        extra = dict(qformer_input_ids=torch.randint(5, V, (batch, q), generator=g),
                     qformer_attention_mask=torch.ones(batch, q, dtype=torch.long))
    return family, pixels, torch.tensor(rows), torch.tensor(masks), extra


@st.composite
def exit_configs(draw, kinds=EXIT_KINDS):
    kind = draw(st.sampled_from(kinds))
    layers = tuple(sorted(draw(st.sets(st.integers(1, N - 1), min_size=1, max_size=N - 1))))
    seed_layer = draw(st.sampled_from(["next", "same", "last"])) if kind == "transformer" else "next"
    return kind, layers, seed_layer


FORCE = "force"  # a setting under which the criterion fires at the first exit it is asked at


@st.composite
def criteria(draw):
    """(criterion, fires): fires is "never", FORCE or None (depends on the model)."""
    name = draw(st.sampled_from(["confidence", "entropy", "patience", "similarity"]))
    if name == "confidence":
        value = draw(st.one_of(st.just(1.0), st.just(1e-9), st.floats(0.01, 1.0)))
        fires = "never" if value >= 1.0 else FORCE if value < 1e-6 else None
    elif name == "entropy":
        value = draw(st.one_of(st.just(0.0), st.just(100.0), st.floats(0.0, 5.0)))
        fires = "never" if value <= 0.0 else FORCE if value > math.log(V) + 1 else None
    elif name == "patience":
        value, fires = draw(st.integers(1, 3)), None
    else:
        value = draw(st.one_of(st.just(1.0), st.floats(-1.0, 1.0)))
        fires = "never" if value >= 1.0 else None
    return make_criterion(name, value), fires


@st.composite
def search_settings(draw, beams: bool = True):
    """transformers-named generation kwargs: greedy, sampling, beam search, beam sampling, with EOS knobs."""
    kw = dict(max_new_tokens=draw(st.integers(1, 7)))
    num_beams = draw(st.integers(1, 3)) if beams else 1
    kw["num_beams"] = num_beams
    if draw(st.booleans()):
        kw["do_sample"] = True
        kw["temperature"] = draw(st.sampled_from([0.7, 1.0, 1.5]))
        kw["top_k"] = draw(st.sampled_from([0, 5, 50]))
        kw["top_p"] = draw(st.sampled_from([None, 0.8]))
    if num_beams > 1:
        kw["length_penalty"] = draw(st.sampled_from([-1.0, 0.5, 1.0, 2.0]))
        kw["early_stopping"] = draw(st.sampled_from([False, True, "never"]))
    kw["num_return_sequences"] = draw(st.integers(1, num_beams if num_beams > 1 else 2))
    if draw(st.booleans()):
        kw["min_new_tokens"] = draw(st.integers(0, 3))
    if draw(st.booleans()):
        kw["repetition_penalty"] = draw(st.sampled_from([1.0, 1.3]))
    return kw


# --- helpers -------------------------------------------------------------------------------------------------------


def _tokens(res) -> list[list[int]]:
    return [res.sequences[i, : len(t)].tolist() for i, t in enumerate(res.trace)]


def _until_eos(row: list[int]) -> list[int]:
    return row[: row.index(EOS_ID) + 1] if EOS_ID in row else row


def _check_well_formed(res, rows: int, max_new: int, min_new: int = 0) -> None:
    assert res.sequences.shape[0] == rows == len(res.trace) == len(res.exit_layers)
    lengths = [len(t) for t in res.trace]
    assert all(1 <= n <= max_new for n in lengths), lengths
    assert res.sequences.shape[1] == max(lengths)
    assert [len(e) for e in res.exit_layers] == lengths
    assert int(res.sequences.min()) >= 0 and int(res.sequences.max()) < V
    for i, row in enumerate(res.sequences.tolist()):
        n = lengths[i]
        assert EOS_ID not in row[: n - 1], (i, row, n)  # a row stops at its first EOS
        assert EOS_ID not in row[:min_new], (i, row, min_new)
        assert n == max_new or row[n - 1] == EOS_ID, (i, row, n)  # and only at EOS or the limit
        assert all(t == PAD_ID for t in row[n:]), (i, row, n)  # padded after the end


def _generate(bb, exits, lm_inputs, **kw):
    return generate_from_inputs(bb.lm, exits, lm_inputs, generation_config=bb.model.generation_config, **kw)


# --- properties ----------------------------------------------------------------------------------------------------


@budget(150)
@given(batch=prompt_batches(), exit_cfg=exit_configs(), criterion=criteria(), search=search_settings(),
       mode=st.sampled_from(["early_exit", "early_exit", "full"]), policy=st.sampled_from(POLICIES),
       source=st.sampled_from(["hidden", "exit"]), output_logits=st.booleans(), seed=st.integers(0, 2**16))
def test_decoding_is_well_formed_and_exits_only_at_configured_layers(batch, exit_cfg, criterion, search, mode,
                                                                      policy, source, output_logits, seed):
    family, pixels, ids, mask, extra = batch
    bb = backbone(family)
    exits = exit_stack(family, *exit_cfg) if mode == "early_exit" else None
    crit, fires = criterion if mode == "early_exit" else (None, "never")
    torch.manual_seed(seed)
    with torch.no_grad():
        res = _generate(bb, exits, bb.prepare(pixels, ids, mask, **extra), criterion=crit,
                        policy=SkipPolicy(policy, source), output_logits=output_logits, keep_cache=True, **search)
    rows = ids.shape[0] * search["num_return_sequences"]
    _check_well_formed(res, rows, search["max_new_tokens"], search.get("min_new_tokens", 0))
    layers = set(exit_cfg[1]) if mode == "early_exit" else set()
    seen = {layer for seq in res.exit_layers for layer in seq}
    event(f"{family} {mode} exited early: {bool(seen - {N})}")
    event(f"some row ended on EOS: {any(row[-1] == EOS_ID for row in _tokens(res))}")
    assert seen <= layers | {N}, (seen, layers)
    if fires == "never":
        assert seen == {N}
    elif fires == FORCE:
        assert seen == {min(layers)}
    if output_logits:
        assert len(res.logits) >= res.sequences.shape[1]
        engine_rows = ids.shape[0] * max(search["num_beams"], search["num_return_sequences"])
        for step in res.logits:
            assert step.shape == (engine_rows, V) and bool(torch.isfinite(step).all())
        plain_greedy = (search["num_beams"] == 1 and not search.get("do_sample")
                        and search.get("repetition_penalty", 1.0) == 1.0)
        if plain_greedy:
            for r, row in enumerate(_tokens(res)):
                for t, token in enumerate(row[search.get("min_new_tokens", 0):], start=search.get("min_new_tokens", 0)):
                    assert token == int(res.logits[t][r].argmax()), (r, t)
    cache = res.caches()  # complete caches: catch-up's pending layers ran when decoding ended
    assert bool(torch.isfinite(cache.keys).all())


@budget(60)
@given(batch=prompt_batches(), exit_cfg=exit_configs(), num_beams=st.integers(1, 4),
       max_new=st.integers(1, 10), evaluated=st.booleans(), policy=st.sampled_from(POLICIES),
       beam_kw=st.fixed_dictionaries({"length_penalty": st.sampled_from([0.5, 1.0, 2.0]),
                                      "early_stopping": st.sampled_from([False, True, "never"])}))
def test_alpha_one_equals_transformers_generate(batch, exit_cfg, num_beams, max_new, evaluated, policy, beam_kw):
    family, pixels, ids, mask, extra = batch
    bb = backbone(family)
    kw = dict(max_new_tokens=max_new, num_beams=num_beams, do_sample=False)
    if num_beams > 1:
        kw.update(beam_kw)
    criterion = CheckedNeverFires(1.0) if evaluated else Confidence(1.0)
    with torch.no_grad():
        ref = bb.hf_generate(pixels, ids, mask, **kw, **extra)
        ours = _generate(bb, exit_stack(family, *exit_cfg), bb.prepare(pixels, ids, mask, **extra),
                         criterion=criterion, policy=SkipPolicy(policy), trace=True, **kw)
    generated = ref[:, 1:] if bb.lm.is_encoder_decoder else ref[:, ids.shape[1]:]
    assert _tokens(ours) == [_until_eos(row) for row in generated.tolist()]
    assert all(layer == N for seq in ours.exit_layers for layer in seq)
    exit_heads = sum(float(rec.heads.sum()) for rec in ours.records) - sum(rec.heads.numel() for rec in ours.records)
    assert (exit_heads > 0) == evaluated  # the evaluated exits did run (one head per check), and changed nothing


@budget(80)
@given(batch=prompt_batches(), exit_cfg=exit_configs(), data=st.data(), max_new=st.integers(1, 9),
       max_draft=st.integers(1, 8), threshold=st.one_of(st.none(), st.floats(0.0, 1.0)),
       no_eos=st.booleans(), adapt=st.booleans())
def test_speculative_equals_full(batch, exit_cfg, data, max_new, max_draft, threshold, no_eos, adapt):
    family, pixels, ids, mask, extra = batch
    bb = backbone(family)
    exits = exit_stack(family, *exit_cfg)
    layer = data.draw(st.sampled_from(exit_cfg[1]), label="draft layer")
    kw = dict(max_new_tokens=max_new)
    if no_eos:  # rows run to the limit, which then falls inside draft blocks
        kw["eos_token_id"] = []
    lm_inputs = bb.prepare(pixels, ids, mask, **extra)
    with torch.no_grad():
        full = _generate(bb, None, lm_inputs, **kw)
        spec = _generate(bb, exits, lm_inputs, draft=DraftSettings(layer, max_draft, threshold, adapt), **kw)
    assert _tokens(spec) == _tokens(full)
    assert spec.exit_layers == full.exit_layers  # every token is the full model's
    assert spec.speculative is not None and 0 <= spec.speculative.accepted <= spec.speculative.drafted
    assert spec.speculative.accepted <= spec.speculative.tokens  # only drafts that were emitted count as accepted
    if not no_eos:
        _check_well_formed(spec, ids.shape[0], max_new)


@budget(50)
@given(batch=prompt_batches(), exit_cfg=exit_configs(), criterion=criteria(), policy=st.sampled_from(POLICIES),
       source=st.sampled_from(["hidden", "exit"]), max_new=st.integers(1, 7))
def test_batched_early_exit_equals_row_by_row(batch, exit_cfg, criterion, policy, source, max_new):
    """A row's tokens and exit layers do not depend on the other rows of its batch (greedy early exit)."""
    family, pixels, ids, mask, extra = batch
    bb = backbone(family)
    exits = exit_stack(family, *exit_cfg)
    kw = dict(criterion=criterion[0], policy=SkipPolicy(policy, source), max_new_tokens=max_new)
    with torch.no_grad():
        batched = _generate(bb, exits, bb.prepare(pixels, ids, mask, **extra), **kw)
        for r in range(ids.shape[0]):
            # LLaVA pads on the far left (stripped here); the BLIP-2 layouts pad between image and text, where a T5
            # encoder's relative positions see the padding, so the single row keeps it
            keep = mask[r].bool() if pads_left(family) else torch.ones_like(mask[r]).bool()
            row_pixels, row_extra = image_rows(pixels, extra, [r])
            single = _generate(bb, exits, bb.prepare(row_pixels, ids[r : r + 1, keep], mask[r : r + 1, keep],
                                                     **row_extra), **kw)
            assert _tokens(single)[0] == _tokens(batched)[r], r
            assert single.exit_layers[0] == batched.exit_layers[r], r


BAD = {  # per setting, values out of its range (or of some criterion's)
    "value": [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1.5, 2.5, 100.0],
    "max_new_tokens": [-1, 0],
    "num_beams": [-1, 0],
    "num_return_sequences": [-1, 0],
    "draft_layer": [0, N, N + 1],
    "max_draft": [-1, 0],
    "draft_threshold": [float("nan"), -0.5, 1.5],
    "policy": ["bogus"],
}


@budget(80)
@given(batch=prompt_batches(), exit_cfg=exit_configs(), data=st.data(),
       mode=st.sampled_from(["early_exit", "speculative"]),
       name=st.sampled_from(["confidence", "entropy", "patience", "similarity"]),
       broken=st.one_of(st.none(), st.sampled_from(list(BAD))))
def test_any_setting_decodes_or_fails_with_one_line(batch, exit_cfg, data, mode, name, broken):
    """One setting at a time out of range (or none): refused with one FreeVLMError line, never another exception;
    what is accepted decodes to well-formed output."""
    family, pixels, ids, mask, extra = batch
    bb = backbone(family)
    exits = exit_stack(family, *exit_cfg)
    unused = {"draft_layer", "max_draft", "draft_threshold"} if mode == "early_exit" else {"value"}
    if broken in unused:
        broken = None
    good = {"value": st.sampled_from([1e-9, 0.3, 1.0] if name != "patience" else [1, 2]),
            "max_new_tokens": st.integers(1, 4), "num_beams": st.integers(1, 2 if mode == "early_exit" else 1),
            "num_return_sequences": st.just(1),
            "draft_layer": st.sampled_from(exit_cfg[1]), "max_draft": st.integers(1, 4),
            "draft_threshold": st.sampled_from([None, 0.0, 0.5]), "policy": st.sampled_from(POLICIES)}
    v = {k: data.draw(st.sampled_from(BAD[k]) if k == broken else good[k], label=k) for k in BAD}
    kw = {k: v[k] for k in ("max_new_tokens", "num_beams", "num_return_sequences")}
    try:
        if mode == "speculative":
            kw.update(draft=DraftSettings(v["draft_layer"], v["max_draft"], v["draft_threshold"]))
        else:
            kw.update(criterion=make_criterion(name, v["value"]))
        with torch.no_grad():
            res = _generate(bb, exits, bb.prepare(pixels, ids, mask, **extra), policy=SkipPolicy(v["policy"]), **kw)
    except FreeVLMError as err:
        assert str(err) and "\n" not in str(err), repr(err)
        event(f"refused: {' '.join(str(err).split()[:4])}")
        return
    event(f"{mode} accepted {broken}={v[broken]} ({name})" if broken else f"{mode} accepted")
    _check_well_formed(res, ids.shape[0] * kw["num_return_sequences"], kw["max_new_tokens"])
    assert {layer for seq in res.exit_layers for layer in seq} <= set(exit_cfg[1]) | {N}


# --- through the Python API ----------------------------------------------------------------------------------------

API_FAMILIES = ("blip2-opt", "instructblip-t5", "llava-llama", "qwen2vl-qwen2", "onevision-qwen2", "smolvlm-llama")
WORDS = ["a", "photo", "of", "red", "green", "square", "circle", "what", "colour", "is", "it", "?"]


@functools.cache
def api_vlm(family: str):
    from freevlm.backbones.tiny import tiny_processor
    from freevlm.data.tokenizer import build_word_tokenizer
    from freevlm.generation.api import EarlyExitVLM

    tok = build_word_tokenizer([" ".join(WORDS)])
    processor = tiny_processor(family, tok, SIZE)  # before sizing the vocabulary: SmolVLM's adds layout tokens
    size = TinySize(vocab_size=len(tok), lm_layers=N)
    bb = build_tiny(family, size, processor=processor, seed=1)
    torch.manual_seed(2)
    return EarlyExitVLM(bb, build_exits(bb.lm, ExitSpec("transformer", [1, 3])))


@st.composite
def pil_images(draw):
    from PIL import Image

    h, w = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA"]))
    seed = draw(st.integers(0, 2**16))
    channels = {"RGB": (3,), "L": (), "RGBA": (4,)}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, *channels), dtype=np.uint8)
    return Image.fromarray(arr, mode)


@budget(40)
@given(family=st.sampled_from(API_FAMILIES), data=st.data(), batch=st.integers(1, 3),
       criterion=st.sampled_from(["confidence", "entropy", "patience", "similarity"]),
       kv_policy=st.sampled_from(POLICIES), num_beams=st.integers(1, 2), max_new=st.integers(1, 6),
       draft_layer=st.sampled_from([1, 3]), draft_length=st.integers(1, 6))
def test_api_modes_run_and_speculative_equals_full(family, data, batch, criterion, kv_policy, num_beams, max_new,
                                                   draft_layer, draft_length):
    vlm = api_vlm(family)
    event(family)
    images = data.draw(st.lists(pil_images(), min_size=batch, max_size=batch), label="images")
    words = st.lists(st.sampled_from(WORDS + ["unseen", "Words!"]), max_size=5).map(" ".join)
    prompts = data.draw(st.lists(words, min_size=batch, max_size=batch), label="prompts")
    threshold = {"confidence": 0.05, "entropy": 3.0, "patience": 1, "similarity": 0.5}[criterion]
    ee = vlm.generate(images, prompts, mode="early_exit", criterion=criterion, threshold=threshold,
                      kv_policy=kv_policy, num_beams=num_beams, max_new_tokens=max_new)
    assert len(ee.texts) == batch and all(isinstance(t, str) for t in ee.texts)
    assert {layer for seq in ee.exit_layers for layer in seq} <= {1, 3, N}
    full = vlm.generate(images, prompts, mode="full", max_new_tokens=max_new)
    spec = vlm.generate(images, prompts, mode="speculative", draft_layer=draft_layer, draft_length=draft_length,
                        max_new_tokens=max_new)
    assert _tokens(spec) == _tokens(full) and spec.texts == full.texts
    assert {layer for seq in full.exit_layers for layer in seq} == {N}


@pytest.mark.parametrize("family", FAMILIES)
def test_forcing_criterion_exits_every_token_at_the_first_exit(family):
    """A deterministic anchor for the properties above: with alpha tiny, every token leaves at the first exit."""
    bb = backbone(family)
    from tests.conftest import tiny_batch

    pixels, ids, mask, extra = tiny_batch(family, SIZE, 2, seed=4)
    with torch.no_grad():
        res = _generate(bb, exit_stack(family, "transformer", (2, 4), "next"), bb.prepare(pixels, ids, mask, **extra),
                        criterion=Confidence(1e-9), max_new_tokens=4)
    assert {layer for seq in res.exit_layers for layer in seq} == {2}
