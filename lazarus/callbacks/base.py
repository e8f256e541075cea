"""The callback protocol: one no-op method per event, plus optional state."""

from __future__ import annotations

import enum
from typing import Any


class Event(str, enum.Enum):
    """Every event the Loop emits, in the order they first occur in a run. A callback handles
    ``Event.X`` in its method ``on_x``; ``Event("step_ned")`` (a typo) raises ``ValueError``."""

    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    ROLLOUT_START = "rollout_start"
    ROLLOUT_END = "rollout_end"
    STEP_START = "step_start"
    BEFORE_OPTIMIZER_STEP = "before_optimizer_step"
    STEP_END = "step_end"
    EVAL_START = "eval_start"
    EVAL_END = "eval_end"
    LOG = "log"
    CHECKPOINT = "checkpoint"
    EPOCH_END = "epoch_end"
    FIT_END = "fit_end"
    EXCEPTION = "exception"

    @property
    def handler(self) -> str:
        """The callback method that handles this event."""
        return f"on_{self.value}"


#: The event names, in order (``Event`` members are also plain strings).
EVENTS = tuple(e.value for e in Event)


class Callback:
    """Base class. Override any ``on_<event>(state)``; defaults do nothing.

    ``order``: callbacks run in ascending order (ties keep the order given). Defaults:
    schedules and gradient transforms 0-20, decision makers (early stopping, NaN guard) 50,
    loggers 70, checkpointing 90 (after whatever decides what is "best"), progress bar 100.

    A callback that changes gradients *inside the compiled step* implements
    ``transform_grads(grads) -> (grads, metrics)`` with pure MLX ops; it costs no host sync.
    A callback that overrides ``on_before_optimizer_step`` instead gets ``state.grads``
    materialised between a gradient pass and a separate update pass (slower, but any Python).
    """

    order: int = 50
    #: True when this callback may call ``state.skip_step`` at ``step_end``: the Loop then keeps a
    #: rollback copy of the weights and optimizer state, and the compiled step reports whether the
    #: updated weights are finite (``state.weights_finite``).
    may_skip_steps: bool = False

    # --- events (all no-ops) ---
    def on_fit_start(self, state) -> None: ...
    def on_epoch_start(self, state) -> None: ...
    def on_rollout_start(self, state) -> None: ...
    def on_rollout_end(self, state) -> None: ...
    def on_step_start(self, state) -> None: ...
    def on_before_optimizer_step(self, state) -> None: ...
    def on_step_end(self, state) -> None: ...
    def on_eval_start(self, state) -> None: ...
    def on_eval_end(self, state) -> None: ...
    def on_log(self, state) -> None: ...
    def on_checkpoint(self, state) -> None: ...
    def on_epoch_end(self, state) -> None: ...
    def on_fit_end(self, state) -> None: ...
    def on_exception(self, state) -> None: ...

    transform_grads = None  # optional: (grads) -> (grads, dict of mx scalars)

    # --- resumable state (JSON-serialisable dict) ---
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @property
    def state_key(self) -> str:
        """Key under which this callback's state is saved in checkpoints."""
        return type(self).__name__

    def overrides(self, event: Event | str) -> bool:
        name = Event(event).handler
        return getattr(type(self), name) is not getattr(Callback, name)


def sort_callbacks(callbacks) -> list[Callback]:
    return sorted(callbacks, key=lambda cb: cb.order)  # sorted() is stable
