"""One live progress bar (tqdm): step/total, loss, lr, tokens/s and ETA."""

from __future__ import annotations

import sys

from lazarus.callbacks.base import Callback


class ProgressBar(Callback):
    """Quiet when stderr is not a terminal (CI, pipes) unless ``force=True``; rank 0 only."""

    order = 100

    def __init__(self, force: bool = False, file=None):
        self.force = force
        self.file = file
        self.bar = None

    def on_fit_start(self, state) -> None:
        if not state.is_main_process:
            return
        file = self.file or sys.stderr
        if not self.force and not (hasattr(file, "isatty") and file.isatty()):
            return
        from tqdm.auto import tqdm

        total = state.planned_steps
        self.bar = tqdm(total=total, initial=state.step, desc="train", unit="step", file=file,
                        dynamic_ncols=True, leave=True)

    def on_step_end(self, state) -> None:
        if self.bar is not None and state.skip_reason is None:
            self.bar.update(1)

    def on_log(self, state) -> None:
        if self.bar is None:
            return
        logged = state.logged
        post = {"loss": f"{logged.get('loss', float('nan')):.4f}", "lr": f"{logged.get('lr', 0):.2e}",
                "tok/s": f"{logged.get('tokens_per_second', 0):.0f}"}
        for extra in ("reward", "rewards/margins"):
            if extra in logged:
                post[extra.split("/")[-1]] = f"{logged[extra]:.3f}"
        self.bar.set_postfix(post, refresh=True)

    def on_eval_end(self, state) -> None:
        if self.bar is not None and "loss" in state.eval_metrics:
            self.bar.write(f"step {state.step}: eval loss {state.eval_metrics['loss']:.4f}")

    def _close(self, state) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_fit_end = _close
    on_exception = _close
