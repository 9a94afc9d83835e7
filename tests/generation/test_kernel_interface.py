"""The kernel interface (issue 29, deliverable 4): what the engine asks of a family's kernel, and what a kernel may
not do to the engines sharing it.

- `.to(dtype)` after decoding: derived weights (stacked propagation projections, subset head rows) follow it;
- the KV cache's dtype is the weights', whatever the inputs';
- engines decoding at once on one LM do not disturb each other (a kernel keeps no per-call state);
- the engine never asks which family it runs (no family-name tests), only what the `DecoderKernel` protocol offers.
"""

from __future__ import annotations

import ast
import copy
import re
import typing
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from freevlm.backbones.tiny import TinySize, build_tiny
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.engine import Engine
from freevlm.generation.kernels import kernel_for
from freevlm.generation.kernels.common import DecoderKernel, EncoderDecoderKernel
from freevlm.generation.kv import SkipPolicy
from freevlm.generation.vocab import HeadSubset
from tests.conftest import tiny_batch
from tests.generation.regression_cases import SignRule

SIZE = TinySize(lm_layers=6)
EXIT_LAYERS = [2, 4]
LMS = ["blip2-opt", "blip2-t5", "llava-llama"]  # one of each kernel
GENERATION = Path(__file__).resolve().parents[2] / "src" / "freevlm" / "generation"


def _build(family):
    bb = build_tiny(family, SIZE, seed=0)
    torch.manual_seed(1)
    return bb, build_exits(bb.lm, ExitSpec("transformer", list(EXIT_LAYERS)))


def _inputs(bb, family, batch, seed=1):  # seed 1: a mix of exits on every family
    pixels, ids, mask, extra = tiny_batch(family, SIZE, batch, seed=seed)
    with torch.no_grad():
        return bb.prepare(pixels, ids, mask, **extra)


def _generate(bb, exits, lm_inputs, **kwargs):
    kwargs.setdefault("policy", SkipPolicy("propagate"))
    kwargs.setdefault("keep_cache", True)  # the tests compare caches
    return generate_from_inputs(bb.lm, exits, lm_inputs, criterion=SignRule(), max_new_tokens=6,
                                generation_config=bb.model.generation_config, **kwargs)


def _tokens(res):
    return [res.sequences[i, : len(t)].tolist() for i, t in enumerate(res.trace)]


def _caches_equal(a, b) -> bool:
    return all(torch.equal(getattr(a, name), getattr(b, name)) for name in ("keys", "values", "exit_keys",
                                                                           "exit_values"))


# --- .to(dtype) after decoding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", LMS)
@pytest.mark.parametrize("source, subset", [("hidden", False), ("exit", True)], ids=["hidden", "exit-subset"])
def test_to_bf16_after_decoding_equals_a_model_converted_before(family, source, subset):
    """The stacked propagation weights (and a subset head's rows) built in fp32 are rebuilt after `.to(bf16)`: no
    dtype error, and the tokens, exits and caches are those of a copy converted before it ever decoded."""
    bb, exits = _build(family)
    fresh_bb, fresh_exits = copy.deepcopy((bb, exits))
    fresh_bb.model.to(torch.bfloat16)
    fresh_exits.to(torch.bfloat16)
    kw = dict(policy=SkipPolicy("propagate", source))
    if subset:
        kw["head_subset"] = HeadSubset(torch.arange(0, SIZE.vocab_size, 2), SIZE.vocab_size)

    with torch.no_grad():
        before = _generate(bb, exits, _inputs(bb, family, 3), **kw)
        assert before.caches().keys.dtype == torch.float32
        bb.model.to(torch.bfloat16)
        exits.to(torch.bfloat16)
        after = _generate(bb, exits, _inputs(bb, family, 3), **kw)
        expected = _generate(fresh_bb, fresh_exits, _inputs(fresh_bb, family, 3), **kw)

    for res in (before, after):  # propagation ran, before and after the conversion
        assert any(layer < SIZE.lm_layers for seq in res.exit_layers for layer in seq)
    assert after.caches().keys.dtype == torch.bfloat16
    assert _tokens(after) == _tokens(expected) and after.exit_layers == expected.exit_layers
    assert _caches_equal(after.caches(), expected.caches())


# --- the cache's dtype ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", LMS)
@pytest.mark.parametrize("weights, inputs", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16-weights", "fp32-weights"])
def test_the_cache_dtype_is_the_weights_not_the_inputs(family, weights, inputs):
    """Inputs in another dtype than the LM's weights: the cache (backbone and exits) holds the weights' dtype, and
    decoding equals decoding the same inputs given in the weights' dtype."""
    bb, exits = _build(family)
    bb.model.to(weights)
    exits.to(weights)
    lm_inputs = _inputs(bb, family, 3)
    given = replace(lm_inputs, inputs_embeds=lm_inputs.inputs_embeds.to(inputs))
    same = replace(lm_inputs, inputs_embeds=given.inputs_embeds.to(weights))
    with torch.no_grad():
        res = _generate(bb, exits, given)
        ref = _generate(bb, exits, same)
    cache = res.caches()
    assert cache.keys.dtype == cache.values.dtype == cache.exit_keys.dtype == weights
    assert _tokens(res) == _tokens(ref) and res.exit_layers == ref.exit_layers
    assert _caches_equal(cache, ref.caches())


# --- engines sharing one LM -----------------------------------------------------------------------------------------


def _decode(engine, lm_inputs, max_new, logits_out):
    """Greedy decoding on `engine`, paused after each engine call (prefill, then each step)."""
    logits = engine.prefill(lm_inputs, max_new)
    logits_out.append(logits)
    for _ in range(max_new - 1):
        yield
        logits = engine.step(logits.float().argmax(-1))
        logits_out.append(logits)


@pytest.mark.parametrize("family", LMS)
def test_engines_stepping_in_turn_on_one_lm_equal_their_solo_runs(family):
    """Three engines on one LM, as a server would interleave requests: different batches, prompts, lengths (so
    different per-call tables) and exit settings, stepped in turn; each equals its own run alone, token for token."""
    bb, exits = _build(family)
    lm = bb.lm
    settings = [  # (engine kwargs, batch, prompt seed, max new tokens): the longest prefills first
        (dict(exits=exits, criterion=SignRule(), policy=SkipPolicy("propagate"), static=True), 3, 1, 8),
        (dict(exits=exits, criterion=SignRule(), policy=SkipPolicy("copy"), check_layers=[4]), 2, 4, 3),
        (dict(exits=exits, criterion=SignRule(), policy=SkipPolicy("catch_up")), 1, 5, 5),
        (dict(), 2, 0, 4),  # full depth
    ]
    inputs = [_inputs(bb, family, batch, seed) for _, batch, seed, _ in settings]

    def engines():
        return [Engine(lm, **kw) for kw, *_ in settings]

    with torch.no_grad():
        solo, solo_logits = engines(), [[] for _ in settings]
        for engine, lm_inputs, (*_, max_new), out in zip(solo, inputs, settings, solo_logits):
            for _ in _decode(engine, lm_inputs, max_new, out):
                pass
        together, together_logits = engines(), [[] for _ in settings]
        runs = [_decode(e, x, s[-1], out) for e, x, s, out in zip(together, inputs, settings, together_logits)]
        while runs:
            for run in list(runs):
                if next(run, StopIteration) is StopIteration:
                    runs.remove(run)

    for a, b, la, lb in zip(together, solo, together_logits, solo_logits):
        assert len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))
        assert all(torch.equal(x.exit_layer, y.exit_layer) for x, y in zip(a.log, b.log))
        a.flush()
        b.flush()
        assert torch.equal(a.cache.keys, b.cache.keys) and torch.equal(a.cache.values, b.cache.values)
        if a.cache.exit_keys is not None:
            assert torch.equal(a.cache.exit_keys, b.cache.exit_keys)
    assert any(int(x.exit_layer.min()) < SIZE.lm_layers for x in together[0].log[1:])  # exits fired


# --- no family names in the engine ----------------------------------------------------------------------------------

_FAMILY_TESTS = [
    r"\b(family|model_type)\s*(==|!=|\bin\b|\bnot\s+in\b)",  # family == "llama", model_type in (...)
    r"(==|!=)\s*['\"](opt|llama|mistral|t5)['\"]",
    r"['\"](opt|llama|mistral|t5)['\"]\s*(==|!=|\bin\b)",
    r"\.family\b",  # reading a kernel's family name at all
    r"isinstance\([^)]*\b(OPTKernel|LlamaKernel|T5Kernel)\b",
]


def test_the_engine_never_tests_an_lm_family():
    """What differs between families (RoPE, positions, T5's bias) comes from the kernel: no code in
    `generation/` decides by a family's name (the kernel registry `KERNELS` maps names to kernels, and only that)."""
    found = []
    for path in sorted(GENERATION.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(re.search(p, code) for p in _FAMILY_TESTS):
                found.append(f"{path.relative_to(GENERATION)}:{i}: {line.strip()}")
    assert not found, "family-name tests in generation/:\n" + "\n".join(found)


# --- the kernel protocol --------------------------------------------------------------------------------------------


def _protocol_members(*protocols) -> set[str]:
    names = set()
    for proto in protocols:
        for cls in proto.__mro__:
            if cls in (typing.Protocol, typing.Generic, object):
                continue
            names |= set(getattr(cls, "__annotations__", {}))
            names |= {n for n in vars(cls) if not n.startswith("_")}
    return names


def _kernel_uses() -> dict[str, set[str]]:
    """Every attribute the generation code (outside the family kernels themselves) reads off a kernel: `kernel.x`,
    `engine.kernel.x`, and `k.x` where `k` was bound to a `.kernel` in the same function."""
    uses: dict[str, set[str]] = {}
    family_files = {"opt.py", "llama.py", "t5.py"}
    for path in sorted(GENERATION.rglob("*.py")):
        if path.parent.name == "kernels" and path.name in family_files:
            continue
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            aliases = {"kernel"}
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        pairs = [(target, node.value)]
                        if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                            pairs = list(zip(target.elts, node.value.elts))
                        for t, v in pairs:
                            if isinstance(t, ast.Name) and isinstance(v, ast.Attribute) and v.attr == "kernel":
                                aliases.add(t.id)
            for node in ast.walk(fn):
                if not isinstance(node, ast.Attribute):
                    continue
                base = node.value
                if (isinstance(base, ast.Name) and base.id in aliases) or (
                        isinstance(base, ast.Attribute) and base.attr == "kernel"):
                    uses.setdefault(node.attr, set()).add(f"{path.relative_to(GENERATION)}:{node.lineno}")
    return uses


@pytest.mark.parametrize("family", LMS)
def test_every_family_kernel_satisfies_the_protocol(family):
    kernel = kernel_for(build_tiny(family, SIZE, seed=0).lm)
    assert isinstance(kernel, DecoderKernel)
    assert isinstance(kernel, EncoderDecoderKernel) == family.endswith("t5")
    assert isinstance(kernel.has_rope, bool) and isinstance(kernel.static_rope, bool)
    assert kernel.dtype == torch.float32


def test_the_protocol_covers_what_the_engine_calls():
    uses = _kernel_uses()
    assert {"embed_tokens", "layer", "project_kv", "logits", "prepare", "start"} <= set(uses)  # the scan sees them
    missing = {name: sorted(where) for name, where in uses.items()
               if name not in _protocol_members(DecoderKernel, EncoderDecoderKernel)}
    assert not missing, f"kernel attributes used outside the DecoderKernel protocol: {missing}"
