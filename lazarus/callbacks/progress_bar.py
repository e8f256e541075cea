"""One live progress bar (tqdm): step/total, loss, lr, tokens/s and ETA; plain lines without a terminal."""

from __future__ import annotations

import sys

from lazarus.callbacks.base import Callback
from lazarus.callbacks.logging_utils import run_info_lines


class ProgressBar(Callback):
    """A tqdm bar when the output is a terminal (or ``force=True``). Otherwise (CI, pipes, nohup)
    one plain line per log (every ``log_interval`` steps), so such logs still show progress:
    ``step 20/100 loss=1.2345 lr=1.00e-05 tok/s=812 eta 0:01:10``. Rank 0 only."""

    order = 100

    def __init__(self, force: bool = False, file=None):
        self.force = force
        self.file = file
        self.bar = None
        self.plain = None  # the file plain lines go to, when there is no bar

    def on_fit_start(self, state) -> None:
        if not state.is_main_process:
            return
        file = self.file or sys.stderr
        for line in run_info_lines(state.run_info):  # what trains: on stdout, as mlx-lm prints it
            print(line, file=self.file or sys.stdout, flush=True)
        if not self.force and not (hasattr(file, "isatty") and file.isatty()):
            self.plain = file
            return
        from tqdm.auto import tqdm

        total = state.planned_steps
        self.bar = tqdm(total=total, initial=state.step, desc="train", unit="step", file=file,
                        dynamic_ncols=True, leave=True)

    def on_step_end(self, state) -> None:
        if self.bar is not None and state.skip_reason is None:
            self.bar.update(1)

    def _line(self, state) -> str:
        logged = state.logged
        total = state.planned_steps
        parts = [f"step {state.step}" + (f"/{total}" if total else ""),
                 f"loss={logged.get('loss', float('nan')):.4f}", f"lr={logged.get('lr', 0):.2e}",
                 f"tok/s={logged.get('tokens_per_second', 0):.0f}"]
        parts += [f"{k.split('/')[-1]}={logged[k]:.3f}" for k in ("reward", "rewards/margins") if k in logged]
        sps = logged.get("steps_per_second") or 0
        if total and sps > 0:
            left = int(max(total - state.step, 0) / sps)
            parts.append(f"eta {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}")
        return " ".join(parts)

    def on_log(self, state) -> None:
        if self.bar is None:
            if self.plain is not None:
                print(self._line(state), file=self.plain, flush=True)
            return
        logged = state.logged
        post = {"loss": f"{logged.get('loss', float('nan')):.4f}", "lr": f"{logged.get('lr', 0):.2e}",
                "tok/s": f"{logged.get('tokens_per_second', 0):.0f}"}
        for extra in ("reward", "rewards/margins"):
            if extra in logged:
                post[extra.split("/")[-1]] = f"{logged[extra]:.3f}"
        self.bar.set_postfix(post, refresh=True)

    def on_eval_end(self, state) -> None:
        if "loss" not in state.eval_metrics:
            return
        line = f"step {state.step}: eval loss {state.eval_metrics['loss']:.4f}"
        if self.bar is not None:
            self.bar.write(line)
        elif self.plain is not None:
            print(line, file=self.plain, flush=True)

    def _close(self, state) -> None:
        self.plain = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_fit_end = _close
    on_exception = _close
