"""Learning-rate warmup and decay, traced into the compiled optimizer step."""

from __future__ import annotations

import math
import warnings

import mlx.core as mx

from lazarus.callbacks.base import Callback


class LRSchedule(Callback):
    """Linear warmup over ``warmup_steps``, then ``constant``, ``linear`` or ``cosine`` decay.

    The schedule is installed as an MLX optimizer scheduler, so it is evaluated inside the
    compiled step from the optimizer's own step counter (resumes for free, no host sync).
    Update ``k`` (0-based) uses ``base * (k + 1) / warmup_steps`` during warmup; decay runs
    from the end of warmup to ``total_steps`` (default: the run's planned optimizer steps),
    down to ``base * min_lr_ratio``.
    """

    order = 0
    KINDS = ("constant", "linear", "cosine")

    def __init__(self, warmup_steps: int = 0, decay: str = "constant", total_steps: int | None = None,
                 min_lr_ratio: float = 0.0, base_lr: float | None = None):
        if decay not in self.KINDS:
            raise ValueError(f"LRSchedule decay must be one of {self.KINDS}, got {decay!r}")
        if warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.total_steps = total_steps
        self.min_lr_ratio = float(min_lr_ratio)
        self.base_lr = base_lr

    def lr_at(self, step):
        """Learning rate for 0-based update ``step`` (a Python number or an mx.array)."""
        base = self.base_lr
        k = mx.array(step).astype(mx.float32)
        lr = mx.array(base, dtype=mx.float32)
        if self.warmup_steps > 0:
            lr = lr * mx.minimum((k + 1.0) / self.warmup_steps, 1.0)
        if self.decay != "constant" and self.total_steps:
            span = max(1, self.total_steps - self.warmup_steps)
            p = mx.clip((k - self.warmup_steps) / span, 0.0, 1.0)
            if self.decay == "linear":
                factor = 1.0 - p * (1.0 - self.min_lr_ratio)
            else:
                factor = self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + mx.cos(math.pi * p))
            lr = lr * mx.where(k < self.warmup_steps, 1.0, factor)
        return lr

    def on_fit_start(self, state) -> None:
        if self.base_lr is None:
            self.base_lr = float(state.optimizer.learning_rate.item())
        if self.total_steps is None:
            self.total_steps = state.planned_steps
        if state.step == 0 and self.warmup_steps and self.total_steps and self.warmup_steps >= self.total_steps:
            warnings.warn(f"warmup_steps={self.warmup_steps} is not below the {self.total_steps} planned steps: the "
                          f"learning rate never reaches {self.base_lr:g} (lower warmup_steps)", stacklevel=2)
        # MLX optimizers evaluate schedulers from their step counter inside `update`.
        state.optimizer._maybe_schedule("learning_rate", self.lr_at)

    def state_dict(self):
        # base_lr must survive resume: the optimizer then holds a *scheduled* value, not the base
        return {"base_lr": self.base_lr, "total_steps": self.total_steps}

    def load_state_dict(self, d):
        self.base_lr, self.total_steps = d["base_lr"], d["total_steps"]
