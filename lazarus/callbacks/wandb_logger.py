"""Weights & Biases logging (works offline with WANDB_MODE=offline)."""

from __future__ import annotations

import uuid

from lazarus.callbacks.base import Callback
from lazarus.callbacks.logging_utils import config_dict, scalar_items


class WandbLogger(Callback):
    """Logs the same metrics as :class:`TensorBoardLogger` (``train/...``, ``eval/...``) with
    the optimizer step as W&B's step, and the trainer config as the run config.

    The run id is saved in checkpoints, so a resumed run continues the same W&B run
    (``resume="allow"``) and only logs steps after the checkpoint. Rank 0 only.
    Extra keyword arguments go to ``wandb.init`` (``entity``, ``name``, ``dir``, ``mode`` ...).
    """

    order = 70

    def __init__(self, project: str = "lazarus", **init_kwargs):
        self.project = project
        self.init_kwargs = init_kwargs
        self.run = None
        self.run_id: str | None = init_kwargs.pop("id", None)

    def on_fit_start(self, state) -> None:
        if not state.is_main_process:
            return
        import wandb

        if self.run_id is None:
            # not wandb.util.generate_id (gone in recent wandb), nor `random` (seeded by the Loop)
            self.run_id = uuid.uuid4().hex[:12]
        self.run = wandb.init(project=self.project, id=self.run_id, resume="allow",
                              config=config_dict(state.config), **self.init_kwargs)
        self.run.define_metric("train/*", step_metric="trainer/step")
        self.run.define_metric("eval/*", step_metric="trainer/step")

    def _log(self, prefix: str, metrics: dict, step: int) -> None:
        if self.run is None:
            return
        data = {f"{prefix}/{k}": v for k, v in scalar_items(metrics)}
        data["trainer/step"] = step
        self.run.log(data)

    def on_log(self, state) -> None:
        self._log("train", state.logged, state.step)

    def on_eval_end(self, state) -> None:
        self._log("eval", state.eval_metrics, state.step)

    def on_fit_end(self, state) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def on_exception(self, state) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1)
            self.run = None

    def state_dict(self):
        return {"run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, d):
        self.run_id = d.get("run_id", self.run_id)
