"""Exit gates: a closed gate skips the exit transformer and head but leaves the caches as if the exit had run; gate
sizes stay within 1% of a layer; training, reporting and the saved folder."""

from __future__ import annotations

import pytest
import torch

from freevlm.backbones.tiny import TinySize, build_tiny
from freevlm.errors import FreeVLMError
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.criteria import Gated
from freevlm.generation.decode import generate_from_inputs
from freevlm.generation.kv import SkipPolicy
from freevlm.planning.gates import (
    ExitGates,
    evaluate_gates,
    gate_hidden_size,
    load_gates,
    save_gates,
    train_gates,
)
from tests.conftest import tiny_batch
from tests.generation.regression_cases import SignRule

SIZE = TinySize(lm_layers=6)
EXIT_LAYERS = [2, 3, 4]


class HalfGates(ExitGates):
    """Opens where a fixed random projection of h_i is positive: a mix of open and closed rows at every exit."""

    def __init__(self, hidden):
        super().__init__(EXIT_LAYERS, hidden, 0)
        g = torch.Generator().manual_seed(0)
        for layer in EXIT_LAYERS:
            with torch.no_grad():
                self.gates[str(layer)].weight.copy_(torch.randn(1, hidden, generator=g))
                self.gates[str(layer)].bias.zero_()


class GateMasked:
    """The reference: every exit runs and is asked; the wrapped rule fires only where the gate would be open."""

    needs_logits = True

    def __init__(self, gates):
        self.gates, self.rule = gates, SignRule()

    def never_exits(self):
        return False

    def new_step(self, batch, device):
        self.k = -1  # exits are asked in layer order: the k-th call of a step is at EXIT_LAYERS[k]
        return {}

    def __call__(self, state, rows, logits, hidden, prev):
        self.k += 1
        return self.rule(state, rows, logits, hidden, prev) & (self.gates(EXIT_LAYERS[self.k], hidden) > 0)


@pytest.mark.parametrize("family", ["blip2-opt", "blip2-t5", "llava-llama"])
@pytest.mark.parametrize("policy", ["propagate", "copy"])
def test_gated_decoding_equals_checking_only_where_the_gate_opens(family, policy):
    bb = build_tiny(family, SIZE, seed=0)
    torch.manual_seed(1)
    exits = build_exits(bb.lm, ExitSpec("transformer", list(EXIT_LAYERS)))
    gates = HalfGates(bb.lm.hidden_size)
    pixels, ids, mask, extra = tiny_batch(family, SIZE, 3, seed=7)
    lm_inputs = bb.prepare(pixels, ids, mask, **extra)
    kw = dict(policy=SkipPolicy(policy), max_new_tokens=6, keep_cache=True)
    with torch.no_grad():
        gated = generate_from_inputs(bb.lm, exits, lm_inputs, criterion=Gated(SignRule(), gates, 0.5), **kw)
        reference = generate_from_inputs(bb.lm, exits, lm_inputs, criterion=GateMasked(gates), **kw)
    assert gated.exit_layers == reference.exit_layers
    assert gated.sequences.tolist() == reference.sequences.tolist()
    assert len({layer for seq in gated.exit_layers for layer in seq}) > 1
    cg, cr = gated.caches(), reference.caches()
    width = int(cr.lengths.max())
    torch.testing.assert_close(cg.keys[..., :width, :], cr.keys[..., :width, :], atol=1e-5, rtol=0)
    torch.testing.assert_close(cg.exit_keys[..., :width, :], cr.exit_keys[..., :width, :], atol=1e-5, rtol=0)
    runs = [sum(float(r.exit_layers.sum()) for r in res.records[1:]) for res in (gated, reference)]
    assert runs[0] < runs[1], "closed gates must save exit-transformer runs"
    assert all(float(r.gates.sum()) > 0 for r in gated.records[1:])


def test_gate_size_stays_within_one_percent_of_a_layer():
    bb = build_tiny("blip2-opt", TinySize(lm_layers=4, lm_hidden=128, lm_ffn=512), seed=0)
    layer = sum(p.numel() for p in bb.lm.layers[0].parameters())
    inner = gate_hidden_size(bb.lm.hidden_size, layer)
    gates = ExitGates([1, 2], bb.lm.hidden_size, inner)
    assert 0 < gates.parameters_per_gate() <= 0.01 * layer
    assert gate_hidden_size(576, 3_540_096) > 0  # SmolLM2-135M's layer: an MLP gate fits


def test_gates_learn_a_separable_rule_and_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2000, 16, generator=g)
    conf = torch.sigmoid(4 * h[:, 0])  # "fires" where coordinate 0 is large
    features = {2: (h, conf, torch.ones(2000, dtype=torch.bool)), 3: (h, torch.zeros(2000), torch.zeros(2000).bool())}
    gates = train_gates(features, alpha=0.8, hidden_size=16, inner=4)
    report = evaluate_gates(gates, features, alpha=0.8)
    assert report.precision[2] > 0.8 and report.recall[2] > 0.8
    assert report.opened[3] == 0.0  # an exit that never fires gets a closed gate
    save_gates(tmp_path / "g", gates, {"alpha": 0.8, "exits_fingerprint": "abc"})
    loaded, record = load_gates(tmp_path / "g", 16, "abc")
    assert torch.equal(loaded(2, h[:5]), gates(2, h[:5])) and record["alpha"] == 0.8
    with pytest.raises(FreeVLMError, match="hidden states of size 16"):
        load_gates(tmp_path / "g", 32)
    with pytest.raises(FreeVLMError, match="other exits"):
        load_gates(tmp_path / "g", 16, "zzz")
    with pytest.raises(FreeVLMError, match="not a gate folder"):
        load_gates(tmp_path / "missing", 16)


@pytest.mark.parametrize("family", ["blip2-opt", "blip2-t5", "minigpt4-llama", "llava-llama"])
@pytest.mark.parametrize("policy", ["propagate", "copy"])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_lazy_exit_filling_equals_eager_filling(family, policy, num_beams):
    """Closed gates leave their exit K/V owed and the exit projects them in one batched call when it next runs: the
    same tokens, exit layers and exit caches (every column in use, once owed entries are written at the end) as
    projecting them at once; projections are charged where they run (those never needed are never done). Beam
    search writes owed entries before reordering rows."""
    bb = build_tiny(family, SIZE, seed=0)
    torch.manual_seed(1)
    exits = build_exits(bb.lm, ExitSpec("transformer", list(EXIT_LAYERS)))
    gates = HalfGates(bb.lm.hidden_size)
    pixels, ids, mask, extra = tiny_batch(family, SIZE, 3, seed=7)
    lm_inputs = bb.prepare(pixels, ids, mask, **extra)
    kw = dict(criterion=Gated(SignRule(), gates, 0.5), policy=SkipPolicy(policy), max_new_tokens=7,
              num_beams=num_beams, output_logits=True, keep_cache=True)
    with torch.no_grad():
        lazy = generate_from_inputs(bb.lm, exits, lm_inputs, **kw)
        eager = generate_from_inputs(bb.lm, exits, lm_inputs, lazy_exit_fill=False, **kw)
    assert not eager.work.lazy_exit_fill and lazy.work.lazy_exit_fill
    assert lazy.sequences.tolist() == eager.sequences.tolist() and lazy.exit_layers == eager.exit_layers
    for a, b in zip(lazy.logits, eager.logits):  # an exit reading a K/V pair not yet written would change these
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    owed = lazy.work.owed_exit_kv  # left owed when decoding ended: written when the cache is kept (compared below)
    cl, ce = lazy.caches(), eager.caches()
    width = int(ce.lengths.max())
    for r in range(ce.batch):
        used = int(ce.lengths[r])
        torch.testing.assert_close(cl.exit_keys[:, r, :, :used], ce.exit_keys[:, r, :, :used], atol=1e-5, rtol=0)
        torch.testing.assert_close(cl.exit_values[:, r, :, :used], ce.exit_values[:, r, :, :used], atol=1e-5, rtol=0)
    torch.testing.assert_close(cl.keys[..., :width, :], ce.keys[..., :width, :], atol=1e-5, rtol=0)
    charged = [sum(float(r.kv_projections.sum()) for r in res.records) for res in (lazy, eager)]
    assert charged[0] + owed <= charged[1] + 1e-6
    deferred = owed + sum(r.numel() for entry in lazy.log for r in entry.owed_filled or [])
    assert deferred > 0, "some closed gate's K/V should have been left owed"
