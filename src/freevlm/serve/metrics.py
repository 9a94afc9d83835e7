"""The server's counters, rendered as Prometheus text (GET /metrics): requests, tokens, tokens/s, queue length,
batch size, the fraction of tokens leaving at each layer, speculative draft acceptance.

Written by the scheduler thread and read by the HTTP layer, so every access holds one lock. Hand-written: the text
format is a dozen lines, and a per-server registry keeps two servers in one process (the tests) apart.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

RATE_WINDOW_S = 10.0  # tokens/s is measured over this trailing window


class Metrics:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers  # N: a token decoded at full depth left at layer N
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()  # (mode, outcome) -> requests
        self.rejected = 0  # requests refused before decoding (4xx)
        self.prompt_tokens = 0
        self.tokens = 0  # generated tokens
        self.exits: Counter[int] = Counter()  # exit layer -> generated tokens that left there
        self.drafted = 0  # speculative: draft tokens proposed
        self.accepted = 0  # speculative: drafts the full model agreed with
        self.queue_length = 0  # requests waiting for a row
        self.batch_size = 0  # rows decoding now
        self.max_batch_size = 0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) inside the rate window

    def count_tokens(self, exit_layers: list[int]) -> None:
        now = time.monotonic()
        with self.lock:
            self.tokens += len(exit_layers)
            self.exits.update(exit_layers)
            self.recent.append((now, len(exit_layers)))
            while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
                self.recent.popleft()

    def count_request(self, mode: str, outcome: str, prompt_tokens: int = 0) -> None:
        with self.lock:
            self.requests[(mode, outcome)] += 1
            self.prompt_tokens += prompt_tokens

    def count_rejected(self) -> None:
        with self.lock:
            self.rejected += 1

    def count_drafts(self, drafted: int, accepted: int) -> None:
        with self.lock:
            self.drafted += drafted
            self.accepted += accepted

    def set_load(self, queue_length: int, batch_size: int) -> None:
        with self.lock:
            self.queue_length, self.batch_size = queue_length, batch_size

    def tokens_per_second(self) -> float:
        with self.lock:
            now = time.monotonic()
            recent = [n for t, n in self.recent if t >= now - RATE_WINDOW_S]
            return sum(recent) / RATE_WINDOW_S

    def render(self) -> str:
        rate = self.tokens_per_second()
        with self.lock:
            lines = []

            def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
                lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

            metric("freevlm_requests_total", "counter", "Requests decoded, by mode and outcome.",
                   [(f'{{mode="{m}",outcome="{o}"}}', n) for (m, o), n in sorted(self.requests.items())])
            metric("freevlm_requests_rejected_total", "counter", "Requests refused before decoding (4xx).",
                   [("", self.rejected)])
            metric("freevlm_prompt_tokens_total", "counter", "Prompt tokens (image tokens included) prefilled.",
                   [("", self.prompt_tokens)])
            metric("freevlm_generated_tokens_total", "counter", "Tokens generated.", [("", self.tokens)])
            metric("freevlm_tokens_per_second", "gauge", f"Tokens generated per second over the last "
                   f"{RATE_WINDOW_S:g} s.", [("", rate)])
            metric("freevlm_queue_length", "gauge", "Requests waiting for a row.", [("", self.queue_length)])
            metric("freevlm_batch_size", "gauge", "Requests decoding now (occupied rows).", [("", self.batch_size)])
            metric("freevlm_max_batch_size", "gauge", "Rows decoded side by side at most.",
                   [("", self.max_batch_size)])
            total = sum(self.exits.values())
            metric("freevlm_exit_tokens_total", "counter", f"Generated tokens by the layer they left at "
                   f"({self.num_layers} = the final layer).",
                   [(f'{{layer="{k}"}}', n) for k, n in sorted(self.exits.items())])
            metric("freevlm_exit_fraction", "gauge", "Fraction of generated tokens leaving at each layer.",
                   [(f'{{layer="{k}"}}', n / total) for k, n in sorted(self.exits.items())])
            metric("freevlm_draft_tokens_total", "counter", "Speculative draft tokens proposed.",
                   [("", self.drafted)])
            metric("freevlm_draft_accepted_total", "counter", "Speculative drafts the full model accepted.",
                   [("", self.accepted)])
            metric("freevlm_draft_acceptance", "gauge", "Accepted / proposed speculative drafts.",
                   [("", self.accepted / self.drafted if self.drafted else 0.0)])
        return "\n".join(lines) + "\n"
