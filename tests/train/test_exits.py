"""Exit modules: parameter accounting, the adversarial pieces, frozen backbones, exit-only checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from freevlm.backbones.lm import DecoderOnlyLM
from freevlm.errors import FreeVLMError
from freevlm.eval.efficiency import CostModel, count_parameters
from freevlm.exits import Discriminator, ExitSpec, build_exits, load_exits, save_exits
from freevlm.losses import IGNORE, discriminator_loss, generator_loss
from freevlm.train.batches import Collator
from freevlm.train.forward import teacher_forced
from freevlm.train.loop import LoopConfig, OptimConfig
from freevlm.train.stage2 import Discriminators, ExitTrainConfig, train_exits
from tests.train.conftest import colour_task


def test_opt_2_7b_parameter_counts_from_the_modules():
    cfg = OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, vocab_size=50272,
                    word_embed_proj_dim=2560, max_position_embeddings=2048)
    with torch.device("meta"):
        lm = DecoderOnlyLM.from_opt(OPTForCausalLM(cfg))
        exits = build_exits(lm, ExitSpec("transformer", [3, 6, 9, 12, 24, 27, 30]))
    et = count_parameters(exits.exits[0])
    head = count_parameters(lm.lm_head)
    assert et == 78_676_480  # one OPT-2.7B layer: the paper's Table 12 says ~62.8M
    assert head == 128_696_320  # 2560 x 50272, the linear exit head every DeeBERT-style exit trains
    assert round(1 - et / head, 3) == 0.389  # ET exits train ~38.9% fewer parameters than linear heads, not 52%
    assert CostModel.from_modules(lm, exits).layer == et


def test_discriminator_is_one_hidden_layer_of_3072_with_leaky_relu():
    d = Discriminator(32)
    linears = [m for m in d.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 3072), (3072, 1)]
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in d.modules())
    assert d(torch.randn(2, 5, 32)).shape == (2, 5)


def _states(backbone, examples, exits):
    batch = Collator(backbone)(examples[:4])
    with torch.no_grad():
        tf = teacher_forced(backbone, batch, keep=set(exits.layers))
    return tf


def test_generator_loss_alone_reaches_every_exit_and_discriminator_step_leaves_exits_alone(tmp_path):
    backbone, examples = colour_task(tmp_path)
    exits = build_exits(backbone.lm, ExitSpec("transformer", [2, 4]))
    discs = Discriminators(backbone.lm.hidden_size, 2, 3072)
    tf = _states(backbone, examples, exits)
    mask = tf.targets != IGNORE
    states = [e.state(backbone.lm, tf.states[layer], tf.ctx, None) for layer, e in zip(exits.layers, exits.exits)]
    # discriminator step: exits see no gradient, and their weights do not move
    before = {k: v.clone() for k, v in exits.state_dict().items()}
    opt_d = torch.optim.AdamW(discs.parameters(), lr=1e-2)
    scores = discs([torch.cat([tf.final, s.detach()]) for s in states])
    d_loss = sum(discriminator_loss(sc[:4], sc[4:], mask) for sc in scores)
    d_loss.backward()
    opt_d.step()
    assert all(p.grad is None for p in exits.parameters())
    assert all(torch.equal(v, exits.state_dict()[k]) for k, v in before.items())
    # generator step with the adversarial term only: every exit transformer gets a non-zero gradient
    g_loss = sum(generator_loss(sc, mask) for sc in discs(states))
    g_loss.backward()
    for exit_ in exits.exits:
        grads = [p.grad for p in exit_.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_stage2_keeps_the_backbone_bit_identical_and_saves_exit_only_checkpoints(tmp_path):
    backbone, examples = colour_task(tmp_path / "data")
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    cfg = ExitTrainConfig(exit_layers=[2, 4], optim=OptimConfig(lr=1e-3, warmup_steps=1),
                          loop=LoopConfig(epochs=2, batch_size=4, progress=False))
    exits, _ = train_exits(backbone, examples, cfg, tmp_path / "run", save_discriminators=True)
    after = backbone.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    folder = tmp_path / "run" / "exits"
    assert sorted(p.name for p in folder.iterdir()) == ["discriminators.safetensors", "exits.json",
                                                        "exits.safetensors"]
    loaded = load_exits(folder, backbone.lm)
    for (k, v), (k2, v2) in zip(exits.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert loaded.layers == [2, 4]


def test_loading_exits_onto_another_backbone_or_layer_set_is_refused(tmp_path):
    backbone, _ = colour_task(tmp_path / "a")
    exits = build_exits(backbone.lm, ExitSpec("transformer", [2, 4]))
    save_exits(tmp_path / "exits", backbone.lm, exits, "tiny-a")
    with pytest.raises(FreeVLMError, match="not at"):
        load_exits(tmp_path / "exits", backbone.lm, expected_layers=[1, 3])
    other, _ = colour_task(tmp_path / "b", seed=1)  # same architecture, different weights
    with pytest.raises(FreeVLMError, match="frozen head"):
        load_exits(tmp_path / "exits", other.lm)
    deeper, _ = colour_task(tmp_path / "c", layers=8)
    with pytest.raises(FreeVLMError, match="num_layers=6"):
        load_exits(tmp_path / "exits", deeper.lm)
    with pytest.raises(FreeVLMError, match="exit checkpoint folder not found"):
        load_exits(tmp_path / "nowhere", backbone.lm)
    with pytest.raises(FreeVLMError, match="not an exit checkpoint"):
        load_exits(tmp_path, backbone.lm)


def test_the_weights_file_records_what_its_exits_were_trained_for(tmp_path):
    """exits.json alone cannot be trusted: the exits' tensors are the same for any layer list of the same length,
    so the weights file's own header says where the exits sit, and an exits.json that disagrees is refused."""
    import json

    from safetensors import safe_open

    backbone, _ = colour_task(tmp_path / "a")
    linear = build_exits(backbone.lm, ExitSpec("linear", [1, 3]))
    save_exits(tmp_path / "exits", backbone.lm, linear, "tiny-a")
    with safe_open(str(tmp_path / "exits" / "exits.safetensors"), "pt") as f:
        record = json.loads(f.metadata()["freevlm.exits"])
    assert {k: record[k] for k in ("exit_layers", "kind", "seed_layer", "lm_type", "num_layers")} == {
        "exit_layers": [1, 3], "kind": "linear", "seed_layer": "next", "lm_type": "opt", "num_layers": 6}
    assert record == json.loads((tmp_path / "exits" / "exits.json").read_text())
    config = tmp_path / "exits" / "exits.json"
    for key, value in (("exit_layers", [2, 4]), ("kind", "frozen-head"), ("fingerprint", "0" * 16)):
        config.write_text(json.dumps({**record, key: value}))
        with pytest.raises(FreeVLMError, match=f"does not match the weights beside it: {key} is"):
            load_exits(tmp_path / "exits", backbone.lm)
    config.write_text(json.dumps(record))
    assert load_exits(tmp_path / "exits", backbone.lm).layers == [1, 3]


def test_an_exit_checkpoint_without_the_record_is_refused_until_resaved(tmp_path):
    from safetensors.torch import load_file, save_file

    from freevlm.exits import resave_exits

    backbone, _ = colour_task(tmp_path / "a")
    exits = build_exits(backbone.lm, ExitSpec("transformer", [2, 4]))
    save_exits(tmp_path / "exits", backbone.lm, exits, "tiny-a")
    weights = tmp_path / "exits" / "exits.safetensors"
    save_file(load_file(weights), str(weights))  # as freevlm saved exits before the record existed
    with pytest.raises(FreeVLMError, match="do not record which layers .* retrain them, or re-save them"):
        load_exits(tmp_path / "exits", backbone.lm)
    other, _ = colour_task(tmp_path / "b", seed=1)
    with pytest.raises(FreeVLMError, match="frozen head"):
        resave_exits(tmp_path / "exits", other.lm)  # re-saving still checks the backbone
    resave_exits(tmp_path / "exits", backbone.lm)
    loaded = load_exits(tmp_path / "exits", backbone.lm)
    assert loaded.layers == [2, 4]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in exits.state_dict().items())
