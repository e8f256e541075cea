"""The callback protocol: one no-op method per event, plus optional state."""

from __future__ import annotations

from typing import Any

#: Every event the Loop emits, in the order they first occur in a run.
EVENTS = (
    "fit_start", "epoch_start", "rollout_start", "rollout_end", "step_start",
    "before_optimizer_step", "step_end", "eval_start", "eval_end", "log",
    "checkpoint", "epoch_end", "fit_end", "exception",
)


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

    def overrides(self, event: str) -> bool:
        return getattr(type(self), f"on_{event}") is not getattr(Callback, f"on_{event}")


def sort_callbacks(callbacks) -> list[Callback]:
    return sorted(callbacks, key=lambda cb: cb.order)  # sorted() is stable
