"""Weights & Biases logging (works offline with WANDB_MODE=offline)."""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

from lazarus.callbacks.base import Callback
from lazarus.callbacks.logging_utils import config_dict, scalar_items


class WandbSetupError(ValueError):
    """W&B cannot start without asking a question (not installed, or no account configured)."""


def check_wandb_ready(mode: str | None = None) -> None:
    """Raise :class:`WandbSetupError` unless ``wandb.init`` can start without a prompt: an API key
    (``WANDB_API_KEY`` or ``wandb login``'s netrc entry) or an offline/disabled mode. Without this,
    wandb asks "(1) Create a W&B account ..." in a terminal and raises a UsageError elsewhere."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise WandbSetupError("W&B logging needs the wandb package: pip install wandb (or drop the wandb "
                              "setting)") from None
    mode = (mode or os.environ.get("WANDB_MODE") or "").lower()
    if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        if netrc.netrc(os.environ.get("NETRC") or str(Path.home() / ".netrc")).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise WandbSetupError("W&B is not configured: run `wandb login` once, or set WANDB_MODE=offline to log "
                          "locally (upload later with `wandb sync`)")


class WandbLogger(Callback):
    """Logs the same metrics as :class:`TensorBoardLogger` (``train/...``, ``eval/...``) with
    the optimizer step as W&B's step, and the trainer config as the run config.

    The run id is saved in checkpoints, so a resumed run continues the same W&B run
    (``resume="allow"``) and only logs steps after the checkpoint. Rank 0 only.
    Extra keyword arguments go to ``wandb.init`` (``entity``, ``name``, ``dir``, ``mode`` ...).
    Construction checks that W&B can start without an interactive prompt
    (:func:`check_wandb_ready`); ``url`` / ``run_dir`` say where the logs went.
    """

    order = 70

    def __init__(self, project: str = "lazarus", **init_kwargs):
        self.project = project
        self.init_kwargs = init_kwargs
        self.run = None
        self.run_id: str | None = init_kwargs.pop("id", None)
        self.url: str | None = None
        self.run_dir: str | None = None
        check_wandb_ready(init_kwargs.get("mode"))

    def on_fit_start(self, state) -> None:
        if not state.is_main_process:
            return
        import wandb

        if self.run_id is None:
            # not wandb.util.generate_id (gone in recent wandb), nor `random` (seeded by the Loop)
            self.run_id = uuid.uuid4().hex[:12]
        try:
            self.run = wandb.init(project=self.project, id=self.run_id, resume="allow",
                                  config={**config_dict(state.config), **{f"run/{k}": v for k, v in state.run_info.items()}},
                                  **self.init_kwargs)
        except wandb.errors.Error as e:
            raise WandbSetupError(f"W&B could not start: {e}") from None
        self.url = getattr(self.run, "url", None)
        self.run_dir = getattr(self.run, "dir", None)
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
