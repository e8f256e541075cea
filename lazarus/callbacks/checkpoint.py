"""Periodic, best and final checkpoints."""

from __future__ import annotations

import math
import re
from pathlib import Path

from lazarus import checkpointing as ckpt
from lazarus.callbacks.base import Callback
from lazarus.callbacks.early_stopping import infer_mode, is_eval_metric

_STEP_RE = re.compile(r"^step_(\d+)\.safetensors$")


class Checkpoint(Callback):
    """Writes ``step_N.safetensors`` every ``interval`` steps (and when a stop or a signal
    asks for one), ``best.safetensors`` whenever ``monitor`` improves, and
    ``final.safetensors`` at the end. Each is resumable (see :mod:`lazarus.checkpointing`).

    ``monitor`` defaults to ``eval/loss`` when the run has eval data (judged after every
    evaluation), else the training ``loss`` (its latest interval average, judged at every
    periodic checkpoint). ``keep_last`` keeps only the newest N
    ``step_N`` files. Runs after the callbacks that decide what is best (order 90).
    """

    order = 90

    def __init__(self, dir: str = "checkpoints", interval: int | None = 500, monitor: str | None = None,
                 mode: str = "auto", keep_last: int | None = None, save_best: bool = True,
                 save_final: bool = True):
        if interval is not None and interval < 1:
            raise ValueError("Checkpoint interval must be >= 1 (or None to disable)")
        if keep_last is not None and keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.dir = Path(dir)
        self.interval = interval
        self.monitor = monitor
        self.mode = mode
        self.keep_last = keep_last
        self.save_best = save_best
        self.save_final = save_final
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.last_saved_step: int | None = None

    # --- helpers ---
    def _write(self, state, name: str):
        path = state.loop.save_checkpoint(self.dir / f"{name}.safetensors")
        trainer = state.trainer
        if state.is_main_process and trainer is not None and hasattr(trainer, "save_adapters"):
            trainer.save_adapters(self.dir)
        return path

    def _prune(self) -> None:
        if self.keep_last is None or not self.dir.exists():
            return
        steps = sorted((int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_RE.match(p.name)))
        for _, p in steps[: max(0, len(steps) - self.keep_last)]:
            ckpt.remove_checkpoint(p)

    # --- events ---
    def on_fit_start(self, state) -> None:
        if self.monitor is None:
            self.monitor = "eval/loss" if state.loop.eval_data is not None else "loss"
        if self.mode == "auto":
            self.mode = infer_mode(self.monitor)
        state.loop.checkpoint_dir = str(self.dir)

    def on_step_end(self, state) -> None:
        # state.step is incremented after step_end, so the step being finished is step + 1
        if self.interval and (state.step + 1) % self.interval == 0 and state.skip_reason is None:
            state.request_checkpoint()

    def on_checkpoint(self, state) -> None:
        if self.last_saved_step == state.step:
            return
        self.last_saved_step = state.step
        self._write(state, f"step_{state.step}")
        if state.is_main_process:
            self._prune()
        if not is_eval_metric(self.monitor):
            # A training metric is judged when weights are written anyway: writing `best` at every
            # improving log would cost a full-weights save every few steps early in training.
            self._maybe_best(state)

    def _maybe_best(self, state) -> None:
        if not self.save_best:
            return
        value = state.get_metric(self.monitor)
        if value is None or not math.isfinite(value):
            return
        better = (self.best_value is None or (value < self.best_value if self.mode == "min"
                                              else value > self.best_value))
        if better:
            self.best_value, self.best_step = value, state.step
            self._write(state, "best")

    def on_eval_end(self, state) -> None:
        if is_eval_metric(self.monitor):
            self._maybe_best(state)


    def on_fit_end(self, state) -> None:
        if self.save_final:
            self._write(state, "final")

    def state_dict(self):
        return {"best_value": self.best_value, "best_step": self.best_step}

    def load_state_dict(self, d):
        self.best_value, self.best_step = d["best_value"], d["best_step"]
