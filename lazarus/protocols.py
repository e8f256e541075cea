"""What the Loop asks of the objects it is given, declared once.

The Loop draws batches from a :class:`BatchSource` and asks the trainer (any :class:`TrainerHooks`)
for what only a paradigm knows. Optional capabilities of a batch source are their own small
protocols, checked with ``isinstance`` (they are ``runtime_checkable``), so a user's own loader
needs only ``__len__`` and ``get_batch``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable


@runtime_checkable
class BatchSource(Protocol):
    """Batches of one epoch, addressable by position (so a resumed run continues mid-epoch).

    A batch is a dict: ``mx.array`` entries go to the compiled step; ``num_tokens`` (int) feeds
    throughput; ``loss_weight`` (scalar array) weights micro-batches and ranks."""

    def __len__(self) -> int: ...
    def get_batch(self, epoch: int, index: int) -> dict: ...


@runtime_checkable
class ShardedBatchSource(Protocol):
    """Can split batch ``index`` into ``shards`` parts (computed concurrently on CPU streams)."""

    def get_batch_shards(self, epoch: int, index: int, shards: int) -> list[dict]: ...


@runtime_checkable
class DistributedBatchSource(Protocol):
    """Takes only this rank's share of every global batch."""

    def set_distributed(self, rank: int, world_size: int) -> None: ...


@runtime_checkable
class ResumableBatchSource(Protocol):
    """Saves and checks what a resumed run needs (the data order, a digest of the data)."""

    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict, source: str) -> None: ...


@runtime_checkable
class PaddingReport(Protocol):
    """Reports the fraction of padding tokens in an epoch's batches (logged as ``padding_fraction``)."""

    def padding_fraction(self, epoch: int) -> float: ...


class Rollout(NamedTuple):
    """What an online-RL rollout hands the Loop: ``batches``, one optimizer step each, and host
    ``metrics`` (reward, completion lengths...) logged with every step these batches feed."""

    batches: list[dict]
    metrics: dict[str, float] = {}


@runtime_checkable
class TrainerHooks(Protocol):
    """What the Loop asks the trainer (``Loop(trainer=...)``). :class:`DefaultHooks` implements
    every hook as a no-op; ``lazarus.training.Trainer`` derives from it."""

    def steps_per_rollout(self) -> int: ...
    def derived_metrics(self, logged: dict[str, float]) -> dict[str, float]: ...
    def resume_state(self) -> tuple[dict, dict]: ...
    def load_resume_state(self, arrays: dict, doc: dict) -> None: ...
    def save_adapters(self, directory: str | os.PathLike) -> Path | None: ...
    def default_monitor(self, evaluated: bool) -> str: ...
    def weights_for_saving(self, weights: dict) -> dict: ...


class DefaultHooks:
    """Trainer hooks that change nothing: the Loop's behaviour without a trainer."""

    def steps_per_rollout(self) -> int:
        """Optimizer steps one rollout feeds (online RL; plans ``planned_steps``)."""
        return 1

    def derived_metrics(self, logged: dict[str, float]) -> dict[str, float]:
        """Extra metrics computed from each logged interval's averages (host side)."""
        return {}

    def resume_state(self) -> tuple[dict[str, Any], dict]:
        """Arrays and a JSON document the trainer needs to resume exactly (beyond the Loop's own)."""
        return {}, {}

    def load_resume_state(self, arrays: dict, doc: dict) -> None:
        """Restore what :meth:`resume_state` saved."""

    def save_adapters(self, directory: str | os.PathLike) -> Path | None:
        """Write files that belong beside every checkpoint (mlx-lm's adapters with LoRA)."""
        return None

    def default_monitor(self, evaluated: bool) -> str:
        """The metric EarlyStopping and Checkpoint watch when not told: the eval one when the run
        evaluates (``evaluated``), else the training one. Online RL says ``eval/reward``/``reward``."""
        return "eval/loss" if evaluated else "loss"

    def weights_for_saving(self, weights: dict) -> dict:
        """The trainable weights as a checkpoint's weights file holds them (a Trainer: in the base
        model's dtype). Where this changes a dtype, the state file keeps the exact training copy."""
        return weights


def missing_hooks(obj) -> list[str]:
    """The :class:`TrainerHooks` methods ``obj`` lacks (for a clear error)."""
    return [name for name in ("steps_per_rollout", "derived_metrics", "resume_state", "load_resume_state",
                              "save_adapters", "default_monitor",
                              "weights_for_saving") if not callable(getattr(obj, name, None))]
