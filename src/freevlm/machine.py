"""The machine a measurement runs on, as recorded beside every timing (a leaf: imports nothing from freevlm)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def system_info() -> dict:
    """The machine a measurement ran on: CPU model and vector capability (AVX-512 and AVX2 kernels round
    differently, so training on them diverges), core count, torch threads, GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__}
