"""The cost model's timer: on CUDA each timed region waits for the device's queued work; on a CPU nothing is added."""

from __future__ import annotations

import time

import pytest
import torch

from freevlm.planning import costs


def _record_syncs(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    return calls


def test_cuda_timing_synchronises_around_each_timed_region(monkeypatch):
    calls = _record_syncs(monkeypatch)
    events = []
    costs._timed({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, repeats=3, number=2,
                 device="cuda:0")
    assert len(calls) == 2 * 2 * 3  # before and after each of 2 functions x 3 repeats
    assert all(torch.device(d) == torch.device("cuda:0") for d in calls)


def test_cuda_work_still_queued_at_the_end_is_charged(monkeypatch):
    """A sync that waits (as CUDA's does for queued kernels) is inside the measured time."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: time.sleep(0.02))
    seconds = costs._timed({"launch": lambda: None}, repeats=1, number=1, device=torch.device("cuda"))["launch"]
    assert seconds >= 0.015


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")])
def test_cpu_timing_does_not_synchronise(monkeypatch, device):
    calls = _record_syncs(monkeypatch)
    times = costs._timed({"a": lambda: None}, repeats=2, number=1, device=device)
    assert calls == [] and times["a"] >= 0
