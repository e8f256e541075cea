"""Averages of the step metrics over one logging interval, with the interval's throughput."""

from __future__ import annotations

import time


class IntervalMetrics:
    """Sums each step's host metrics until the Loop logs; then hands back the averages plus
    ``tokens_per_second`` and ``steps_per_second`` over the interval's wall time, and starts over.
    The sums are part of the resume state (a run stopped mid-interval logs the same averages after
    resume); the rates count only what happened since the clock (re)started, so steps taken before
    a resume are not divided by time measured after it."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0  # steps in the averages
        self.timed_steps = 0  # steps since the clock started (the rates)
        self.tokens = 0  # tokens since the clock started
        self.started = time.perf_counter()

    def add_tokens(self, n: int) -> None:
        self.tokens += n

    def add_step(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.timed_steps += 1

    def take(self) -> dict[str, float]:
        """The interval's averages and rates; the next interval starts now."""
        now = time.perf_counter()
        elapsed = max(now - self.started, 1e-9)
        out = {k: v / self.steps for k, v in self.sums.items()}
        out["tokens_per_second"] = self.tokens / elapsed
        out["steps_per_second"] = self.timed_steps / elapsed
        self.sums, self.steps, self.timed_steps, self.tokens, self.started = {}, 0, 0, 0, now
        return out

    def restart_clock(self) -> None:
        self.started, self.timed_steps, self.tokens = time.perf_counter(), 0, 0

    def state_dict(self) -> dict:
        return {"sums": self.sums, "count": self.steps}

    def load_state_dict(self, d: dict) -> None:
        self.sums, self.steps = dict(d["sums"]), d["count"]
