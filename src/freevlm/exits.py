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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from freevlm.backbones.base import LanguageModel, LayerContext
from freevlm.errors import FreeVLMError

SEED_LAYER_CHOICES = ("next", "same", "last")
EXIT_KINDS = ("transformer", "linear", "frozen-head")


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


FORMAT = "freevlm-exits/2"  # /1 kept what the exits were trained for in exits.json only
METADATA_KEY = "freevlm.exits"  # the key of the safetensors header metadata holding `exit_metadata` as JSON
# What must agree between exits.json and the weights file's own record (and, for the last five, with the backbone).
RECORDED = ("exit_layers", "kind", "seed_layer", "lm_type", "num_layers", "hidden_size", "vocab_size", "fingerprint")


def exit_metadata(lm: LanguageModel, exits: ExitStack, backbone_name: str) -> dict:
    return {
        "format": FORMAT,
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


def _save_module(path: Path, module: nn.Module, meta: dict) -> None:
    from freevlm.outputs import atomic_write

    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    header = {"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=header))


def save_exits(folder, lm: LanguageModel, exits: ExitStack, backbone_name: str, discriminators=None) -> None:
    """exits.safetensors (+ discriminators.safetensors) and exits.json into `folder`, each written then renamed.

    The weights file records in its own header what the exits were trained for (exit layers, kind, seed layer,
    backbone fingerprint and shape), so an edited or mismatched exits.json is caught at load time: the exits'
    state dict is the same for any layer list of the same length, and nothing else would notice.
    """
    from freevlm.outputs import write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = exit_metadata(lm, exits, backbone_name)
    _save_module(folder / EXITS_WEIGHTS, exits, meta)
    if discriminators is not None:
        _save_module(folder / DISCRIMINATORS_WEIGHTS, discriminators, meta)
    write_json(folder / EXITS_CONFIG, meta)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _read_config(folder: Path) -> dict:
    config_file = folder / EXITS_CONFIG
    if not folder.is_dir():
        raise FreeVLMError(f"exit checkpoint folder not found: {folder}")
    if not config_file.is_file():
        raise FreeVLMError(f"not an exit checkpoint (no {EXITS_CONFIG}): {folder}")
    try:
        meta = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FreeVLMError(f"corrupt {config_file}: {_one_line(err)}") from None
    if not isinstance(meta, dict):
        raise FreeVLMError(f"corrupt {config_file}: expected a JSON object, found {type(meta).__name__}")
    for key in RECORDED:
        if key not in meta:
            raise FreeVLMError(f"corrupt {config_file}: missing '{key}'")
    layers = meta["exit_layers"]
    if not isinstance(layers, list) or not layers or not all(type(x) is int for x in layers):
        raise FreeVLMError(f"corrupt {config_file}: 'exit_layers' must be a non-empty list of integers, got "
                           f"{json.dumps(layers)}")
    if meta["kind"] not in EXIT_KINDS:
        raise FreeVLMError(f"corrupt {config_file}: unknown exit kind {meta['kind']!r}; expected one of "
                           f"{', '.join(EXIT_KINDS)}")
    if meta["seed_layer"] not in SEED_LAYER_CHOICES:
        raise FreeVLMError(f"corrupt {config_file}: unknown seed_layer {meta['seed_layer']!r}; expected one of "
                           f"{', '.join(SEED_LAYER_CHOICES)}")
    return meta


def _read_weights_record(weights: Path) -> dict | None:
    """The record in the weights file's header (None: saved before exits carried one); checks the file is whole."""
    from safetensors import SafetensorError, safe_open

    if not weights.is_file():
        raise FreeVLMError(f"exit checkpoint {weights.parent} is incomplete: {weights.name} (the weights) is missing")
    try:
        # safe_open checks the header and that the tensors it lists cover the file exactly: a 0-byte or truncated
        # file fails here, before any tensor is read.
        with safe_open(str(weights), "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise FreeVLMError(f"corrupt or truncated exit weights {weights}: {_one_line(err)}") from None
    if METADATA_KEY not in header:
        return None
    try:
        record = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise FreeVLMError(f"corrupt exit weights {weights}: unreadable '{METADATA_KEY}' record in the header")
    return record


def _check_backbone(folder: Path, meta: dict, lm: LanguageModel) -> None:
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


def _load_weights(folder: Path, lm: LanguageModel, meta: dict) -> ExitStack:
    from safetensors import SafetensorError

    exits = build_exits(lm, ExitSpec(meta["kind"], list(meta["exit_layers"]), meta["seed_layer"]))
    weights = folder / EXITS_WEIGHTS
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise FreeVLMError(f"corrupt or truncated exit weights {weights}: {_one_line(err)}") from None
    try:
        missing, unexpected = exits.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that do not fit (e.g. a tensor of another size)
        raise FreeVLMError(f"exit weights {weights} do not fit their config: {_one_line(err)[:300]}") from None
    if missing or unexpected:
        raise FreeVLMError(f"exit weights in {folder} do not match their config: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    device = next(iter(lm.layers.parameters())).device
    return exits.to(device).eval()


def check_exit_checkpoint(folder) -> dict:
    """What an exit checkpoint was trained for, after checking its files agree (no backbone needed, no tensor read):
    the cheap part of `load_exits`, which commands run before any work."""
    folder = Path(folder)
    config = _read_config(folder)
    weights = folder / EXITS_WEIGHTS
    record = _read_weights_record(weights)
    if record is None:
        raise FreeVLMError(
            f"exit weights {weights} do not record which layers they were trained for (saved by an older freevlm); "
            "retrain them, or re-save them with freevlm.exits.resave_exits(folder, backbone.lm) if exits.json is "
            "known to be right"
        )
    for key in RECORDED:
        if config.get(key) != record.get(key):
            raise FreeVLMError(
                f"{folder / EXITS_CONFIG} does not match the weights beside it: {key} is "
                f"{json.dumps(config.get(key))} there but {json.dumps(record.get(key))} in {EXITS_WEIGHTS} "
                "(edited, or copied from another run)"
            )
    return record


def load_exits(folder, lm: LanguageModel, expected_layers: list[int] | None = None) -> ExitStack:
    """Exits saved by `save_exits`, checked end to end; any problem is one `FreeVLMError` line.

    Refused: a missing, corrupt or truncated exits.json or exits.safetensors; a weights file without its training
    record (saved by freevlm before version 2: retrain, or `resave_exits` if exits.json is known to be right); an
    exits.json that disagrees with that record (exit layers, kind, seed layer, backbone); exits of another backbone
    or layer set (`expected_layers`).
    """
    folder = Path(folder)
    record = check_exit_checkpoint(folder)
    _check_backbone(folder, record, lm)
    if expected_layers is not None and list(expected_layers) != record["exit_layers"]:
        raise FreeVLMError(f"exits in {folder} sit at layers {record['exit_layers']}, not at {list(expected_layers)}")
    try:
        validate_exit_layers(record["exit_layers"], lm.num_layers)
    except FreeVLMError as err:
        raise FreeVLMError(f"exits in {folder}: {err}") from None
    return _load_weights(folder, lm, record)


def resave_exits(folder, lm: LanguageModel) -> ExitStack:
    """Upgrade an exit checkpoint saved without the weights-file record: trust its exits.json (the caller vouches
    for it), check it against `lm`, and save it again in the current format. Returns the loaded exits."""
    folder = Path(folder)
    config = _read_config(folder)
    _read_weights_record(folder / EXITS_WEIGHTS)  # whole and readable
    _check_backbone(folder, config, lm)
    exits = _load_weights(folder, lm, config)
    save_exits(folder, lm, exits, str(config.get("backbone", "")))
    return exits
