"""The one object every callback reads (and acts through)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlx.utils import tree_flatten


@dataclass
class State:
    """Training state shared by the Loop and its callbacks.

    Counters are plain Python ints so reading them never syncs the device.
    ``metrics`` holds the floats of the optimizer step that just ended (valid at
    ``step_end``); ``logged`` holds the interval averages passed to ``on_log``.
    Callbacks never mutate the loop directly; they call the ``request_*`` methods
    and the loop carries the request out at the next safe point.
    """

    model: Any = None
    optimizer: Any = None
    trainer: Any = None
    config: Any = None
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_step: int = 0  # micro-batches consumed (grad accumulation counts each)
    batch_in_epoch: int = 0  # position inside the current epoch's batch order
    tokens_seen: int = 0
    max_steps: int | None = None
    num_epochs: int | None = None
    steps_per_epoch: int | None = None  # batches (or prompt batches for RL) per epoch
    planned_steps: int | None = None  # optimizer steps the run will take if nothing stops it
    metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    logged: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    lr: float = 0.0
    weights_finite: bool | None = None  # after the step that just ended (None: not checked, see TerminateOnNaN)
    grads: Any = None  # only at before_optimizer_step
    batch: Any = None  # the batch of the current step (rollout batch for RL; first shard with cpu_streams > 1)
    rank: int = 0
    world_size: int = 1
    has_eval_data: bool = False  # the run has an eval set (evaluations will happen)
    checkpoint_dir: str | None = None  # where the Checkpoint callback writes (reported in the result)
    #: what a monitor left unset watches: (when the run evaluates, when it does not); see TrainerHooks.default_monitor
    default_monitors: tuple[str, str] = ("eval/loss", "loss")
    # Requests (carried out by the Loop)
    stop_reason: str | None = None
    eval_requested: bool = False
    checkpoint_requested: bool = False
    skip_reason: str | None = None
    #: what the run trains (parameter counts, dtypes, LoRA, data size): printed and logged at fit start
    run_info: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # free space for callbacks/trainers
    # Set by the Loop: writes weights + resume state (see save_checkpoint). Not the Loop itself:
    # callbacks act through State's methods, never on the Loop.
    checkpoint_writer: Callable[[Any], Path | None] | None = field(default=None, repr=False)

    # ---- requests -------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """Stop after the current step. Sticky: the first reason wins."""
        if self.stop_reason is None:
            self.stop_reason = reason

    @property
    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def request_eval(self) -> None:
        self.eval_requested = True

    def request_checkpoint(self) -> None:
        self.checkpoint_requested = True

    def skip_step(self, reason: str) -> None:
        """Discard the current optimizer step (weights and optimizer state roll back)."""
        self.skip_reason = reason

    def save_checkpoint(self, path) -> Path | None:
        """Write the trainable weights and everything needed to resume to ``path`` now (atomically;
        every rank must call it, rank 0 writes; files that belong beside a checkpoint, such as
        mlx-lm's LoRA adapters, go to the same folder). Returns the path written (None off rank 0)."""
        if self.checkpoint_writer is None:
            raise RuntimeError("save_checkpoint is available once Loop.fit has started")
        return self.checkpoint_writer(path)

    def trainable_weights(self) -> dict[str, Any]:
        """The trainable parameters by dotted name: what a checkpoint's weights file holds."""
        return dict(tree_flatten(self.model.trainable_parameters()))

    # ---- helpers ----------------------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def get_metric(self, name: str) -> float | None:
        """Look a metric up by name: ``eval/loss`` or ``eval_loss`` read eval metrics,
        anything else reads the last logged averages, then the last step's values."""
        for prefix in ("eval/", "eval_"):
            if name.startswith(prefix):
                return self.eval_metrics.get(name[len(prefix):])
        if name in self.logged:
            return self.logged[name]
        return self.metrics.get(name)
