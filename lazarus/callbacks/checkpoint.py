"""Periodic, best and final checkpoints."""

from __future__ import annotations

import math
import re
import shutil
import warnings
from pathlib import Path

from mlx.utils import tree_flatten

from lazarus import checkpointing as ckpt
from lazarus.callbacks.base import Callback
from lazarus.callbacks.monitor import Monitor, infer_mode, is_eval_metric

_STEP_RE = re.compile(r"^step_(\d+)\.safetensors$")


class Checkpoint(Callback):
    """Writes ``step_N.safetensors`` every ``interval`` steps (and when a stop or a signal
    asks for one), ``best.safetensors`` whenever ``monitor`` improves, and
    ``final.safetensors`` at the end. Each is resumable (see :mod:`lazarus.checkpointing`).

    ``monitor`` defaults to ``eval/loss`` when the run has eval data (judged after every
    evaluation), else the training ``loss`` (its latest interval average, judged at every
    periodic checkpoint); one that the run never logs warns once, listing the metrics that exist
    (``strict=True`` raises). ``keep_last`` keeps only the newest N
    ``step_N`` files. Runs after the callbacks that decide what is best (order 90).

    Safety (see docs/checkpoints.md, "What Lazarus promises"): at fit start rank 0 takes the
    folder's lock (a second run writing there is refused), which also proves the folder is
    writable before step 1; it removes temporary and orphaned files left by a killed write and
    refuses to start when the disk cannot hold one checkpoint. ``keep_last`` only ever deletes
    ``step_N`` files this run wrote (the list is part of the resume state), never another run's.
    Nothing is written after TerminateOnNaN stopped the run.
    """

    order = 90

    def __init__(self, dir: str = "checkpoints", interval: int | None = 500, monitor: str | None = None,
                 mode: str = "auto", keep_last: int | None = None, save_best: bool = True,
                 save_final: bool = True, strict: bool = False):
        if interval is not None and interval < 1:
            raise ValueError("Checkpoint interval must be >= 1 (or None to disable)")
        if keep_last is not None and keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.dir, self.interval, self.keep_last = Path(dir), interval, keep_last
        self.monitor, self.mode, self.strict = monitor, mode, strict
        self.save_best, self.save_final = save_best, save_final
        self._monitor: Monitor | None = None
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.last_saved_step: int | None = None
        self.written: list[str] = []  # step_N files this run wrote, oldest first: the only ones keep_last prunes
        self._lock: ckpt.FolderLock | None = None

    # --- helpers ---
    def _write(self, state, name: str):
        if state.extras.get("terminated_on_nan"):
            return None  # the last good checkpoint stays the newest one
        path = state.save_checkpoint(self.dir / f"{name}.safetensors")  # LoRA adapters go beside it
        if path is not None and name.startswith("step_"):  # what a resume command should name
            state.extras["last_checkpoint"] = str(path)
        return path

    def _prune(self, doomed: list[str]) -> None:
        """Delete step files this run wrote and keep_last no longer keeps; each resolved inside
        the folder (remove_checkpoint also refuses a state-file name that points elsewhere)."""
        root = self.dir.resolve()
        for name in doomed:
            p = (self.dir / name).resolve()
            if p.parent == root and _STEP_RE.match(p.name):
                ckpt.remove_checkpoint(p)

    def _release(self, state=None) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _prepare_folder(self, state) -> None:
        """Lock, clean and size-check the folder before the first step (rank 0)."""
        self._lock = ckpt.FolderLock(self.dir).acquire()
        ckpt.clean_folder(self.dir)
        need = sum(v.nbytes for v in state.trainable_weights().values())
        need += sum(v.nbytes for _, v in tree_flatten(state.optimizer.state))
        free = shutil.disk_usage(self.dir).free
        if free < need:
            raise ckpt.CheckpointError(f"cannot write checkpoints to {self.dir}: no space left on device "
                                       f"({free / 1e6:.1f} MB free, one checkpoint needs about {need / 1e6:.1f} MB)")
        existing = ckpt.list_checkpoints(self.dir)
        if existing and "resumed_from" not in state.extras:
            warnings.warn(f"{self.dir} already holds checkpoints of another run ({', '.join(existing)}): files of "
                          "the same name will be replaced; keep_last deletes only this run's files", stacklevel=3)

    # --- events ---
    def on_fit_start(self, state) -> None:
        if self.monitor is None:
            self.monitor = state.default_monitors[0 if state.has_eval_data else 1]
        if self.mode == "auto":
            self.mode = infer_mode(self.monitor)
        self._monitor = Monitor(self.monitor, "Checkpoint", self.strict)
        state.checkpoint_dir = str(self.dir)
        if state.is_main_process:
            self._prepare_folder(state)

    def on_step_end(self, state) -> None:
        # state.step is incremented after step_end, so the step being finished is step + 1
        if self.interval and (state.step + 1) % self.interval == 0 and state.skip_reason is None:
            state.request_checkpoint()

    def on_checkpoint(self, state) -> None:
        if self.last_saved_step == state.step or state.extras.get("terminated_on_nan"):
            return
        self.last_saved_step = state.step
        name = f"step_{state.step}.safetensors"
        self.written = [n for n in self.written if n != name] + [name]
        doomed = []
        if self.keep_last is not None and len(self.written) > self.keep_last:
            doomed, self.written = self.written[: -self.keep_last], self.written[-self.keep_last:]
        self._write(state, f"step_{state.step}")  # its resume state already lists what stays
        if state.is_main_process:
            self._prune(doomed)
        if not is_eval_metric(self.monitor):
            # A training metric is judged when weights are written anyway: writing `best` at every
            # improving log would cost a full-weights save every few steps early in training.
            self._maybe_best(state)

    def _maybe_best(self, state) -> None:
        if not self.save_best:
            return
        value = self._monitor.value(state)
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
        self._release()

    on_exception = _release

    def state_dict(self):
        return {"best_value": self.best_value, "best_step": self.best_step, "written": list(self.written)}

    def load_state_dict(self, d):
        self.best_value, self.best_step = d["best_value"], d["best_step"]
        self.written = list(d.get("written", []))
