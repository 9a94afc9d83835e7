"""Issue 30, walked through the CLI: every case of the issue ends in one `error:` line (exit 2) before any work, or
runs and gives the right result.

Bad input (one line, exit 2, nothing written): the static cache's limits (prompt + new tokens past the LM's positions,
beams x length past the memory budget), plans (a string threshold, an unknown format version, gates outside the plan
folder, corrupt gates, a plan with explicit flags, a VQA plan on captions, a plan for other exits), `--draft-length 0`,
COCO references with an empty sentence list, a truncated CLIP ranker. Faults: a full disk while `train-exits` saves a
checkpoint. Right results: an empty InstructBLIP prompt, 16-bit greyscale and EXIF-rotated images, a left-padded row
with an empty prompt (batch = one at a time), a rerun of `plan` after a killed one, and kill -9 at random moments of
`plan --overwrite` (the old plan or the new one, each with its own gates).
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freevlm.planning.plan import PLAN_FORMAT, read_plan
from tests.test_cli_errors import ROOT, _run, evaluate, generate, shared, sweep, train_exits, ws  # noqa: F401 (fixtures)
from tests.test_rankers import clip_folder  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def exits_info(shared):  # noqa: F811
    from freevlm.generation.api import EarlyExitVLM
    from freevlm.planning.gates import exits_fingerprint

    root, _, paths = shared
    vlm = EarlyExitVLM.from_pretrained(paths["backbone"], root / "exits")
    return exits_fingerprint(vlm.exits), vlm.backbone.lm.hidden_size


def make_plan_folder(ws, exits_info, name: str = "plan", edit=None) -> Path:  # noqa: F811
    """A plan as `freevlm plan` writes it (gated early exit + a draft setting), optionally edited."""
    from freevlm.planning.gates import ExitGates, save_gates

    fingerprint, hidden = exits_info
    folder = ws.case / name
    root = "gates/run-0"
    torch.manual_seed(0)
    save_gates(folder / root / "alpha-0.5", ExitGates([2, 4], hidden, 0),
               {"alpha": 0.5, "exits_fingerprint": fingerprint})
    plan = {"format": PLAN_FORMAT, "gates_root": root, "task": "caption", "quality_metric": "CIDEr",
            "exits_fingerprint": fingerprint, "exit_layers": [2, 4],
            "early_exit": {"exits": [2], "threshold": 0.5, "gated": True, "gates": f"{root}/alpha-0.5",
                           "gate_threshold": 0.5, "kv_policy": "propagate"},
            "speculative": {"draft_layer": 2, "draft_length": 2, "draft_threshold": None}}
    if edit is not None:
        edit(plan, folder)
    (folder / "plan.json").write_text(json.dumps(plan))
    return folder


def _set(path: str, value):
    def edit(plan, folder):
        *parents, key = path.split(".")
        obj = plan
        for p in parents:
            obj = obj[p]
        obj[key] = value
    return edit


def _truncate_gates(plan, folder):
    weights = folder / plan["early_exit"]["gates"] / "gates.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])


def _coco_empty_sentences(w) -> list[str]:
    image = next((w.data / "images").rglob("*.png"))
    ann = w.case / "dataset_coco.json"
    ann.write_text(json.dumps({"images": [
        {"split": "test", "filename": image.name, "cocoid": 1, "sentences": [{"raw": "a red square"}]},
        {"split": "test", "filename": image.name, "cocoid": 2, "sentences": []}]}))
    return ["--dataset", "coco", "--data", str(ann), "--images", str(image.parent)]


def _truncated_clip(w, folder: Path) -> Path:
    dst = w.copy(folder, "clip")
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return dst


def with_plan(build):
    return lambda w, info: build(w, make_plan_folder(w, info))


LONG_PROMPT = " ".join(["a red square"] * 60)

# (case id, argv builder (workspace, exits info, clip folder), a piece of the expected error line)
CASES = [
    ("prompt-past-positions", lambda w, i, c: generate(w, "--prompt", LONG_PROMPT),
     "exceed the LM's maximum of 128 (max_position_embeddings)"),
    ("beams-64-100k-tokens", lambda w, i, c: generate(w, "--num-beams", "64", "--max-new-tokens", "100000"),
     "+ --max-new-tokens 100000 = 100"),
    ("evaluate-100k-tokens-huge-batch", lambda w, i, c: evaluate(w, "--max-new-tokens", "100000", "--batch-size",
                                                                 "100000", "--limit", "2"),
     "exceed the LM's maximum of 128"),
    ("cache-past-budget", lambda w, i, c: generate(w, "--num-beams", "8", "--max-cache-gb", "0.000001"),
     "the KV cache would need"),
    ("max-cache-gb-0", lambda w, i, c: generate(w, "--max-cache-gb", "0"),
     "--max-cache-gb must be a finite number > 0"),
    ("draft-length-0", lambda w, i, c: generate(w, "--exits", str(w.exits), "--mode", "speculative",
                                                "--draft-length", "0"),
     "--draft-length must be a positive integer, got 0"),
    ("plan-threshold-string", lambda w, i, c: generate(w, "--exits", str(w.exits), "--plan", str(
        make_plan_folder(w, i, edit=_set("early_exit.threshold", "0.5")))),
     "early_exit.threshold must be a number in (0, 1], got '0.5'"),
    ("plan-unknown-format", lambda w, i, c: generate(w, "--exits", str(w.exits), "--plan", str(
        make_plan_folder(w, i, edit=_set("format", "freevlm-plan/2")))),
     "has format 'freevlm-plan/2'; this freevlm reads 'freevlm-plan/1'"),
    ("plan-gates-outside-folder", lambda w, i, c: generate(w, "--exits", str(w.exits), "--plan", str(
        make_plan_folder(w, i, edit=_set("early_exit.gates", "../elsewhere/alpha-0.5")))),
     "early_exit.gates must be a folder inside the plan's folder"),
    ("plan-gates-corrupt", lambda w, i, c: generate(w, "--exits", str(w.exits), "--plan", str(
        make_plan_folder(w, i, edit=_truncate_gates))),
     "corrupt or truncated gate weights"),
    ("plan-and-threshold", lambda w, i, c: generate(w, "--exits", str(w.exits), "--plan", str(
        make_plan_folder(w, i)), "--threshold", "0.9"),
     "--plan sets the early-exit settings (exits, alpha, gates, KV policy; confidence criterion); --threshold would"),
    ("plan-and-kv-policy", lambda w, i, c: evaluate(w, "--plan", str(make_plan_folder(w, i)), "--kv-policy", "copy",
                                                    exits=w.exits),
     "--kv-policy would conflict with it: give either --plan or --kv-policy"),
    ("plan-and-draft-length", lambda w, i, c: generate(w, "--exits", str(w.exits), "--mode", "speculative", "--plan",
                                                       str(make_plan_folder(w, i)), "--draft-length", "3"),
     "--plan sets the speculative draft setting; --draft-length would conflict"),
    ("vqa-plan-on-captions", lambda w, i, c: evaluate(w, "--plan", str(make_plan_folder(
        w, i, edit=_set("task", "vqa"))), exits=w.exits),
     "the plan was made for vqa data"),
    ("plan-for-other-weights", lambda w, i, c: generate(w, "--exits", str(w.exits), "--plan", str(
        make_plan_folder(w, i, edit=_set("exits_fingerprint", "0" * 16)))),
     "exits at the same layers [2, 4] but with other weights (fingerprint 0000000000000000"),
    ("coco-empty-sentences", lambda w, i, c: evaluate(w, *_coco_empty_sentences(w)),
     "image 2 (1 of 2) has no reference captions"),
    ("ranker-truncated-clip", lambda w, i, c: train_exits(w, "--variant", "capfilt", "--ranker",
                                                          str(_truncated_clip(w, c))),
     "corrupt or truncated weights file"),
]


@pytest.mark.parametrize("build, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_issue_30_case_is_one_line(ws, exits_info, clip_folder, build, expected, capfd):  # noqa: F811
    argv = build(ws, exits_info, clip_folder)
    code = _run(argv)
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert "Traceback" not in err
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert not (ws.case / "r.json").exists() and not (ws.case / "run" / "exits").exists()
    if "other weights" in expected:
        assert lines[0].count("[2, 4]") == 1  # the message used to show the same layer list twice


def test_a_plan_runs_without_flags_and_its_gates_are_read(ws, exits_info, capfd):  # noqa: F811
    plan = make_plan_folder(ws, exits_info)
    assert _run(generate(ws, "--exits", str(ws.exits), "--plan", str(plan), "--max-new-tokens", "3")) == 0
    assert _run(generate(ws, "--exits", str(ws.exits), "--plan", str(plan), "--mode", "full",
                         "--max-new-tokens", "3")) == 0  # full depth: the plan does not apply, nothing conflicts
    assert read_plan(plan)["early_exit"]["gates"].startswith(str(plan.resolve()))


def test_a_draft_record_is_validated_like_the_flags_it_stands_for(ws, capfd):  # noqa: F811
    record = ws.case / "speculative.json"
    record.write_text(json.dumps({"best": {"draft_layer": 2, "draft_length": "8", "draft_threshold": None}}))
    code = _run(generate(ws, "--exits", str(ws.exits), "--mode", "speculative", "--draft-record", str(record)))
    lines = capfd.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1
    assert f"draft record {record}: draft-length must be a positive integer, got '8'" in lines[0]


@pytest.mark.parametrize("damage", ["position", "weights"])
def test_a_corrupt_checkpoint_is_one_line_on_resume(ws, damage, capfd):  # noqa: F811
    argv = train_exits(ws, "--exit-layers", "2", "4", "--epochs", "1", "--batch-size", "8")
    assert _run(argv) == 0
    (checkpoint,) = sorted((ws.case / "run" / "checkpoints").glob("step-*"))
    if damage == "position":
        (checkpoint / "position.json").write_text(json.dumps({"epoch": "0", "step_in_epoch": 1, "global_step": 1}))
    else:
        weights = next(checkpoint.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
    capfd.readouterr()
    code = _run([*argv, "--resume"])
    lines = capfd.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: corrupt checkpoint {checkpoint}"), lines


# --- faults ------------------------------------------------------------------------------------------------------


def test_a_full_disk_while_train_exits_saves_is_one_line_and_leaves_no_staging(ws, capfd):  # noqa: F811
    """RLIMIT_FSIZE makes every write past 4 KiB fail (EFBIG, the way a full disk fails): the checkpoint's weights do
    not fit, small files (config, metrics) do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        code = _run(train_exits(ws, "--exit-layers", "2", "4", "--epochs", "1", "--batch-size", "8"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: cannot "), err
    assert "File too large" in lines[0] or "No space" in lines[0], lines[0]
    checkpoints = ws.case / "run" / "checkpoints"
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp")] if checkpoints.is_dir() else True
    assert not (ws.case / "run" / "exits" / "exits.safetensors").exists()


# --- right results -----------------------------------------------------------------------------------------------


def test_sixteen_bit_greyscale_png_is_scaled_not_white(tmp_path, ws, capfd):  # noqa: F811
    from freevlm.data.images import load_image

    grey = (np.arange(48 * 48, dtype=np.uint32).reshape(48, 48) * 28).astype(np.uint16)  # 0 .. 64484
    Image.fromarray(grey).save(tmp_path / "g16.png")
    Image.fromarray(np.round(grey / 257).astype(np.uint8)).save(tmp_path / "g8.png")
    loaded = np.asarray(load_image(tmp_path / "g16.png"))
    assert loaded.shape == (48, 48, 3) and loaded.mean() < 200  # PIL's convert("RGB") gives ~255 everywhere
    assert np.array_equal(loaded, np.asarray(load_image(tmp_path / "g8.png")))
    assert _run(generate(ws, "--image", str(tmp_path / "g16.png"), "--max-new-tokens", "2")) == 0


def test_exif_orientation_is_applied_as_transformers_load_image_does(tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    from freevlm.data.images import load_image

    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :10] = 255  # a white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(arr).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    ours = load_image(tmp_path / "rotated.jpg")
    assert ours.size == (20, 40)  # upright: portrait
    assert np.array_equal(np.asarray(ours), np.asarray(hf_load_image(str(tmp_path / "rotated.jpg"))))


def test_an_empty_instructblip_prompt_through_a_qformer_tokenizer_without_special_tokens():
    import copy

    from tokenizers import processors

    from tests.generation.test_properties import api_vlm

    vlm = copy.deepcopy(api_vlm("instructblip-t5"))
    qtok = copy.deepcopy(vlm.backbone.processor.qformer_tokenizer)
    qtok._tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    assert qtok("")["input_ids"] == []
    vlm.backbone.processor.qformer_tokenizer = qtok
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    alone = vlm.generate([image], [""], mode="full", max_new_tokens=3, tokenizer_decode=False)
    batch = vlm.generate([image, image], ["", "a photo of"], mode="full", max_new_tokens=3, tokenizer_decode=False)
    n = len(alone.trace[0])
    assert batch.sequences[0, :n].tolist() == alone.sequences[0, :n].tolist()


@pytest.mark.parametrize("family", ["blip2-opt", "minigpt4-llama", "instructblip-llama"])
@pytest.mark.parametrize("setting", ["greedy", "early-exit", "beams"])
def test_a_left_padded_row_with_an_empty_prompt_decodes_as_alone(family, setting):
    """BLIP-2 layouts pad between the image and the text: a row with no text (tokenizer without BOS) ends in padding;
    its first token must come from its last real column, as when it is decoded alone."""
    from freevlm.backbones.tiny import IMAGE_ID, PAD_ID, TinySize, build_tiny, num_image_tokens
    from freevlm.exits import ExitSpec, build_exits
    from freevlm.generation.criteria import make_criterion
    from freevlm.generation.decode import generate_from_inputs

    size = TinySize()
    bb = build_tiny(family, size, seed=0)
    torch.manual_seed(0)
    exits = build_exits(bb.lm, ExitSpec("transformer", [1, 3]))
    n = num_image_tokens(family, size)
    ids = torch.tensor([[IMAGE_ID] * n + [PAD_ID] * 3, [IMAGE_ID] * n + [7, 8, 9]])
    mask = torch.tensor([[1] * n + [0] * 3, [1] * (n + 3)])
    pixels = torch.randn(2, 3, size.image_size, size.image_size, generator=torch.Generator().manual_seed(1))
    extra = {}
    if family.startswith("instructblip"):
        extra = dict(qformer_input_ids=torch.randint(5, 60, (2, 4), generator=torch.Generator().manual_seed(2)),
                     qformer_attention_mask=torch.ones(2, 4, dtype=torch.long))
    kw = {"greedy": {}, "early-exit": {"criterion": make_criterion("confidence", 0.05)}, "beams": {"num_beams": 2}}
    kw = kw[setting]
    used = exits if "criterion" in kw else None
    with torch.no_grad():
        batched = generate_from_inputs(bb.lm, used, bb.prepare(pixels, ids, mask, **extra), max_new_tokens=6, **kw)
        alone = generate_from_inputs(bb.lm, used, bb.prepare(pixels[:1], ids[:1, :n], mask[:1, :n],
                                                             **{k: v[:1] for k, v in extra.items()}),
                                     max_new_tokens=6, **kw)
    length = len(alone.trace[0])
    assert len(batched.trace[0]) == length
    assert batched.sequences[0, :length].tolist() == alone.sequences[0, :length].tolist()
    assert batched.exit_layers[0] == alone.exit_layers[0]


# --- plan: a rerun after a kill, and kill -9 at random moments of `plan --overwrite` ------------------------------


def _plan_argv(ws, out: Path, *extra: str) -> list[str]:  # noqa: F811
    return ["plan", "--backbone", str(ws.backbone), "--exits", str(ws.exits), "--data", str(ws.data), "--out",
            str(out), "--thresholds", "0.5", "--candidates", "1", "--draft-lengths", "2", "--verify-split", "none",
            "--no-progress", *extra]


def _check_plan_whole(out: Path) -> dict:
    """plan.json reads, its gates exist and load: a complete plan, never a mixed one."""
    from freevlm.planning.gates import load_gates

    plan = read_plan(out)
    gates = Path(plan["folder"]) / plan["gates_root"] / "alpha-0.5"
    load_gates(gates, 32)
    return plan


def test_plan_rerun_after_a_kill_and_kill_9_during_overwrite_leave_a_whole_plan(ws, capfd):  # noqa: F811
    out = ws.case / "plan"
    # a run killed before its plan.json: gates of no plan are left; the rerun is not refused and removes them
    (out / "gates" / "run-killed" / "alpha-0.5").mkdir(parents=True)
    assert _run(_plan_argv(ws, out)) == 0, capfd.readouterr().err
    first = _check_plan_whole(out)
    assert [p.name for p in (out / "gates").iterdir()] == [Path(first["gates_root"]).name]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    rng = random.Random(30)
    argv = [sys.executable, "-m", "freevlm.cli", *_plan_argv(ws, out, "--overwrite")]
    for _ in range(3):
        before = set((out / "gates").iterdir())
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 60
        while proc.poll() is None and set((out / "gates").iterdir()) == before and time.monotonic() < deadline:
            time.sleep(0.02)  # the kill lands while the run works in `out` (its gates have started)
        time.sleep(rng.uniform(0.0, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        plan = _check_plan_whole(out)  # the old plan or the new one, each whole
        assert plan["gates_root"] in {first["gates_root"], *("gates/" + p.name for p in (out / "gates").iterdir())}
    # and a finished overwrite replaces the plan and leaves only its own gates
    assert _run(_plan_argv(ws, out, "--overwrite")) == 0
    last = _check_plan_whole(out)
    assert last["gates_root"] != first["gates_root"]
    assert [p.name for p in (out / "gates").iterdir()] == [Path(last["gates_root"]).name]


def test_kill_9_during_sweep_overwrite_leaves_a_whole_pair(ws, capfd):  # noqa: F811
    """sweep.json and sweep.png are replaced as one unit: after kill -9 at random points of `sweep --overwrite`
    (and the next claim of the folder, which rolls a half-done commit forward), the pair on disk is one run's whole
    output: the thresholds in sweep.json match the plot beside it, and no staging folder is left."""
    import hashlib

    from freevlm.outputs import claim_output

    out = ws.case / "sw"
    runs = {"a": ("--thresholds", "0.5", "0.9"), "b": ("--thresholds", "0.7")}

    def pair() -> tuple[tuple[str, ...], str]:
        keys = tuple(sorted(json.loads((out / "sweep.json").read_text())))
        return keys, hashlib.sha256((out / "sweep.png").read_bytes()).hexdigest()

    whole = set()
    for name in ("a", "b", "a"):  # "a" twice: one setting's plot is the same every time
        assert _run(sweep(ws, *runs[name], "--overwrite", out=out)) == 0, capfd.readouterr().err
        whole.add(pair())
    assert len(whole) == 2
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    rng = random.Random(31)
    for i in range(4):
        argv = [sys.executable, "-m", "freevlm.cli", *sweep(ws, *runs["ab"[i % 2]], "--overwrite", out=out)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(1.0, 6.0))  # start-up, decoding, or the commit itself
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with claim_output(out, results=("sweep.json",), overwrite=True):  # what the next run does first
            pass
        assert pair() in whole
        assert not [p.name for p in out.iterdir() if p.name.startswith(".staging")]
