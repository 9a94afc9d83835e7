"""Cheap exit gates: a tiny predictor per exit that decides, from the backbone state h_i alone, whether the exit is
worth checking.

An ungated FREE check costs the exit transformer (one LM layer) plus the full-vocabulary head; on a real LM the head
alone is several layers (SmolLM2: ~8 layers of parameters), so checks that do not fire make early exit slower than
full depth. CALM's learned exit classifier is the peer: a gate reads h_i and predicts "this exit would fire at alpha
and agree with the final layer". Only where it says yes do the exit transformer and head run; where it says no the
token moves on with its h_i kept: the exit's K/V for it are projected from h_i (exact: a layer's K/V depend on its
input only) when that exit next runs, in one batched call with every pair it owes (`Engine.exit_owed`).

A gate is linear or a one-hidden-layer MLP, at most 1% of an LM layer's parameters (`gate_hidden_size`). Gates are
trained on the training split after the exits (`train_gates`), with binary cross-entropy on teacher-forced states;
precision and recall are reported on the development split. `Gated` (criteria.py) wraps any criterion with them, so
FREE and every baseline can use gates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from freevlm.errors import FreeVLMError
from freevlm.outputs import atomic_write, write_json

GATES_WEIGHTS, GATES_CONFIG = "gates.safetensors", "gates.json"


def exits_fingerprint(exits) -> str:
    """A short hash of the exits' weights: gates trained for one set of exits are meaningless for another."""
    import hashlib

    h = hashlib.sha256(json.dumps(list(exits.layers)).encode())
    for t in exits.state_dict().values():
        flat = t.detach().float().flatten()
        h.update(flat[:: max(1, flat.numel() // 512)].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def gate_hidden_size(hidden_size: int, layer_parameters: int, budget: float = 0.01, cap: int = 64) -> int:
    """The widest hidden layer that keeps a gate within `budget` of an LM layer's parameters (0: a linear gate)."""
    width = int(budget * layer_parameters - 1) // (hidden_size + 2)
    return max(0, min(cap, width))


class ExitGates(nn.Module):
    """One gate per exit layer: h_i (…, D) -> the logit of "check this exit"."""

    def __init__(self, layers: list[int], hidden_size: int, inner: int):
        super().__init__()
        self.layers = list(layers)
        self.hidden_size, self.inner = hidden_size, inner

        def gate():
            if inner == 0:
                return nn.Linear(hidden_size, 1)
            return nn.Sequential(nn.Linear(hidden_size, inner), nn.ReLU(), nn.Linear(inner, 1))

        self.gates = nn.ModuleDict({str(layer): gate() for layer in self.layers})

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.gates[str(layer)](hidden.to(next(self.parameters()).dtype)).squeeze(-1)

    def parameters_per_gate(self) -> int:
        return sum(p.numel() for p in self.gates[str(self.layers[0])].parameters())


@dataclass
class GateReport:
    """Per exit, on a split: how often the gate opens, and its precision / recall for "fires and agrees"."""

    positives: dict[int, float]  # share of positions where the exit fires at alpha and agrees with the final layer
    precision: dict[int, float]
    recall: dict[int, float]
    opened: dict[int, float]  # share of positions the gate opens at threshold 0.5

    def to_json(self) -> dict:
        return {name: {str(k): v for k, v in getattr(self, name).items()}
                for name in ("positives", "precision", "recall", "opened")}


@torch.no_grad()
def gate_features(backbone, exits, examples, layers: list[int], batch_size: int = 32):
    """Teacher-forced per position (positions carrying a target): h_i per exit layer, the exit's max softmax and
    whether its argmax equals the final layer's. Returns {layer: (h (P, D), confidence (P,), agrees (P,))}."""
    return exit_statistics(backbone, exits, examples, layers, batch_size=batch_size)[None]


def exit_statistics(backbone, exits, examples, layers: list[int], subsets=(), batch_size: int = 32) -> dict:
    """`gate_features` for the full head (key None) and for each `HeadSubset` in `subsets` (key: its size): with a
    subset, confidence is the softmax renormalised over it and the exit agrees when the subset's argmax token is
    the final layer's (`vocab.py`). One teacher-forced pass serves them all; h_i is shared."""
    from freevlm.train.batches import IGNORE, Collator
    from freevlm.train.forward import teacher_forced

    collate = Collator(backbone, train=True)
    lm = backbone.lm
    device = next(backbone.model.parameters()).device
    keys = [None] + [sub.size for sub in subsets]
    out = {key: {layer: ([], [], []) for layer in layers} for key in keys}
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size]).to(device)
        tf = teacher_forced(backbone, batch, keep=set(layers), logits=True)
        keep = tf.targets != IGNORE
        final = tf.logits.argmax(-1)
        for layer in layers:
            ex = exits.at(layer)
            h = tf.states[layer]
            state = ex.state(lm, h, tf.ctx, None)
            logits = ex.logits(lm, state).float()
            h_kept = h[keep].float().cpu()
            for key, sub in zip(keys, (None, *subsets)):
                lg = logits if sub is None else logits[..., sub.ids.to(logits.device)]
                conf = torch.softmax(lg, -1).amax(-1)
                pred = lg.argmax(-1) if sub is None else sub.token(lg.argmax(-1))
                out[key][layer][0].append(h_kept)
                out[key][layer][1].append(conf[keep].cpu())
                out[key][layer][2].append((pred == final)[keep].cpu())
    return {key: {layer: tuple(torch.cat(parts) for parts in per[layer]) for layer in layers}
            for key, per in out.items()}


def gate_labels(features, alpha: float) -> dict[int, torch.Tensor]:
    """1 where the exit would fire at alpha (confidence above it) and agree with the final layer."""
    return {layer: (conf > alpha) & agrees for layer, (_, conf, agrees) in features.items()}


def train_gates(features, alpha: float, hidden_size: int, inner: int, *, steps: int = 300, lr: float = 1e-2,
                seed: int = 0) -> ExitGates:
    """Fit one gate per exit on teacher-forced training-split features (AdamW on minibatches of 4,096 positions,
    plain BCE: a calibrated probability, so the gate threshold means what it says)."""
    torch.manual_seed(seed)
    layers = sorted(features)
    gates = ExitGates(layers, hidden_size, inner)
    labels = gate_labels(features, alpha)
    for layer in layers:
        h, y = features[layer][0], labels[layer].float()
        pos = float(y.mean())
        net = gates.gates[str(layer)]
        if pos in (0.0, 1.0):  # nothing to learn: a constant gate (closed if it never fires, open if always)
            with torch.no_grad():
                for p in net.parameters():
                    p.zero_()
                last = net if isinstance(net, nn.Linear) else net[-1]
                last.bias.fill_(8.0 if pos == 1.0 else -8.0)
            continue
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        mean, std = h.mean(0), h.std(0) + 1e-6
        hn = (h - mean) / std
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(len(h), (min(4096, len(h)),), generator=g)
            loss = nn.functional.binary_cross_entropy_with_logits(net(hn[idx]).squeeze(-1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        _fold_standardisation(net, mean, std)
    return gates.eval()


def _fold_standardisation(net: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Train on standardised features, then fold (h - mean) / std into the first layer: inference reads h raw."""
    first = net if isinstance(net, nn.Linear) else net[0]
    with torch.no_grad():
        w = first.weight / std
        first.bias -= (w * mean).sum(-1)
        first.weight.copy_(w)


@torch.no_grad()
def evaluate_gates(gates: ExitGates, features, alpha: float, threshold: float = 0.5) -> GateReport:
    labels = gate_labels(features, alpha)
    pos, prec, rec, opened = {}, {}, {}, {}
    for layer in gates.layers:
        y = labels[layer]
        pred = torch.sigmoid(gates(layer, features[layer][0])) > threshold
        tp = float((pred & y).sum())
        pos[layer] = float(y.float().mean())
        prec[layer] = tp / float(pred.sum()) if pred.any() else 1.0
        rec[layer] = tp / float(y.sum()) if y.any() else 1.0
        opened[layer] = float(pred.float().mean())
    return GateReport(pos, prec, rec, opened)


def save_gates(folder: str | Path, gates: ExitGates, meta: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {**meta, "layers": gates.layers, "hidden_size": gates.hidden_size, "inner": gates.inner}
    state = {k: v.detach().contiguous().cpu() for k, v in gates.state_dict().items()}
    atomic_write(folder / GATES_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"gates": json.dumps(record)}))
    write_json(folder / GATES_CONFIG, record)


def _check_record(record, folder: Path) -> None:
    """gates.json's fields: types and ranges, before they size any module."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(record, dict):
        raise FreeVLMError(f"unreadable gates in {folder}: {GATES_CONFIG} is not a JSON object")
    layers = record.get("layers")
    if not isinstance(layers, list) or not layers or not all(is_int(x) and x >= 1 for x in layers):
        raise FreeVLMError(f"gates in {folder}: layers must be a list of layer numbers, got {layers!r}")
    for key in ("hidden_size", "inner"):
        if not is_int(record.get(key)) or record[key] < (1 if key == "hidden_size" else 0):
            raise FreeVLMError(f"gates in {folder}: {key} must be a whole number, got {record.get(key)!r}")


def load_gates(folder: str | Path, hidden_size: int, exit_fingerprint: str | None = None) -> tuple[ExitGates, dict]:
    """Gates saved by `save_gates`, refused (one line) if they do not fit this LM or these exits."""
    from safetensors import SafetensorError

    folder = Path(folder)
    try:
        record = json.loads((folder / GATES_CONFIG).read_text())
    except FileNotFoundError as err:
        raise FreeVLMError(f"not a gate folder (missing {Path(err.filename).name}): {folder}") from None
    except (json.JSONDecodeError, OSError, ValueError) as err:
        raise FreeVLMError(f"unreadable gates in {folder}: {' '.join(str(err).split())}") from None
    _check_record(record, folder)
    try:
        state = load_file(str(folder / GATES_WEIGHTS))
    except FileNotFoundError:
        raise FreeVLMError(f"not a gate folder (missing {GATES_WEIGHTS}): {folder}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise FreeVLMError(f"corrupt or truncated gate weights {folder / GATES_WEIGHTS}: "
                           f"{' '.join(str(err).split())}") from None
    if record.get("hidden_size") != hidden_size:
        raise FreeVLMError(f"gates in {folder} read hidden states of size {record.get('hidden_size')}, this LM's "
                           f"are {hidden_size}")
    if exit_fingerprint is not None and record.get("exits_fingerprint") not in (None, exit_fingerprint):
        raise FreeVLMError(f"gates in {folder} were trained for other exits than the ones loaded")
    gates = ExitGates(record["layers"], record["hidden_size"], record["inner"])
    missing, unexpected = gates.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FreeVLMError(f"gate weights in {folder} do not match gates.json")
    return gates.eval(), record
