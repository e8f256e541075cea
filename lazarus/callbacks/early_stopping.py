"""Stop training when a metric stops improving or reaches a target."""

from __future__ import annotations

import math

from lazarus.callbacks.base import Callback
from lazarus.callbacks.monitor import Monitor, infer_mode, is_eval_metric

_UNSET = object()


class EarlyStopping(Callback):
    """Stop on a plateau (``patience`` checks without a ``min_delta`` improvement) or when
    ``monitor`` reaches ``stopping_threshold``.

    ``EarlyStopping(target_reward_margin=2.0)`` is DPO's shorthand for monitoring
    ``rewards/margins`` (mode ``max``) with a threshold of 2.0.
    Eval metrics (``eval/...``) are checked after each evaluation; training metrics after
    each log (their interval averages). A ``monitor`` the run never logs warns once, listing
    the metrics that exist (``strict=True`` raises instead).
    """

    order = 50

    def __init__(self, monitor: str | None = None, mode: str = "auto", patience=_UNSET,
                 min_delta: float = 0.0, stopping_threshold: float | None = None,
                 target_reward_margin: float | None = None, strict: bool = False):
        if target_reward_margin is not None:
            monitor = monitor or "rewards/margins"
            stopping_threshold = target_reward_margin
        self._asked_monitor = monitor
        self.monitor = monitor  # None: the trainer's eval metric (eval/loss; eval/reward for online RL), at fit start
        self.mode = infer_mode(monitor) if mode == "auto" and monitor else mode
        if self.mode not in ("min", "max", "auto"):
            raise ValueError(f"EarlyStopping mode must be 'min', 'max' or 'auto', got {mode!r}")
        if patience is _UNSET:
            patience = None if stopping_threshold is not None else 3
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.stopping_threshold = stopping_threshold
        self.target_reward_margin = target_reward_margin
        self.best: float | None = None
        self.wait = 0
        self.strict = strict
        self._monitor: Monitor | None = None

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def _check(self, state) -> None:
        if self._monitor is None or self._monitor.name != self.monitor:
            self._monitor = Monitor(self.monitor, "EarlyStopping", self.strict)
        value = self._monitor.value(state)
        if value is None or not math.isfinite(value):
            return
        if self.stopping_threshold is not None:
            reached = value >= self.stopping_threshold if self.mode == "max" else value <= self.stopping_threshold
            if reached:
                what = "target_reward_margin" if self.target_reward_margin is not None else "stopping_threshold"
                state.request_stop(f"EarlyStopping: {what} reached ({self.monitor}={value:.4g} "
                                   f"{'>=' if self.mode == 'max' else '<='} {self.stopping_threshold})")
                return
        if self._improved(value):
            self.best, self.wait = value, 0
        else:
            self.wait += 1
            if self.patience is not None and self.wait >= self.patience:
                state.request_stop(f"EarlyStopping: {self.monitor} did not improve for {self.wait} "
                                   f"checks (best {self.best:.4g})")

    def on_fit_start(self, state) -> None:
        if self.monitor is None:
            self.monitor = state.default_monitors[0]
        if self.mode == "auto":
            self.mode = infer_mode(self.monitor)

    def on_eval_end(self, state) -> None:
        if is_eval_metric(self.monitor):
            self._check(state)

    def on_log(self, state) -> None:
        if not is_eval_metric(self.monitor):
            self._check(state)

    @property
    def state_key(self) -> str:
        # fixed at construction: a monitor resolved at fit start must not change the key a resume looks up
        return f"EarlyStopping[{self._asked_monitor or 'eval/loss'}]"

    def state_dict(self):
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, d):
        self.best, self.wait = d["best"], d["wait"]
