"""The early-exit engine: which layers run, what skipped layers' caches hold, batching, beams, and parity at alpha=1.

Which layers ran is read from the engine's call trace (`trace=True`: one ("layer" | "exit", layer, query tokens)
entry per kernel call, in order), since the kernels read the modules' weights without calling the modules.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from freevlm.backbones.common import image_rows
from freevlm.backbones.tiny import FAMILIES, TinySize, build_tiny
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.criteria import Confidence
from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.kv import SkipPolicy
from tests.conftest import tiny_batch
from tests.generation.regression_cases import SignRule

SIZE = TinySize(lm_layers=6)
EXIT_LAYERS = [2, 4]


class Scripted:
    """A test criterion that exits where a plan says: plan[step][row] = exit index to leave at, or None."""

    needs_logits = True

    def __init__(self, plan):
        self.plan = plan
        self.step = -1

    def never_exits(self):
        return False

    def new_step(self, batch, device):
        self.step += 1
        return {"k": -1}

    def __call__(self, state, rows, logits, hidden, prev):
        state["k"] += 1
        step_plan = self.plan[min(self.step, len(self.plan) - 1)]
        return torch.tensor([step_plan[int(r)] == state["k"] for r in rows])


@pytest.fixture(scope="module")
def setups():
    out = {}
    for family in ("blip2-opt", "blip2-t5", "llava-llama", "qwen2vl-qwen2"):
        bb = build_tiny(family, SIZE, seed=0)
        torch.manual_seed(1)
        exits = build_exits(bb.lm, ExitSpec("transformer", list(EXIT_LAYERS)))
        out[family] = (bb, exits)
    return out


def _inputs(bb, family, batch, seed=0):
    pixels, ids, mask, extra = tiny_batch(family, SIZE, batch, seed=seed)
    return bb.prepare(pixels, ids, mask, **extra)


def _calls_by_step(calls, prompt_len):
    """Split the trace into steps: a step starts with a call of layer 1 (the prefill's has q = prompt length)."""
    steps = []
    for kind, layer, q in calls:
        if kind == "layer" and layer == 1:
            steps.append([])
        steps[-1].append((kind, layer, q))
    assert steps[0][0] == ("layer", 1, prompt_len)
    return steps


# --- which layers run -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["propagate", "copy"])
def test_exited_token_runs_exactly_its_layers(setups, policy):
    bb, exits = setups["blip2-opt"]
    lm_inputs = _inputs(bb, "blip2-opt", 1)
    # prefill (step 0) decides nothing here; decode steps 1..3 exit at exit 0 (layer 2), exit 1 (layer 4), final
    plan = [[None], [0], [1], [None]]
    res = generate_from_inputs(bb.lm, exits, lm_inputs, criterion=Scripted(plan), policy=SkipPolicy(policy),
                               max_new_tokens=4, min_new_tokens=4, trace=True)
    assert res.exit_layers == [[6, 2, 4, 6]]
    prompt = lm_inputs.inputs_embeds.shape[1]
    steps = _calls_by_step(res.calls, prompt)
    full = [("layer", i, prompt) for i in (1, 2)] + [("exit", 2, prompt)] + [("layer", i, prompt) for i in (3, 4)]
    assert steps[0] == full + [("exit", 4, prompt), ("layer", 5, prompt), ("layer", 6, prompt)]
    assert steps[1] == [("layer", 1, 1), ("layer", 2, 1), ("exit", 2, 1)]  # left at layer 2: nothing deeper ran
    assert steps[2] == [("layer", 1, 1), ("layer", 2, 1), ("exit", 2, 1), ("layer", 3, 1), ("layer", 4, 1),
                        ("exit", 4, 1)]
    assert steps[3][-2:] == [("layer", 5, 1), ("layer", 6, 1)]
    assert res.records[1].layers.item() == 2 and res.records[2].layers.item() == 4
    assert res.records[1].exit_layers.item() == 1 and res.records[2].exit_layers.item() == 2
    filled = res.records[1].kv_projections if policy == "propagate" else res.records[1].kv_copies
    assert filled.item() == 4 + 1  # layers 3..6 and exit 4's transformer got the policy's fill


def test_catch_up_runs_skipped_layers_with_the_next_deep_token(setups):
    bb, exits = setups["blip2-opt"]
    lm_inputs = _inputs(bb, "blip2-opt", 1)
    plan = [[None], [0], [None], [None]]  # step 1 exits at layer 2; step 2 goes deep and carries step 1's token
    res = generate_from_inputs(bb.lm, exits, lm_inputs, criterion=Scripted(plan), policy=SkipPolicy("catch_up"),
                               max_new_tokens=3, min_new_tokens=3, trace=True)
    steps = _calls_by_step(res.calls, lm_inputs.inputs_embeds.shape[1])
    layers = [[(layer, q) for kind, layer, q in step if kind == "layer"] for step in steps]
    assert layers[1] == [(1, 1), (2, 1)]
    assert layers[2] == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2), (6, 2)]  # layers 3..6 run for two tokens
    assert ("exit", 4, 2) in steps[2]  # the waiting token's exit-4 K/V are filled too
    assert res.records[2].layers.item() == 2 + 4 * 2


# --- what skipped layers' caches hold ----------------------------------------------------------------------------


def _full_depth_cache(bb, lm_inputs, generated):
    """transformers' own modules over prompt + generated[:-1] (what catch-up must reproduce)."""
    lm = bb.lm
    if lm.is_encoder_decoder:
        raise NotImplementedError
    emb = lm.embed_tokens(generated[:, :-1])
    embeds = torch.cat([lm_inputs.inputs_embeds, emb], dim=1)
    mask = torch.cat([lm_inputs.attention_mask, torch.ones_like(generated[:, :-1])], dim=1)
    cache = DynamicCache(config=lm.config)
    h = lm.embed(None, embeds, None, mask, 0)
    ctx = lm.context(h, mask, cache, 0, None)
    states = [h]
    for layer in lm.layers:
        h = lm.run_layer(layer, h, ctx, cache)
        states.append(h)
    return cache, states, mask, ctx


@pytest.mark.parametrize("batch", [1, 2])
def test_catch_up_cache_equals_full_depth_forward_after_flush(setups, batch):
    bb, exits = setups["blip2-opt"]
    lm_inputs = _inputs(bb, "blip2-opt", batch, seed=3)
    plan = [[None] * batch, [0] * batch, [1, 0][:batch], [None] * batch, [0] * batch, [1] * batch]
    with torch.no_grad():
        res = generate_from_inputs(bb.lm, exits, lm_inputs, criterion=Scripted(plan), policy=SkipPolicy("catch_up"),
                                   max_new_tokens=6, min_new_tokens=6, keep_cache=True)
        assert res.work.pending, "the plan ends on exiting tokens, so some layers are still pending"
        cache = res.caches()  # the pending layers ran before the cache was handed over
        ref, states, mask, ctx = _full_depth_cache(bb, lm_inputs, res.sequences)
    width = mask.shape[1]
    real = mask.bool()[:, None, :, None]  # padded positions hold K/V nobody attends to
    for i in range(bb.lm.num_layers):
        for ours, theirs in ((cache.keys[i], ref.layers[i].keys), (cache.values[i], ref.layers[i].values)):
            torch.testing.assert_close(ours[:, :, :width] * real, theirs * real, atol=1e-5, rtol=0)
    with torch.no_grad():  # each exit transformer's cache holds its K/V of the full-depth h_i at every position
        for slot, (layer, exit_) in enumerate(zip(EXIT_LAYERS, exits.exits)):
            own = DynamicCache()
            exit_.state(bb.lm, states[layer], ctx, own)
            torch.testing.assert_close(cache.exit_keys[slot][:, :, :width] * real, own.layers[slot].keys * real,
                                       atol=1e-5, rtol=0)


def _rope(x, positions, theta):
    """RoPE written out from its definition, independent of transformers' implementation."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = positions.float()[..., None] * inv  # (..., hd/2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _projection(layer, h, family):
    """A skipped layer's K/V of state h, from the layer's own weights (independent of the engine)."""
    if family == "blip2-opt":
        ln = layer.self_attn_layer_norm
        x = F.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        return (F.linear(x, layer.self_attn.k_proj.weight, layer.self_attn.k_proj.bias),
                F.linear(x, layer.self_attn.v_proj.weight, layer.self_attn.v_proj.bias))
    w, eps = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w
    return F.linear(x, layer.self_attn.k_proj.weight), F.linear(x, layer.self_attn.v_proj.weight)


@pytest.mark.parametrize("family", ["blip2-opt", "llava-llama"])
@pytest.mark.parametrize("source", ["hidden", "exit"])
def test_propagated_entries_are_skipped_layers_projections_of_the_exit_state(setups, family, source):
    bb, exits = setups[family]
    lm = bb.lm
    lm_inputs = _inputs(bb, family, 1, seed=5)
    steps = 4
    plan = [[None]] + [[0]] * steps  # every decode step leaves at layer 2
    with torch.no_grad():
        res = generate_from_inputs(lm, exits, lm_inputs, criterion=Scripted(plan),
                                   policy=SkipPolicy("propagate", source), max_new_tokens=steps,
                                   min_new_tokens=steps, keep_cache=True)
        _, states, mask, ctx = _full_depth_cache(bb, lm_inputs, res.sequences)  # layers 1-2 ran for real
        cache = res.caches()
        prompt_len = lm_inputs.inputs_embeds.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        exit4 = exits.exits[1].layer
        for t in range(1, steps):  # generated token t-1 was fed at decode step t, at column prompt_len + t - 1
            pos = prompt_len + t - 1
            h2 = states[2][:, pos]  # (1, D): the exited backbone state of that token
            if source == "exit":
                h2 = exits.exits[0].state(lm, states[2], ctx, None)[:, pos]
            targets = [(cache.keys[j - 1], cache.values[j - 1], lm.layers[j - 1]) for j in range(3, lm.num_layers + 1)]
            targets.append((cache.exit_keys[1], cache.exit_values[1], exit4))  # the deeper exit's transformer
            for keys, values, layer in targets:
                k, v = _projection(layer, h2, family)
                hd = keys.shape[-1]
                k, v = k.view(1, -1, hd), v.view(1, -1, hd)  # (1, H, hd)
                if family == "llava-llama":
                    k = _rope(k, positions[:, pos], lm.config.rope_parameters["rope_theta"])
                torch.testing.assert_close(keys[:, :, pos], k, atol=1e-5, rtol=0)
                torch.testing.assert_close(values[:, :, pos], v, atol=1e-5, rtol=0)


def test_copied_entries_are_the_exit_layers_own(setups):
    bb, exits = setups["blip2-opt"]
    lm_inputs = _inputs(bb, "blip2-opt", 2, seed=5)
    plan = [[None, None]] + [[0, 1]] * 3  # row 0 leaves at layer 2, row 1 at layer 4
    with torch.no_grad():
        res = generate_from_inputs(bb.lm, exits, lm_inputs, criterion=Scripted(plan), policy=SkipPolicy("copy"),
                                   max_new_tokens=3, min_new_tokens=3, keep_cache=True)
    cache = res.caches()
    col = lm_inputs.inputs_embeds.shape[1] + 1  # the second decode step's token
    for row, exit_layer in ((0, 2), (1, 4)):
        for j in range(exit_layer + 1, bb.lm.num_layers + 1):
            assert torch.equal(cache.keys[j - 1][row, :, col], cache.keys[exit_layer - 1][row, :, col])
            assert torch.equal(cache.values[j - 1][row, :, col], cache.values[exit_layer - 1][row, :, col])
    assert torch.equal(cache.exit_keys[1][0, :, col], cache.exit_keys[0][0, :, col])  # exit 4 <- exit 2 (row 0)


def test_exit_transformers_never_change_the_backbone_cache(setups):
    bb, exits = setups["blip2-opt"]
    lm_inputs = _inputs(bb, "blip2-opt", 2)
    checked_never_taken = Scripted([[None, None]])  # every exit is evaluated, no token leaves
    with torch.no_grad():
        with_exits = generate_from_inputs(bb.lm, exits, lm_inputs, criterion=checked_never_taken, max_new_tokens=4,
                                          trace=True, keep_cache=True)
        without = generate_from_inputs(bb.lm, None, lm_inputs, max_new_tokens=4, keep_cache=True)
    assert with_exits.records[1].exit_layers.sum() == 2 * len(EXIT_LAYERS)  # the exits did run
    assert with_exits.caches().exit_keys.shape[0] == len(EXIT_LAYERS)  # in their own cache
    assert torch.equal(with_exits.caches().keys, without.caches().keys)
    assert torch.equal(with_exits.caches().values, without.caches().values)
    assert torch.equal(with_exits.sequences, without.sequences)


# --- batching, beams, and alpha = 1 -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["blip2-opt", "blip2-t5", "llava-llama", "qwen2vl-qwen2"])
@pytest.mark.parametrize("policy", ["propagate", "copy", "catch_up"])
def test_batched_decoding_equals_one_sequence_at_a_time(setups, family, policy):
    bb, exits = setups[family]
    pixels, ids, mask, extra = tiny_batch(family, SIZE, 3, seed=7)
    kwargs = dict(criterion=SignRule(), policy=SkipPolicy(policy), max_new_tokens=6)
    with torch.no_grad():
        batched = generate_from_inputs(bb.lm, exits, bb.prepare(pixels, ids, mask, **extra), **kwargs)
        for r in range(3):
            keep = mask[r].bool() if not family.startswith("blip2") else torch.ones_like(mask[r]).bool()
            row_ids, row_mask = ids[r : r + 1, keep], mask[r : r + 1, keep]
            row_pixels, row_extra = image_rows(pixels, extra, [r])
            single = generate_from_inputs(bb.lm, exits, bb.prepare(row_pixels, row_ids, row_mask, **row_extra),
                                          **kwargs)
            n = len(single.trace[0])
            assert batched.sequences[r, :n].tolist() == single.sequences[0, :n].tolist()
            assert batched.exit_layers[r] == single.exit_layers[0]
    layers_seen = {layer for seq in batched.exit_layers for layer in seq}
    assert len(layers_seen) > 1, "the rule should give a mix of exits for this test to mean anything"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_alpha_one_equals_hf_generate_and_checks_no_exit(family, num_beams, batch):
    bb = build_tiny(family, SIZE, seed=0)
    exits = build_exits(bb.lm, ExitSpec("transformer", list(EXIT_LAYERS)))
    pixels, ids, mask, extra = tiny_batch(family, SIZE, batch, seed=2)
    with torch.no_grad():
        ref = bb.hf_generate(pixels, ids, mask, max_new_tokens=5, num_beams=num_beams, do_sample=False, **extra)
        ours = generate_from_inputs(bb.lm, exits, bb.prepare(pixels, ids, mask, **extra),
                                    criterion=Confidence(1.0), max_new_tokens=5, num_beams=num_beams, trace=True,
                                    generation_config=bb.model.generation_config)
    prompt_len = 1 if bb.lm.is_encoder_decoder else ids.shape[1]
    assert torch.equal(ref[:, prompt_len:], ours.sequences)
    assert not [c for c in ours.calls if c[0] == "exit"]
    assert all(layer == SIZE.lm_layers for seq in ours.exit_layers for layer in seq)


def test_beam_search_records_the_exit_layer_of_the_returned_beams(setups):
    bb, exits = setups["blip2-opt"]
    plan = [[None] * 3] + [[0, 1, None]] * 6  # beam rows 0/1/2 leave at layer 2 / layer 4 / the final layer
    with torch.no_grad():
        res = generate_from_inputs(bb.lm, exits, _inputs(bb, "blip2-opt", 1), criterion=Scripted(plan),
                                   max_new_tokens=5, num_beams=3)
    expected = {0: 2, 1: 4, 2: 6}
    for step, row in res.trace[0][1:]:
        assert res.exit_layers[0][step] == expected[row]
    assert math.isfinite(res.seconds)


def test_unsupported_lm_family_fails_with_one_line():
    from freevlm.errors import FreeVLMError
    from freevlm.generation.kernels import kernel_for

    class FakeLM:
        class config:  # noqa: N801 - stands in for a transformers config
            model_type = "gpt_neox"

    with pytest.raises(FreeVLMError, match="no kernel for LM family 'gpt_neox'"):
        kernel_for(FakeLM())
