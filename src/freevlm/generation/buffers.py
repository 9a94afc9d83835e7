"""The device state one generate call decodes in (`Buffers`): its KV caches, position offsets, tables and static
steps, created on first use and handed back, reset, to later calls when a decode session keeps them (`session.py`).

Kept apart from the session so that the engine, which asks its buffers for all of this, does not import the session
(which builds engines).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from freevlm.generation.cache import KVCache


class Buffers:
    """The device state one generate call decodes in: a session's entry (kept and reset across calls), or a call's own
    (without a session). The engine asks it for its cache, position offsets, tables and static steps, which it
    creates on first use and hands back (reset where needed) on later calls."""

    def __init__(self, max_len: int):
        self.max_len = max_len  # cache columns (>= what the call needs)
        self.kept = False  # a session's entry (else one call's: nothing is kept for a later call)
        self.caches: dict[int, KVCache] = {}  # by rows: the prompt rows', and the expanded rows' (beams / samples)
        self.bases: dict[int, torch.Tensor] = {}  # by rows: (rows, 1) position offset of each row
        self.tables: Any = None
        self.has_tables = False
        self.static_step = None  # graphs.StaticStep
        self.static_rounds = None  # graphs.StaticSpeculative
        self.rounds_key: tuple | None = None
        self.pins: tuple = ()  # objects the session's key names by identity (kept alive with the entry)

    def cache(self, rows: int, allocate: Callable[[], KVCache]) -> KVCache:
        """The cache of `rows` rows, in the state of a fresh allocation."""
        cache = self.caches.get(rows)
        if cache is None:
            cache = self.caches[rows] = allocate()
        else:
            cache.reset()
        return cache

    def expand(self, cache: KVCache, index: torch.Tensor) -> KVCache:
        """The cache whose row i is `cache`'s row index[i] (a prompt expanded to beams or samples), written into this
        entry's cache of that many rows when it has one (its addresses are the ones captured graphs read)."""
        rows = int(index.shape[0])
        out = self.caches[rows] = cache.gather(index, into=self.caches.get(rows))
        if not self.kept:  # one call's buffers: the prompt rows' cache is not needed again
            self.caches.pop(cache.batch, None)
        return out

    def base(self, value: torch.Tensor) -> torch.Tensor:
        """The (rows, 1) position offsets `value`, in this entry's tensor for that many rows."""
        rows = int(value.shape[0])
        held = self.bases.get(rows)
        if held is None:
            held = self.bases[rows] = value.clone()
        else:
            held.copy_(value)
        return held

    def table(self, make: Callable[[], Any]) -> Any:
        """The kernel's tables for `max_len` columns (RoPE, T5's relative bias): built once; they depend on the
        columns and the weights, both fixed by the key."""
        if not self.has_tables:
            self.tables, self.has_tables = make(), True
        return self.tables

    def step(self, engine):
        """The static decode step for `engine`'s cache (its graphs, once captured, serve every later call)."""
        from freevlm.generation.graphs import StaticStep

        step = self.static_step
        if step is None or step.keys is not engine.cache.keys:  # built over another cache (rows): not its graphs
            step = self.static_step = StaticStep(engine)
        step.engine = engine
        return step

    def rounds(self, engine, layer: int, length: int, threshold: float | None, subset, eos_ids: list[int],
               capture: bool):
        """The static speculative rounds for `engine` (the threshold, subset and EOS ids are baked into the graphs;
        `capture`: as CUDA graphs)."""
        from freevlm.generation.graphs import StaticSpeculative

        key = (layer, length, threshold, id(subset), tuple(eos_ids), capture)
        rounds = self.static_rounds
        if rounds is None or self.rounds_key != key or rounds.keys is not engine.cache.keys:
            eos = torch.tensor(eos_ids, dtype=torch.long, device=engine.cache.keys.device)
            self.static_rounds = StaticSpeculative(engine, layer, length, threshold, subset, eos, capture)
            self.rounds_key = key
        self.static_rounds.engine = engine
        return self.static_rounds

    def release(self) -> None:
        """The call is over: its engine is no longer referenced from here (the step log goes to the result)."""
        for step in (self.static_step, self.static_rounds):
            if step is not None:
                step.engine = None
