"""Run by tests/train/test_training.py under torchrun: trains FREE exits on the colour task and saves them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from freevlm.train.loop import LoopConfig, OptimConfig, make_accelerator
from freevlm.train.stage2 import ExitTrainConfig, train_exits
from tests.train.conftest import colour_task


def main(out: str, expected_world: int) -> None:
    torch.set_num_threads(1)
    accelerator = make_accelerator(cpu=True)
    assert accelerator.num_processes == expected_world, (accelerator.num_processes, expected_world)
    assert int(os.environ.get("WORLD_SIZE", "1")) == expected_world
    backbone, examples = colour_task(Path(out) / f"images-{accelerator.process_index}")
    cfg = ExitTrainConfig(exit_layers=[2, 4], optim=OptimConfig(lr=1e-3, warmup_steps=1),
                          loop=LoopConfig(epochs=2, batch_size=4, progress=False))
    train_exits(backbone, examples, cfg, Path(out) / "run", accelerator=accelerator)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
