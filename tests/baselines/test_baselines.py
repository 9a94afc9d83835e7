"""Each baseline: trains a few steps through the shared stage-2 loop, decodes with its own criterion, and its exits
really skip layers (counted from the engine's call trace). Exits are forced through the criterion's settings."""

from __future__ import annotations

import pytest
import torch

from freevlm.baselines import METHODS
from freevlm.eval.efficiency import trainable_parameters_per_exit
from freevlm.exits import ExitSpec, build_exits
from freevlm.generation.api import DecodeOptions, EarlyExitVLM
from freevlm.train.loop import LoopConfig, OptimConfig
from freevlm.train.stage2 import train_exits, variant_config
from tests.train.conftest import colour_task

FORCING = {"confidence": 0.01, "patience": 1, "similarity": -1.0}  # settings under which exits fire


@pytest.mark.parametrize("name", ["DeeBLIP", "PABEE-BLIP", "LeeBLIP", "LeeBERT", "MuE"])
def test_baseline_trains_and_its_exits_skip_layers(tmp_path, name):
    method = METHODS[name]
    backbone, examples = colour_task(tmp_path / "data")
    lm = backbone.lm
    layers = [2, 3, 4]
    if method.variant is None:
        exits = build_exits(lm, ExitSpec(method.exit_kind, layers))
        assert trainable_parameters_per_exit(exits) == 0
    else:
        cfg = variant_config(method.variant, exit_layers=layers, optim=OptimConfig(lr=3e-3, warmup_steps=1),
                             loop=LoopConfig(epochs=2, batch_size=4, progress=False))
        before = {k: v.clone() for k, v in build_exits(lm, ExitSpec("linear", layers)).state_dict().items()}
        exits, _ = train_exits(backbone, examples, cfg, tmp_path / "run")
        assert exits.spec.kind == method.exit_kind == "linear"
        assert trainable_parameters_per_exit(exits) == lm.vocab_size * lm.hidden_size
        assert any(not torch.equal(v, exits.state_dict()[k]) for k, v in before.items())  # training moved them
    vlm = EarlyExitVLM(backbone, exits)
    opts = DecodeOptions(criterion=method.criterion, threshold=FORCING[method.criterion],
                         kv_policy=method.kv_policy, max_new_tokens=4)
    res = vlm.generate([e.image_path for e in examples[:2]], ["a photo of"] * 2, opts, min_new_tokens=4, trace=True)
    calls = [0] * lm.num_layers
    for kind, layer, _ in res.calls:
        if kind == "layer":
            calls[layer - 1] += 1
    # a layer runs in a decode step iff some row of the batch had not left before it; the prefill runs them all
    deepest = [int(rec.exit_layer.max()) for rec in res.records[1:]]
    expected = [1 + sum(d >= layer for d in deepest) for layer in range(1, lm.num_layers + 1)]
    assert calls == expected
    assert calls[-1] < len(res.records), "under the forcing setting, some decode step must skip the last layers"
