"""Host syncs per token of the device path (static steps, what runs as CUDA graphs on a GPU), counted on CPU.

A host sync is where Python waits for the device to read a value: `.item()` / `int()` / `bool()` of a tensor
(aten `_local_scalar_dense`), `.tolist()`, `.cpu()`, `nonzero` and boolean-mask indexing (data-dependent shapes).
On CPU nothing waits, so the test instruments those calls instead (the same calls `torch.cuda.set_sync_debug_mode`
flags on a GPU; `benchmarks/gpu_preflight.py` counts them there). Per-token counts are the difference between a
12-token and a 6-token decode of the same prompts (the prefill's and the result's constant costs cancel), with EOS
forbidden by `min_new_tokens` so that both decodes run to the end while still checking EOS every token.

Bounds (issue 29, deliverable 3): full depth 1 per token (the EOS check, which transformers' `generate` makes every
token too); early exit at most one per exit decision plus that EOS check; greedy speculative at most 2 per round.
The dynamic engine (catch-up, gated checks, sampling in speculative mode: the CPU path) is not bounded here.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.graphs import StaticSpeculative
from freevlm.generation.kv import SkipPolicy
from freevlm.generation.speculative import DraftSettings
from freevlm.generation.vocab import HeadSubset
from tests.generation.regression_cases import EXIT_LAYERS, SignRule, build_case

_SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}


def _bool_index(args) -> bool:
    return any(isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in a)
               for a in args)


class HostSyncs(TorchDispatchMode):
    """Counts host syncs (see the module docstring) made from freevlm's code while active, by call site."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter = collections.Counter()
        self._patched = {}

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def _hit(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack() if "/freevlm/" in f.filename]
        if frames:  # syncs inside the test itself are not the engine's
            self.sites[f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {what}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in _SYNC_OPS or (name.startswith("aten.index") and _bool_index(args)):
            self._hit(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for method in ("tolist", "cpu", "numpy"):  # host copies that dispatch no aten op on CPU
            original = getattr(torch.Tensor, method)
            self._patched[method] = original

            def counted(t, *a, _m=method, _o=original, **k):
                self._hit(_m)
                return _o(t, *a, **k)

            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patched.items():
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)


CASE = dict(family="blip2-opt", kind="transformer", criterion="sign", policy="propagate", source="hidden", batch=3,
            num_beams=1)


def _per_token(run) -> tuple[float, HostSyncs]:
    counts = {}
    for tokens in (6, 12):
        with torch.no_grad(), HostSyncs() as syncs:
            result = run(tokens)
        counts[tokens] = syncs
        assert result.sequences.shape[1] == tokens
    long, short = counts[12], counts[6]
    return (long.count - short.count) / 6, long


def _early_exit(family: str, policy: str, subset: bool = False, exits: bool = True):
    case = dict(CASE, family=family, policy=policy)
    bb, stack, _, lm_inputs = build_case(case)
    sub = HeadSubset(torch.arange(0, bb.lm.vocab_size, 2), bb.lm.vocab_size) if subset else None

    def run(tokens):
        return generate_from_inputs(
            bb.lm, stack if exits else None, lm_inputs, criterion=SignRule() if exits else None,
            policy=SkipPolicy(policy, "hidden"), static=True, head_subset=sub, max_new_tokens=tokens,
            min_new_tokens=tokens, generation_config=bb.model.generation_config)
    return run


def test_full_depth_syncs_once_per_token_for_eos():
    per_token, syncs = _per_token(_early_exit("blip2-opt", "propagate", exits=False))
    assert per_token <= 1, dict(syncs.sites)


@pytest.mark.parametrize("family,policy,subset", [("blip2-opt", "propagate", False), ("llava-llama", "copy", False),
                                                  ("blip2-t5", "propagate", False), ("llava-llama", "propagate", True)])
def test_early_exit_syncs_at_most_once_per_decision(family, policy, subset):
    per_token, syncs = _per_token(_early_exit(family, policy, subset))
    decisions = len(EXIT_LAYERS)  # at most: a step stops deciding once every row has left
    assert per_token <= decisions + 1, dict(syncs.sites)  # + the EOS check
    assert any("tolist" in site for site in syncs.sites), "the decisions were not seen: the counter is broken"


@pytest.mark.parametrize("family", ["blip2-opt", "llava-llama"])
def test_speculative_rounds_sync_at_most_twice(family, monkeypatch):
    bb, stack, _, lm_inputs = build_case(dict(CASE, family=family))
    rounds = collections.Counter()
    original = StaticSpeculative.round

    def counted(self, *a, **k):
        rounds["n"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(StaticSpeculative, "round", counted)
    # the graphed round (what a GPU runs): every feed, no host check between them (eager rounds trim on a CPU)
    monkeypatch.setattr(StaticSpeculative, "trim", False)
    counts = {}
    for tokens in (6, 12):
        rounds.clear()
        with torch.no_grad(), HostSyncs() as syncs:
            generate_from_inputs(bb.lm, stack, lm_inputs, draft=DraftSettings(layer=EXIT_LAYERS[0], max_draft=3),
                                 static=True, max_new_tokens=tokens, generation_config=bb.model.generation_config,
                                 eos_token_id=[])
        counts[tokens] = (syncs.count, rounds["n"], syncs)
    (long, long_rounds, syncs), (short, short_rounds, _) = counts[12], counts[6]
    assert long_rounds > short_rounds > 0
    assert (long - short) <= 2 * (long_rounds - short_rounds), dict(syncs.sites)
