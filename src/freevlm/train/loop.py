"""The training loop every recipe shares: accelerate, seeded batches, progress bars, JSON-lines metrics, and
atomic, resumable checkpoints.

A recipe supplies a `step(batch) -> dict[str, float]` that runs its own forward/backward/optimizer updates through the
`Accelerator` (FREE's alternating GAN updates need two optimizers), and the loop owns everything else:

- batches: a global batch of `batch_size` examples per step, split across processes (`split_batches=True`), in an
  order fixed by the seed and the epoch, so 1 process and N processes see the same global batches;
- checkpoints: `accelerator.save_state` (models, optimizers, schedulers, RNG states) plus the data position, written
  into a temporary folder and renamed into place, so a crash never leaves a half-written checkpoint;
- resume: the newest complete checkpoint is loaded and the epoch's first batches are skipped, so a resumed run
  ends with the same weights as an uninterrupted one; metrics.jsonl is first trimmed to the checkpoint's step, so
  the steps run again after a kill are logged once.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from freevlm.errors import FreeVLMError
from freevlm.outputs import LOCK_NAME, WRITE_ERRORS, error_text, fsync_dir, fsync_tree, write_text

# LMs with a tied head (OPT) are saved with the tie removed; accelerate warns about it at every checkpoint.
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


@dataclass
class OptimConfig:
    name: str = "adamw"  # "adam" (§4 names Adam) or "adamw" (Table 10 gives AdamW betas); see docs/training.md
    lr: float = 1e-5  # §4: 1e-5 for the fine-tune; stage 2's lr is "kept the same"
    betas: tuple[float, float] = (0.9, 0.999)  # Table 10
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up (Table 10: 500 for exit training)
    decay_every_epochs: int = 0  # step decay: lr *= decay_factor every this many epochs (§4: 3); 0 = none
    decay_factor: float = 0.5  # §4: "decays by 0.5 every 3 epochs"
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping


@dataclass
class LoopConfig:
    epochs: int = 1
    batch_size: int = 16  # global batch (§4: 16), split across processes
    seed: int = 0
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at epoch ends only
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    max_steps: int = 0  # stop after this many steps in total (0 = run all epochs); for tests and smoke runs
    progress: bool = True  # tqdm bars


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise FreeVLMError("nothing to train: every parameter of the selected parts is frozen")
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(cfg.name)
    if cls is None:
        raise FreeVLMError(f"unknown optimizer {cfg.name!r}; expected adam or adamw")
    # torch's fused Adam(W) kernel, where every parameter allows it: the same update as the per-tensor loop, ~7x
    # faster on a CPU for the 28M-parameter heads of a real LM's linear exits (one pass, not five, over the states)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused)


def make_scheduler(optimizer, cfg: OptimConfig, steps_per_epoch: int):
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.decay_every_epochs:
            warm *= cfg.decay_factor ** (step // (cfg.decay_every_epochs * max(1, steps_per_epoch)))
        return warm

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_accelerator(cpu: bool | None = None) -> Accelerator:
    """One Accelerator for every recipe: global batches split over processes, seed-determined shuffling."""
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    config = DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True)
    return Accelerator(cpu=cpu, dataloader_config=config)


class RunDir:
    """A run's folder: its config, metrics, checkpoints and outputs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / "run_config.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"

    def latest(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        done = sorted(p for p in self.checkpoints.iterdir() if p.name.startswith("step-") and (p / "DONE").exists())
        return done[-1] if done else None


# Settings that change when a run is interrupted and resumed, but not what it computes.
_NOT_RUN_IDENTITY = ("max_steps", "progress")


def _identity(config: dict) -> dict:
    if isinstance(config, dict):
        return {k: _identity(v) for k, v in config.items() if k not in _NOT_RUN_IDENTITY}
    return config


def _entries(folder: Path) -> list[str]:
    """A folder's entries, less freevlm's own lock and probe files (they say nothing about what the folder holds)."""
    return [p.name for p in folder.iterdir() if not p.name.startswith((LOCK_NAME, ".freevlm-probe-"))]


def _holds_nothing_trained(run: RunDir) -> bool:
    """Only run_config.json (and perhaps an empty checkpoint folder or metrics log): the run stopped before its
    first step, e.g. on a validation error, and nothing would be lost by starting it with another configuration."""
    rest = set(_entries(run.path)) - {run.config_file.name}
    if run.checkpoints.is_dir() and not any(run.checkpoints.iterdir()):
        rest.discard(run.checkpoints.name)
    if run.metrics_file.is_file() and run.metrics_file.stat().st_size == 0:
        rest.discard(run.metrics_file.name)
    return not rest


def open_run(path: str | Path, config: dict, resume: bool, accelerator: Accelerator) -> RunDir:
    """The run folder for `config`, created if new. Never mixes two runs: a folder holding another configuration,
    or checkpoints of this one without `resume`, or unrelated files, is refused with a one-line error. A folder
    holding only the config of a run that never took a step is reused (nothing in it can be lost)."""
    run = RunDir(path)
    if accelerator.is_main_process:
        wanted = _identity(json.loads(json.dumps(config)))
        fresh = not run.path.exists() or not _entries(run.path)
        if run.config_file.exists():
            try:
                held = _identity(json.loads(run.config_file.read_text()))
            except json.JSONDecodeError:
                held = None
            if held != wanted:
                if not _holds_nothing_trained(run):
                    raise FreeVLMError(f"{run.path} holds a run with a different configuration; choose another --out")
                fresh = True
            elif not resume and run.latest() is not None:
                raise FreeVLMError(f"{run.path} already holds checkpoints of this run; pass --resume or another --out")
        elif not fresh:
            raise FreeVLMError(f"{run.path} exists and is not a freevlm run folder; choose another --out")
        if fresh:
            try:
                run.path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise FreeVLMError(f"cannot create run folder {run.path}: {err.strerror or err}") from None
            write_text(run.config_file, json.dumps(config, indent=2, sort_keys=True))
    accelerator.wait_for_everyone()
    return run


def trim_metrics(run: RunDir, stage: str, step: int) -> None:
    """Drop the log rows of `stage` after `step` (and any half-written last line): a resumed run logs those steps
    again, so without this a kill between two checkpoints would leave them in metrics.jsonl twice."""
    if not run.metrics_file.is_file():
        return
    kept, dropped = [], 0
    for line in run.metrics_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and row.get("stage") == stage and row.get("step", 0) > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        write_text(run.metrics_file, "".join(f"{line}\n" for line in kept))


def fit(
    accelerator: Accelerator,
    dataset: list,
    collate: Callable,
    step: Callable[[object], dict[str, float]],
    loop: LoopConfig,
    run: RunDir,
    stage: str,
    schedulers: list | None = None,
    resume: bool = False,
) -> dict[str, float]:
    """Train for `loop.epochs` over `dataset`; returns the mean of each logged value over the last epoch."""
    set_seed(loop.seed)
    loader = DataLoader(dataset, batch_size=loop.batch_size, shuffle=True, collate_fn=collate, drop_last=False,
                        generator=torch.Generator().manual_seed(loop.seed))
    loader = accelerator.prepare(loader)
    steps_per_epoch = len(loader)
    start_epoch, skip = 0, 0
    global_step = 0
    latest = run.latest() if resume else None
    if latest is not None:
        start_epoch, skip, global_step = _read_position(latest)
        try:
            accelerator.load_state(str(latest))
        except (*WRITE_ERRORS, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as err:
            raise FreeVLMError(f"corrupt checkpoint {latest}: {error_text(err)[:300]}; delete it to resume from the "
                               "one before") from None
        if skip >= steps_per_epoch:
            start_epoch, skip = start_epoch + 1, 0
    if accelerator.is_main_process:
        trim_metrics(run, stage, global_step)
    means: dict[str, float] = {}
    for epoch in range(start_epoch, loop.epochs):
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        sums: dict[str, float] = {}
        count = 0
        bar = tqdm(batches, total=steps_per_epoch - skip, desc=f"{stage} epoch {epoch + 1}/{loop.epochs}",
                   disable=not (loop.progress and accelerator.is_main_process), leave=False)
        for in_epoch, batch in enumerate(bar, start=skip + 1):
            logs = step(batch)
            for sch in schedulers or []:
                sch.step()
            global_step += 1
            count += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()})
            if accelerator.is_main_process:
                row = {"stage": stage, "epoch": epoch, "step": global_step, "time": time.time(), **logs}
                if schedulers:
                    row["lr"] = schedulers[0].get_last_lr()[0]
                with run.metrics_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            at_end = in_epoch == steps_per_epoch
            if (loop.checkpoint_every and global_step % loop.checkpoint_every == 0) or at_end:
                save_checkpoint(accelerator, run, epoch, in_epoch, global_step, loop.keep_checkpoints)
            if loop.max_steps and global_step >= loop.max_steps:
                return {k: v / max(count, 1) for k, v in sums.items()}
        skip = 0
        means = {k: v / max(count, 1) for k, v in sums.items()}
    return means


def _read_position(checkpoint: Path) -> tuple[int, int, int]:
    """(epoch, step in epoch, global step) of a checkpoint, each checked to be a whole number >= 0."""
    path = checkpoint / "position.json"
    try:
        position = json.loads(path.read_text())
        values = tuple(position[k] for k in ("epoch", "step_in_epoch", "global_step"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise FreeVLMError(f"corrupt checkpoint {checkpoint}: unreadable position.json ({error_text(err)})") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise FreeVLMError(f"corrupt checkpoint {checkpoint}: position.json holds {position!r}")
    return values


def save_checkpoint(accelerator, run: RunDir, epoch: int, in_epoch: int, global_step: int, keep: int) -> Path:
    final = run.checkpoints / f"step-{global_step:08d}"
    tmp = run.checkpoints / f".tmp-step-{global_step:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            position = {"epoch": epoch, "step_in_epoch": in_epoch, "global_step": global_step}
            (tmp / "position.json").write_text(json.dumps(position))
            (tmp / "DONE").write_text("")
            fsync_tree(tmp)  # the rename below must not publish files whose bytes are still only in the page cache
    except (*WRITE_ERRORS, RuntimeError) as err:  # a full disk: torch.save raises RuntimeError, safetensors its own
        shutil.rmtree(tmp, ignore_errors=True)  # never left behind half-written (only step-*/DONE is trusted)
        raise FreeVLMError(f"cannot save checkpoint {final}: {error_text(err)}") from None
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(run.checkpoints)
        done = sorted(p for p in run.checkpoints.iterdir() if p.name.startswith("step-"))
        for old in done[:-keep] if keep else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def config_dict(*configs) -> dict:
    """Merge dataclass configs into one JSON-able dict (for run_config.json)."""
    out: dict = {}
    for c in configs:
        out.update(asdict(c) if hasattr(c, "__dataclass_fields__") else dict(c))
    return json.loads(json.dumps(out, default=str))


def global_count(accelerator: Accelerator, local: torch.Tensor) -> torch.Tensor:
    """The number of loss positions summed over processes, divided by the world size.

    Each process divides its loss sum by this, so that DDP's gradient *averaging* gives the gradient of the global
    per-position mean, whatever the split of positions across processes.
    """
    total = accelerator.reduce(local.detach().float().clone(), reduction="sum")
    return (total / accelerator.num_processes).clamp(min=1.0 / accelerator.num_processes)


