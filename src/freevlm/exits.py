"""Exits and discriminators.

An exit turns the hidden state after its layer (h_i, see `backbones/base.py` for the numbering) into next-token
logits. Three kinds, one small module each:

- `ExitTransformer` (FREE, §3 opening and §3.3): a trainable replica of one LM layer, followed by the *frozen, shared*
  final norm and LM head (the paper's exit classifier C_N). The replica writes K/V into its own slot of a separate
  exit cache: a copied transformers layer keeps the original's `layer_idx`, so it is renumbered here.
- `LinearExit` (DeeBERT / PABEE / LeeBERT baselines): the frozen final norm, then a trainable full-vocabulary linear
  classifier of its own, initialised from the LM head.
- `FrozenHeadExit`: no parameters; the frozen final norm + LM head applied to h_i directly (MuE; Fig. 3's
  "decode every layer through the frozen head" curve).

`Discriminator` is FREE's feature classifier D_i (§3.3, §4): an MLP with one hidden layer of 3072 and LeakyReLU that
scores whether a feature comes from the final layer (real, h_N) or from an exit (fake).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from freevlm.backbones.base import LanguageModel, LayerContext
from freevlm.errors import FreeVLMError

SEED_LAYER_CHOICES = ("next", "same", "last")


def seed_layer(exit_layer: int, num_layers: int, choice: str) -> int:
    """Which LM layer's weights initialise the exit transformer at `exit_layer` (1-based).

    "next" (default): layer i+1, so that before training the exit computes exactly what the backbone's next layer
    would (a sane, non-random start); "same": layer i; "last": layer N, whose output the frozen head was trained on.
    """
    if choice == "next":
        return min(exit_layer + 1, num_layers)
    if choice == "same":
        return exit_layer
    if choice == "last":
        return num_layers
    raise ValueError(f"unknown exit seed layer {choice!r}; expected one of {', '.join(SEED_LAYER_CHOICES)}")


def _renumber(layer: nn.Module, slot: int) -> None:
    """Point every attention inside `layer` at cache slot `slot`, and drop T5's relative-bias table.

    The engine always hands T5 layers the decoder's block-0 bias through the LayerContext, so a copy of block 0 would
    carry a table that never receives a gradient (and that DDP would flag as an unused parameter).
    """
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = slot
        if getattr(module, "has_relative_attention_bias", False):
            module.has_relative_attention_bias = False
            del module.relative_attention_bias


class ExitTransformer(nn.Module):
    """FREE's exit: one trainable LM-layer replica E_i + the frozen shared classifier C_N (final norm + LM head)."""

    kind = "transformer"
    uses_cache = True

    def __init__(self, layer: nn.Module, slot: int):
        super().__init__()
        self.layer = copy.deepcopy(layer)
        self.slot = slot  # this exit's slot in the exit cache
        _renumber(self.layer, slot)
        self.layer.requires_grad_(True)

    def state(self, lm: LanguageModel, hidden: torch.Tensor, ctx: LayerContext, cache) -> torch.Tensor:
        """E_i(h_i): (B, q, D) -> (B, q, D); K/V go to `cache` slot `self.slot` (pass None for no cache)."""
        return lm.run_layer(self.layer, hidden, ctx, cache)

    def logits(self, lm: LanguageModel, state: torch.Tensor) -> torch.Tensor:
        return lm.head(lm.final_norm(state))


class LinearExit(nn.Module):
    """A DeeBERT-style exit: frozen final norm, then its own full-vocabulary linear classifier."""

    kind = "linear"
    uses_cache = False

    def __init__(self, lm_head: nn.Linear):
        super().__init__()
        self.classifier = nn.Linear(lm_head.in_features, lm_head.out_features, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(lm_head.weight)
        self.classifier.to(lm_head.weight.device, lm_head.weight.dtype)

    def state(self, lm, hidden, ctx, cache):
        return hidden

    def logits(self, lm, state):
        return self.classifier(lm.final_norm(state))


class FrozenHeadExit(nn.Module):
    """The backbone's own frozen norm + head read at an intermediate layer; no parameters."""

    kind = "frozen-head"
    uses_cache = False

    def state(self, lm, hidden, ctx, cache):
        return hidden

    def logits(self, lm, state):
        return lm.head(lm.final_norm(state))


class Discriminator(nn.Module):
    """Feature classifier D_i: one hidden linear layer (3072, LeakyReLU), one logit for "this is a final-layer h_N"."""

    def __init__(self, hidden_size: int, inner_size: int = 3072, negative_slope: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, inner_size), nn.LeakyReLU(negative_slope), nn.Linear(inner_size, 1)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)  # (...,) logits; sigmoid gives D(x)


@dataclass
class ExitSpec:
    """What an exit set is: its kind, where the exits sit, and how transformer exits were seeded."""

    kind: str  # "transformer" (FREE), "linear" (DeeBERT/PABEE/LeeBERT), "frozen-head" (MuE, vanilla)
    layers: list[int]  # exit layers, 1-based, strictly increasing, each < num_layers
    seed_layer: str = "next"  # transformer exits only: see `seed_layer`


class ExitStack(nn.Module):
    """The exits of one backbone, in layer order."""

    def __init__(self, spec: ExitSpec, exits: list[nn.Module]):
        super().__init__()
        if len(exits) != len(spec.layers):
            raise ValueError(f"{len(exits)} exit modules for {len(spec.layers)} exit layers")
        self.spec = spec
        self.exits = nn.ModuleList(exits)
        self.position = {layer: i for i, layer in enumerate(spec.layers)}  # exit layer -> index in `exits`

    @property
    def layers(self) -> list[int]:
        return self.spec.layers

    @property
    def uses_cache(self) -> bool:
        return any(getattr(e, "uses_cache", False) for e in self.exits)

    def at(self, layer: int) -> nn.Module | None:
        i = self.position.get(layer)
        return None if i is None else self.exits[i]


def validate_exit_layers(layers: list[int], num_layers: int) -> list[int]:
    layers = [int(x) for x in layers]
    if not layers:
        raise FreeVLMError("no exit layers given")
    if sorted(set(layers)) != layers:
        raise FreeVLMError(f"exit layers must be strictly increasing, got {layers}")
    if layers[0] < 1 or layers[-1] >= num_layers:
        raise FreeVLMError(f"exit layers must lie in 1..{num_layers - 1} for a {num_layers}-layer LM, got {layers}")
    return layers


def build_exits(lm: LanguageModel, spec: ExitSpec) -> ExitStack:
    """Fresh exits of `spec.kind` at `spec.layers` for this LM (transformer exits copy their seed layers)."""
    spec.layers = validate_exit_layers(spec.layers, lm.num_layers)
    if spec.kind == "transformer":
        exits = [
            ExitTransformer(lm.layers[seed_layer(layer, lm.num_layers, spec.seed_layer) - 1], slot)
            for slot, layer in enumerate(spec.layers)
        ]
    elif spec.kind == "linear":
        exits = [LinearExit(lm.lm_head) for _ in spec.layers]
    elif spec.kind == "frozen-head":
        exits = [FrozenHeadExit() for _ in spec.layers]
    else:
        raise ValueError(f"unknown exit kind {spec.kind!r}; expected transformer, linear or frozen-head")
    return ExitStack(spec, exits)


# --- exit-only checkpoints ----------------------------------------------------------------------------------------

EXITS_WEIGHTS, EXITS_CONFIG, DISCRIMINATORS_WEIGHTS = "exits.safetensors", "exits.json", "discriminators.safetensors"


def backbone_fingerprint(lm: LanguageModel) -> str:
    """A short hash of the frozen pieces exits depend on (LM head, final norm, last layer): exits trained on one
    backbone are meaningless on another, even one of the same architecture."""
    h = hashlib.sha256()
    tensors = [lm.lm_head.weight, *list(lm.layers[-1].parameters())[:1]]
    norm = getattr(lm, "norm", None) or getattr(getattr(lm, "decoder", None), "final_layer_norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        tensors.append(norm.weight)
    for t in tensors:
        flat = t.detach().float().flatten()
        h.update(flat[:: max(1, flat.numel() // 4096)].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def exit_metadata(lm: LanguageModel, exits: ExitStack, backbone_name: str) -> dict:
    return {
        "format": "freevlm-exits/1",
        "backbone": backbone_name,
        "lm_type": lm.config.model_type,
        "num_layers": lm.num_layers,
        "hidden_size": lm.hidden_size,
        "vocab_size": lm.vocab_size,
        "exit_layers": list(exits.spec.layers),
        "kind": exits.spec.kind,
        "seed_layer": exits.spec.seed_layer,
        "fingerprint": backbone_fingerprint(lm),
    }


def save_exits(folder, lm: LanguageModel, exits: ExitStack, backbone_name: str, discriminators=None) -> None:
    """exits.safetensors (+ discriminators.safetensors) and exits.json into `folder`, written then renamed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pending = [(EXITS_WEIGHTS, exits), (DISCRIMINATORS_WEIGHTS, discriminators)]
    for name, module in pending:
        if module is None:
            continue
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        tmp = folder / f".{name}.tmp"
        save_file(state, str(tmp))
        os.replace(tmp, folder / name)
    tmp = folder / f".{EXITS_CONFIG}.tmp"
    tmp.write_text(json.dumps(exit_metadata(lm, exits, backbone_name), indent=2))
    os.replace(tmp, folder / EXITS_CONFIG)


def load_exits(folder, lm: LanguageModel, expected_layers: list[int] | None = None) -> ExitStack:
    """Exits saved by `save_exits`, refused with a one-line error if they belong to another backbone or layer set."""
    folder = Path(folder)
    config_file = folder / EXITS_CONFIG
    if not config_file.is_file():
        raise FreeVLMError(f"not an exit checkpoint (no {EXITS_CONFIG}): {folder}")
    meta = json.loads(config_file.read_text())
    for key, have in (("lm_type", lm.config.model_type), ("num_layers", lm.num_layers),
                      ("hidden_size", lm.hidden_size), ("vocab_size", lm.vocab_size)):
        if meta.get(key) != have:
            raise FreeVLMError(
                f"exits in {folder} were trained for a backbone with {key}={meta.get(key)!r}, this one has {have!r}"
            )
    if meta.get("fingerprint") != backbone_fingerprint(lm):
        raise FreeVLMError(
            f"exits in {folder} were trained on backbone {meta.get('backbone')!r}, whose frozen head/layers differ "
            "from this backbone's"
        )
    if expected_layers is not None and list(expected_layers) != meta["exit_layers"]:
        raise FreeVLMError(f"exits in {folder} sit at layers {meta['exit_layers']}, not at {list(expected_layers)}")
    exits = build_exits(lm, ExitSpec(meta["kind"], list(meta["exit_layers"]), meta.get("seed_layer", "next")))
    state = load_file(str(folder / EXITS_WEIGHTS))
    missing, unexpected = exits.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FreeVLMError(f"exit weights in {folder} do not match their config: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    device = next(iter(lm.layers.parameters())).device
    return exits.to(device).eval()
