"""Every bad input the CLI can be given ends, before any work, in exactly one `error: ...` line and exit status 2.

The matrix below walks the cases of issue 22 (out-of-range arguments, corrupt or mismatched checkpoints, bad
annotation files, unusable output locations) through `freevlm.cli.main` in-process, with the file descriptors
captured (`capfd`), so that anything transformers or tqdm print to stderr counts too. Two cases also run through a
real `python -m freevlm.cli` subprocess. Each case also checks that no result was written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from freevlm.cli import main
from freevlm.outputs import OutputLock

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Workspace:
    root: Path  # shared, read-only inputs
    data: Path  # synthetic dataset root
    backbone: Path  # a good tiny BLIP-2 OPT folder (6 LM layers)
    other: Path  # the same architecture, other weights
    exits: Path  # good exits of `backbone` at layers [2, 4]
    case: Path  # a fresh folder per case

    def copy(self, src: Path, name: str) -> Path:
        dst = self.case / name
        shutil.copytree(src, dst)
        return dst

    def edit_json(self, src: Path, name: str, file: str, edit) -> Path:
        dst = self.copy(src, name)
        path = dst / file
        obj = json.loads(path.read_text())
        edit(obj)
        path.write_text(json.dumps(obj))
        return dst

    def replace_file(self, src: Path, name: str, file: str, content: bytes | None) -> Path:
        dst = self.copy(src, name)
        if content is None:
            (dst / file).unlink()
        else:
            (dst / file).write_bytes(content)
        return dst


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from freevlm.data.synthetic import SyntheticConfig, write_synthetic
    from freevlm.default import build_default_model
    from freevlm.exits import ExitSpec, build_exits, save_exits
    from tests.test_default import tiny_default

    root = tmp_path_factory.mktemp("cli-errors")
    data = write_synthetic(SyntheticConfig(n_train=4, n_val=4, n_test=4, n_nocaps=2, n_dialogs=2), root / "data")
    paths = {}
    for name, seed in (("backbone", 0), ("other", 1)):
        bb = build_default_model(tiny_default(), seed=seed)
        bb.model.save_pretrained(root / name)
        bb.processor.save_pretrained(root / name)
        paths[name] = root / name
        if name == "backbone":
            save_exits(root / "exits", bb.lm, build_exits(bb.lm, ExitSpec("transformer", [2, 4])), "tiny")
    return root, data.root, paths


@pytest.fixture
def ws(shared, tmp_path):
    root, data, paths = shared
    return Workspace(root, data, paths["backbone"], paths["other"], root / "exits", tmp_path)


def _weights(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def _old_exits(ws: Workspace) -> Path:
    """An exit checkpoint as freevlm saved it before weights files carried their training record."""
    from safetensors.torch import load_file, save_file

    dst = ws.copy(ws.exits, "old-exits")
    save_file(load_file(dst / "exits.safetensors"), str(dst / "exits.safetensors"))
    return dst


def _coco_raw_null(ws: Workspace) -> list[str]:
    ann = ws.case / "dataset_coco.json"
    ann.write_text(json.dumps({"images": [{"split": "test", "filename": "a.png", "cocoid": 1,
                                           "sentences": [{"raw": None}]}]}))
    return ["--dataset", "coco", "--data", str(ann), "--images", str(ws.case)]


def _locked(ws: Workspace, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    ws.lock = OutputLock(out / ".freevlm.lock", out).acquire()  # released by the test
    return out


def evaluate(ws: Workspace, *extra: str, backbone: Path | None = None, exits: Path | None = None,
             out: Path | None = None) -> list[str]:
    args = ["evaluate", "--backbone", str(backbone or ws.backbone), "--out", str(out or ws.case / "r.json")]
    if "--data" not in extra:
        args += ["--data", str(ws.data)]
    if exits is not None:
        args += ["--exits", str(exits)]
    return args + ["--no-progress", "--no-official", *extra]


def train_exits(ws: Workspace, *extra: str) -> list[str]:
    return ["train-exits", "--backbone", str(ws.backbone), "--out", str(ws.case / "run"), "--data", str(ws.data),
            "--no-progress", *extra]


def train_backbone(ws: Workspace, *extra: str) -> list[str]:
    return ["train-backbone", "--backbone", str(ws.backbone), "--out", str(ws.case / "run"), "--data",
            str(ws.data), "--no-progress", *extra]


def sweep(ws: Workspace, *extra: str, out: Path | None = None) -> list[str]:
    return ["sweep", "--backbone", str(ws.backbone), "--exits", str(ws.exits), "--out", str(out or ws.case / "sw"),
            "--data", str(ws.data), "--no-progress", *extra]


def generate(ws: Workspace, *extra: str) -> list[str]:
    image = next((ws.data / "images").rglob("*.png"))
    return ["generate", "--backbone", str(ws.backbone), "--image", str(image), "--no-compare", *extra]


# (case id, argv builder, a piece of the expected error line)
CASES = [
    # --- argument values (checked first, before any file is opened) ---
    ("limit-0", lambda w: evaluate(w, "--limit", "0"), "--limit must be a positive integer, got 0"),
    ("limit-negative", lambda w: evaluate(w, "--limit", "-1"), "--limit must be a positive integer, got -1"),
    ("limit-not-int", lambda w: evaluate(w, "--limit", "2.5"), "argument --limit: invalid int value: '2.5'"),
    ("noise-nan", lambda w: evaluate(w, "--noise", "nan"), "--noise must be a finite number >= 0, got nan"),
    ("noise-negative", lambda w: evaluate(w, "--noise", "-0.5"), "--noise must be a finite number >= 0"),
    ("num-beams-0", lambda w: evaluate(w, "--num-beams", "0"), "--num-beams must be a positive integer, got 0"),
    ("max-new-tokens-0", lambda w: evaluate(w, "--max-new-tokens", "0"), "--max-new-tokens must be a positive"),
    ("batch-size-0", lambda w: evaluate(w, "--batch-size", "0"), "--batch-size must be a positive integer, got 0"),
    ("alpha-above-1", lambda w: evaluate(w, "--threshold", "1.5"), "alpha must lie in (0, 1], got 1.5"),
    ("alpha-nan", lambda w: evaluate(w, "--threshold", "nan"), "--threshold must be a finite number, got nan"),
    ("entropy-nan", lambda w: evaluate(w, "--criterion", "entropy", "--threshold", "nan"),
     "--threshold must be a finite number, got nan"),
    ("entropy-negative", lambda w: evaluate(w, "--criterion", "entropy", "--threshold", "-1"),
     "entropy threshold must be >= 0"),
    ("patience-fraction", lambda w: evaluate(w, "--criterion", "patience", "--threshold", "2.5"),
     "--threshold must be a whole number >= 1, got 2.5"),
    ("patience-0", lambda w: evaluate(w, "--criterion", "patience", "--threshold", "0"),
     "--threshold must be a whole number >= 1, got 0"),
    ("similarity-2", lambda w: generate(w, "--criterion", "similarity", "--threshold", "2"),
     "similarity threshold must lie in [-1, 1]"),
    ("criterion-bogus", lambda w: evaluate(w, "--criterion", "bogus"), "--criterion must be one of confidence"),
    ("kv-policy-bogus", lambda w: evaluate(w, "--kv-policy", "bogus"), "--kv-policy must be one of propagate"),
    ("dataset-bogus", lambda w: evaluate(w, "--dataset", "bogus"), "--dataset must be one of synthetic"),
    ("missing-required", lambda w: ["evaluate", "--backbone", str(w.backbone)],
     "the following arguments are required: --out"),
    ("unknown-command", lambda w: ["evalute"], "argument COMMAND: invalid choice: 'evalute'"),
    ("sweep-threshold-nan", lambda w: sweep(w, "--thresholds", "0.5", "nan"),
     "--thresholds must be a finite number, got nan"),
    ("sweep-limit-0", lambda w: sweep(w, "--limit", "0"), "--limit must be a positive integer, got 0"),
    ("generate-num-beams-0", lambda w: generate(w, "--num-beams", "0"), "--num-beams must be a positive integer"),
    ("generate-max-new-tokens-0", lambda w: generate(w, "--max-new-tokens", "0"), "--max-new-tokens must be"),
    ("generate-missing-image", lambda w: generate(w, "--image", str(w.case / "nope.png")), "image not found"),
    ("epochs-0", lambda w: train_exits(w, "--epochs", "0"), "--epochs must be a positive integer, got 0"),
    ("epochs-0-stage1", lambda w: train_backbone(w, "--epochs", "0"), "--epochs must be a positive integer, got 0"),
    ("lr-nan", lambda w: train_exits(w, "--lr", "nan"), "--lr must be a finite number > 0, got nan"),
    ("lr-0", lambda w: train_backbone(w, "--lr", "0"), "--lr must be a finite number > 0, got 0.0"),
    ("train-fraction-0", lambda w: train_exits(w, "--train-fraction", "0"),
     "--train-fraction must be a finite number in (0, 1), got 0.0"),
    ("train-fraction-1.5", lambda w: train_backbone(w, "--train-fraction", "1.5"),
     "--train-fraction must be a finite number in (0, 1), got 1.5"),
    ("train-batch-size-0", lambda w: train_exits(w, "--batch-size", "0"), "--batch-size must be a positive"),
    ("warmup-negative", lambda w: train_exits(w, "--warmup-steps", "-1"), "--warmup-steps must be an integer >= 0"),
    ("seed-negative", lambda w: train_exits(w, "--seed", "-1"), "--seed must be an integer >= 0, got -1"),
    ("seed-layer-bogus", lambda w: train_exits(w, "--seed-layer", "bogus"),
     "--seed-layer must be one of next, same, last, got 'bogus'"),
    ("kl-direction-bogus-kd", lambda w: train_exits(w, "--variant", "kd", "--kl-direction", "bogus"),
     "--kl-direction must be one of exit_to_final, final_to_exit, got 'bogus'"),
    ("kl-direction-bogus-semi", lambda w: train_exits(w, "--kl-direction", "bogus"),
     "--kl-direction must be one of exit_to_final, final_to_exit, got 'bogus'"),
    ("variant-bogus", lambda w: train_exits(w, "--variant", "bogus"), "--variant must be one of semi, kd"),
    ("adversarial-weight-nan", lambda w: train_exits(w, "--adversarial-weight", "nan"),
     "--adversarial-weight must be a finite number >= 0, got nan"),
    ("adversarial-on-linear", lambda w: train_exits(w, "--variant", "deebert", "--adversarial-weight", "1"),
     "the adversarial term needs exit transformers"),
    ("keep-above-candidates", lambda w: train_exits(w, "--variant", "capfilt", "--candidates", "2", "--keep", "3"),
     "--keep must be an integer in 1..--candidates (2), got 3"),
    ("exit-layer-0", lambda w: train_exits(w, "--exit-layers", "0", "3"),
     "--exit-layers: exit layers must lie in 1..5 for a 6-layer LM, got [0, 3]"),
    ("exit-layer-final", lambda w: train_exits(w, "--exit-layers", "2", "6"), "must lie in 1..5 for a 6-layer LM"),
    ("exit-layers-unordered", lambda w: train_exits(w, "--exit-layers", "4", "2"), "must be strictly increasing"),
    ("parts-bogus", lambda w: train_backbone(w, "--parts", "vision", "decoder"),
     "--parts must be one of vision, qformer, projection, lm, got 'decoder'"),
    ("optimizer-bogus", lambda w: train_backbone(w, "--optimizer", "sgd"), "--optimizer must be one of adam, adamw"),
    ("decay-every-negative", lambda w: train_backbone(w, "--decay-every", "-1"), "--decay-every must be an integer"),
    ("reproduce-seeds-0", lambda w: ["reproduce", "--out", str(w.case / "rep"), "--seeds", "0"],
     "--seeds must be a positive integer, got 0"),
    ("make-data-seed-negative", lambda w: ["make-data", "--out", str(w.case / "d"), "--seed", "-2"],
     "--seed must be an integer >= 0, got -2"),
    # --- exit checkpoints ---
    ("exits-missing-folder", lambda w: evaluate(w, exits=w.case / "nowhere"), "exit checkpoint folder not found"),
    ("exits-truncated", lambda w: evaluate(w, exits=w.replace_file(
        w.exits, "ex", "exits.safetensors", (w.exits / "exits.safetensors").read_bytes()[:-100])),
     "corrupt or truncated exit weights"),
    ("exits-0-byte", lambda w: evaluate(w, exits=w.replace_file(w.exits, "ex", "exits.safetensors", b"")),
     "corrupt or truncated exit weights"),
    ("exits-missing-weights", lambda w: evaluate(w, exits=w.replace_file(w.exits, "ex", "exits.safetensors", None)),
     "exits.safetensors (the weights) is missing"),
    ("exits-json-bad", lambda w: evaluate(w, exits=w.replace_file(w.exits, "ex", "exits.json", b"{not json")),
     "corrupt"),
    ("exits-json-list", lambda w: evaluate(w, exits=w.replace_file(w.exits, "ex", "exits.json", b"[]")),
     "expected a JSON object, found list"),
    ("exits-json-no-layers", lambda w: evaluate(w, exits=w.edit_json(w.exits, "ex", "exits.json",
                                                                     lambda c: c.pop("exit_layers"))),
     "missing 'exit_layers'"),
    ("exits-json-bad-kind", lambda w: evaluate(w, exits=w.edit_json(w.exits, "ex", "exits.json",
                                                                    lambda c: c.update(kind="mlp"))),
     "unknown exit kind 'mlp'"),
    ("exits-json-other-layers", lambda w: evaluate(w, exits=w.edit_json(w.exits, "ex", "exits.json",
                                                                        lambda c: c.update(exit_layers=[1, 3]))),
     "exit_layers is [1, 3] there but [2, 4] in exits.safetensors"),
    ("exits-json-other-seed-layer", lambda w: evaluate(w, exits=w.edit_json(w.exits, "ex", "exits.json",
                                                                            lambda c: c.update(seed_layer="last"))),
     "seed_layer is \"last\" there but \"next\""),
    ("exits-old-format", lambda w: evaluate(w, exits=_old_exits(w)), "do not record which layers they were trained"),
    ("exits-other-backbone", lambda w: evaluate(w, backbone=w.other, exits=w.exits), "whose frozen head/layers differ"),
    # --- backbone folders ---
    ("backbone-missing", lambda w: evaluate(w, backbone=w.case / "nowhere"), "checkpoint folder not found"),
    ("backbone-says-llava", lambda w: evaluate(w, backbone=w.edit_json(w.backbone, "bb", "config.json",
                                                                       lambda c: c.update(model_type="llava"))),
     "says model_type 'llava' but the weights in"),
    ("backbone-hidden-size", lambda w: evaluate(w, backbone=w.edit_json(
        w.backbone, "bb", "config.json", lambda c: c["text_config"].update(hidden_size=64))),
     "the weights do not fit config.json"),
    ("backbone-fewer-layers", lambda w: evaluate(w, backbone=w.edit_json(
        w.backbone, "bb", "config.json", lambda c: c["text_config"].update(num_hidden_layers=3))),
     "config.json gives language_model.model.decoder.layers 3 layers but the weights hold 6"),
    ("backbone-more-layers", lambda w: evaluate(w, backbone=w.edit_json(
        w.backbone, "bb", "config.json", lambda c: c["text_config"].update(num_hidden_layers=8))),
     "gives language_model.model.decoder.layers 8 layers but the weights hold only 6"),
    ("backbone-truncated", lambda w: evaluate(w, backbone=w.replace_file(
        w.backbone, "bb", "model.safetensors", _weights(w.backbone)[: len(_weights(w.backbone)) // 2])),
     "corrupt or truncated weights file"),
    ("backbone-no-weights", lambda w: evaluate(w, backbone=w.replace_file(w.backbone, "bb", "model.safetensors",
                                                                          None)),
     "no model weights in"),
    ("backbone-no-tokenizer", lambda w: evaluate(w, backbone=w.replace_file(
        w.replace_file(w.backbone, "bb0", "tokenizer.json", None), "bb", "tokenizer_config.json", None)),
     "no tokenizer in"),
    ("backbone-no-processor", lambda w: evaluate(w, backbone=w.replace_file(w.backbone, "bb", "processor_config.json",
                                                                            None)),
     "no image processor config in"),
    ("backbone-config-not-json", lambda w: evaluate(w, backbone=w.replace_file(w.backbone, "bb", "config.json",
                                                                               b"{")),
     "unreadable config"),
    # --- data ---
    ("coco-raw-null", lambda w: evaluate(w, *_coco_raw_null(w)), "key 'raw' at images[0].sentences[0] should be a str"),
    ("data-missing", lambda w: evaluate(w, "--data", str(w.case / "nowhere")), "no synthetic dataset at"),
    # --- outputs ---
    ("out-unwritable", lambda w: evaluate(w, out=w.replace_file(w.backbone, "bb", "config.json", b"{}") /
                                          "config.json" / "r.json"), "cannot write to"),
    ("out-read-only", lambda w: evaluate(w, out=_read_only_folder() / "r.json"), "cannot write to"),
    ("out-is-a-folder", lambda w: evaluate(w, out=w.case), "is a folder; give a file name"),
    ("out-holds-results", lambda w: evaluate(w, out=_written(w.case / "r.json")), "already holds results (r.json)"),
    ("sweep-out-holds-results", lambda w: sweep(w, out=_written(w.case / "sw" / "sweep.json").parent),
     "already holds results (sweep.json); pass --overwrite"),
    ("sweep-out-locked", lambda w: sweep(w, out=_locked(w, w.case / "sw")),
     f"is in use by another freevlm run (PID {os.getpid()}"),
    ("reproduce-out-holds-report", lambda w: ["reproduce", "--quick", "--out",
                                              str(_written(w.case / "rep" / "report" / "README.md").parents[1])],
     "already holds results (report)"),
    ("train-out-unrelated", lambda w: train_exits(w, "--out", str(_written(w.case / "busy" / "notes.txt").parent)),
     "exists and is not a freevlm run folder"),
]


def _read_only_folder() -> Path:
    """A folder nobody can create files in, root included (the tests may run as root, which chmod does not stop)."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    return Path("/proc/self")


def _written(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("earlier results\n")
    return path


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        return exc.code


@pytest.mark.parametrize("build, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_work(ws, build, expected, capfd):
    argv = build(ws)
    before = _snapshot(ws.case)
    try:
        code = _run(argv)
    finally:
        lock = getattr(ws, "lock", None)
        if lock is not None:
            lock.release()
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert "Traceback" not in err
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    # no work done: nothing new in the case folder beyond (at most) an empty output folder; earlier results intact
    after = _snapshot(ws.case)
    added = {p for p in after if p not in before}
    assert all((ws.case / p).is_dir() and not any((ws.case / p).iterdir()) for p in added), added
    assert all(after[p] == before[p] for p in before)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")
            if p.name != ".freevlm.lock"}


def test_a_validation_error_leaves_the_run_folder_usable(ws, capfd):
    """A bad exit layer is found after the backbone is loaded, but before the run folder records a configuration,
    so the corrected command is not refused as "a run with a different configuration"."""
    assert _run(train_exits(ws, "--exit-layers", "2", "9", "--epochs", "1", "--batch-size", "8")) == 2
    assert not (ws.case / "run" / "run_config.json").exists()
    capfd.readouterr()
    assert _run(train_exits(ws, "--exit-layers", "2", "4", "--epochs", "1", "--batch-size", "8")) == 0
    assert (ws.case / "run" / "exits" / "exits.safetensors").is_file()


def test_evaluate_refuses_to_overwrite_unless_asked_and_then_replaces_atomically(ws, capfd):
    out = ws.case / "r.json"
    base = evaluate(ws, "--max-new-tokens", "2", "--limit", "2", exits=ws.exits, out=out)
    assert _run(base) == 0
    first = out.read_bytes()
    assert _run(base) == 2
    assert out.read_bytes() == first
    assert len(json.loads(first)["predictions"]) == 2
    assert _run([*base, "--overwrite", "--limit", "1"]) == 0
    assert len(json.loads(out.read_bytes())["predictions"]) == 1
    assert sorted(p.name for p in ws.case.iterdir()) == ["r.json"]  # no temporary or lock file left behind


def test_the_real_command_line_prints_one_line(ws):
    """Through `python -m freevlm.cli`: exits refused after the backbone has loaded (no progress bars or load
    reports from transformers on stderr). One case only: a subprocess pays for importing torch and transformers."""
    build = next(c[1] for c in CASES if c[0] == "exits-other-backbone")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "freevlm.cli", *build(ws)], capture_output=True, text=True, env=env,
                          cwd=ws.case)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
