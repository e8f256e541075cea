"""Skip optimizer steps that produce NaN/inf; stop after too many in a row."""

from __future__ import annotations

import math

from lazarus.callbacks.base import Callback


class TerminateOnNaN(Callback):
    """A step whose ``loss`` or ``grad_norm`` is not finite, or that leaves a trainable weight
    NaN/inf, is discarded: weights and optimizer state roll back to before it, so the model in
    memory (and every checkpoint) only ever holds finite weights. After ``max_consecutive``
    such steps in a row the run stops, naming the step and the last good checkpoint; nothing
    more is written (``state.extras["terminated_on_nan"]`` is set; the CLI exits with 3).

    The weights are checked inside the compiled step (the Loop does it for any callback with
    ``may_skip_steps``): a diverged update can leave the next loss finite (an embedding row the
    next batch does not use), so the loss alone would let broken weights be saved."""

    order = 40
    may_skip_steps = True  # tells the Loop to keep a rollback copy of the step's inputs and check the weights

    def __init__(self, max_consecutive: int = 3):
        if max_consecutive < 1:
            raise ValueError("max_consecutive must be >= 1")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def on_step_end(self, state) -> None:
        loss, grad_norm = state.metrics.get("loss", 0.0), state.metrics.get("grad_norm", 0.0)
        if not math.isfinite(loss):
            what = f"loss ({loss})"
        elif not math.isfinite(grad_norm):
            what = f"grad_norm ({grad_norm})"
        elif state.weights_finite is False:
            what = "weights after the update"
        else:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total_skipped += 1
        step = state.step + 1
        state.skip_step(f"non-finite {what} at step {step}")
        if self.consecutive >= self.max_consecutive:
            last = state.extras.get("last_checkpoint")
            state.extras["terminated_on_nan"] = True
            state.request_stop(f"TerminateOnNaN: {what.split()[0]} non-finite for {self.consecutive} consecutive "
                               f"steps (last at step {step}); weights rolled back to step {state.step}; "
                               f"last good checkpoint: {last or 'none written'}")

    def state_dict(self):
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, d):
        self.consecutive = d["consecutive"]
        self.total_skipped = d["total_skipped"]
