"""TensorBoard event files through tensorboardX."""

from __future__ import annotations

import os
import uuid

from lazarus.callbacks.base import Callback
from lazarus.callbacks.logging_utils import config_dict, run_info_lines, scalar_items


class TensorBoardLogger(Callback):
    """Logs every metric as a scalar: training values under ``train/<name>``, evaluation
    values under ``eval/<name>``, at the optimizer step. Hyper-parameters once at start.
    Flushes on every checkpoint and at the end. Rank 0 only.

    A resumed run writes a new event file in the same ``log_dir`` that purges (hides in
    TensorBoard) what the interrupted run logged after the checkpoint it resumes from."""

    order = 70

    def __init__(self, log_dir: str = "runs", **writer_kwargs):
        self.log_dir = str(log_dir)
        self.writer_kwargs = writer_kwargs
        self.writer = None

    def on_fit_start(self, state) -> None:
        if not state.is_main_process:
            return
        from tensorboardX import SummaryWriter

        kwargs = dict(self.writer_kwargs)
        # tensorboardX names files by the second: a resume (or a second run) within the same second
        # would overwrite the first file, so every writer gets its own suffix.
        kwargs.setdefault("filename_suffix", f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
        if state.step > 0:
            # resumed: hide whatever the interrupted run logged after the checkpoint
            kwargs.setdefault("purge_step", state.step + 1)
        self.writer = SummaryWriter(logdir=self.log_dir, **kwargs)
        cfg = config_dict(state.config)
        if cfg:
            text = "\n".join(f"    {k}: {v}" for k, v in sorted(cfg.items()))
            self.writer.add_text("hparams", text, global_step=state.step)
        if state.run_info:
            self.writer.add_text("run_info", "\n".join(f"    {line}" for line in run_info_lines(state.run_info)),
                                 global_step=state.step)

    def on_log(self, state) -> None:
        if self.writer is None:
            return
        for name, value in scalar_items(state.logged):
            self.writer.add_scalar(f"train/{name}", value, global_step=state.step)

    def on_eval_end(self, state) -> None:
        if self.writer is None:
            return
        for name, value in scalar_items(state.eval_metrics):
            self.writer.add_scalar(f"eval/{name}", value, global_step=state.step)

    def on_checkpoint(self, state) -> None:
        if self.writer is not None:
            self.writer.flush()

    def on_fit_end(self, state) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

    on_exception = on_fit_end
