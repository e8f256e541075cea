"""Skip optimizer steps whose loss is not finite; stop after too many in a row."""

from __future__ import annotations

import math

from lazarus.callbacks.base import Callback


class TerminateOnNaN(Callback):
    """A non-finite ``loss`` (or ``grad_norm``) discards that step: weights and optimizer
    state roll back to before it. After ``max_consecutive`` such steps in a row the run
    stops with a reason saying so."""

    order = 40
    may_skip_steps = True  # tells the Loop to keep a rollback copy of the step's inputs

    def __init__(self, max_consecutive: int = 3):
        if max_consecutive < 1:
            raise ValueError("max_consecutive must be >= 1")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def on_step_end(self, state) -> None:
        values = [state.metrics.get("loss", 0.0), state.metrics.get("grad_norm", 0.0)]
        if all(math.isfinite(v) for v in values):
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total_skipped += 1
        state.skip_step(f"non-finite loss {values[0]} at step {state.step + 1}")
        if self.consecutive >= self.max_consecutive:
            state.request_stop(f"TerminateOnNaN: loss was non-finite for {self.consecutive} "
                               f"consecutive steps (last at step {state.step + 1})")

    def state_dict(self):
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, d):
        self.consecutive = d["consecutive"]
        self.total_skipped = d["total_skipped"]
