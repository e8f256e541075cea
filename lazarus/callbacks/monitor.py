"""The metric a callback watches: which kind it is, which way is better, and a warning when it
never appears (a typo such as ``monitor="eval/los"`` would otherwise run to the end in silence)."""

from __future__ import annotations

import warnings

_MAX_HINTS = ("acc", "reward", "margin", "score")


def infer_mode(metric: str) -> str:
    """``max`` for accuracies, rewards and margins; ``min`` for everything else (losses)."""
    return "max" if any(h in metric for h in _MAX_HINTS) else "min"


def is_eval_metric(name: str) -> bool:
    """``eval/...`` (or ``eval_...``) names read the last evaluation; others the training logs."""
    return name.startswith("eval/") or name.startswith("eval_")


class Monitor:
    """Reads ``name`` from the state. Once metrics of its kind exist but ``name`` is not among
    them, warns once listing those that do (``strict=True`` raises instead), as Keras's
    ``get_monitor_value`` and Lightning's ``strict`` do."""

    def __init__(self, name: str, owner: str, strict: bool = False):
        self.name, self.owner, self.strict = name, owner, strict
        self._warned = False

    def available(self, state) -> list[str]:
        if is_eval_metric(self.name):
            return sorted(f"eval/{k}" for k in state.eval_metrics)
        return sorted(set(state.logged) | set(state.metrics))

    def value(self, state) -> float | None:
        value = state.get_metric(self.name)
        if value is None and not self._warned:
            existing = self.available(state)
            if existing:
                msg = (f"{self.owner} monitors {self.name!r}, which this run does not log; "
                       f"metrics that exist: {', '.join(existing)}")
                if self.strict:
                    raise ValueError(msg)
                self._warned = True
                warnings.warn(msg, stacklevel=2)
        return value
