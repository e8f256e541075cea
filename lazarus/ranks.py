"""Data-parallel ranks: the collectives the Loop needs, and the checks that keep ranks identical."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten


class RanksDivergedError(RuntimeError):
    """Data-parallel ranks hold different trainable weights."""


def weights_digest(arrays: list[mx.array]) -> mx.array:
    """One uint32 per array: the sum of its elements' bit patterns modulo 2**32, on the device.

    Any single changed element changes its entry (the change is a non-zero difference mod 2**32),
    and ranks that drifted apart differ almost everywhere, so comparing these few bytes across
    ranks stands in for comparing the weights themselves."""
    unsigned = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint32}
    return mx.stack([a.reshape(-1).view(unsigned[a.itemsize]).astype(mx.uint32).sum() for a in arrays])


class Ranks:
    """This process's place among the data-parallel ranks (``mx.distributed``). With one process
    (or ``distributed=False``) ``group`` is None and every collective is the identity."""

    def __init__(self, distributed: bool | str = "auto"):
        group = mx.distributed.init() if distributed else None
        self.group = group if group is not None and group.size() > 1 else None
        self.rank = self.group.rank() if self.group else 0
        self.size = self.group.size() if self.group else 1

    def all_sum(self, x):
        return mx.distributed.all_sum(x, group=self.group) if self.group else x

    def sync_weights(self, model) -> None:
        """Make every rank's trainable parameters equal to rank 0's, as DDP does at start.

        MLX seeds its RNG from the clock, so whatever a process initialises at random (LoRA A,
        a value head, the user's own init) differs between ranks; averaged gradients would then
        train different models forever. MLX has no broadcast: rank 0 gives its values and the
        other ranks zeros to one ``all_sum``, evaluated once. Optimizer state starts at zero (or
        from the same checkpoint) and the RNGs are seeded from ``seed``, so they agree already."""
        if self.group is None:
            return
        mine = self.rank == 0
        params = tree_flatten(model.trainable_parameters())
        model.update(tree_unflatten([(k, self.all_sum(v if mine else mx.zeros_like(v))) for k, v in params]))
        mx.eval(model.parameters())

    def rank0_choice(self, value: bool) -> bool:
        """Rank 0's ``value``, on every rank: for decisions a process makes by itself (e.g. a
        per-machine measurement) that must nevertheless be the same on all ranks."""
        if self.group is None:
            return bool(value)
        return bool(self.all_sum(mx.array(float(bool(value)) if self.rank == 0 else 0.0)).item())

    def check_agree(self, weights: dict[str, mx.array], step: int) -> None:
        """Raise :class:`RanksDivergedError` unless every rank holds the same ``weights``
        (compared by :func:`weights_digest`, a few bytes per tensor)."""
        if self.group is None:
            return
        names = sorted(weights)
        every = mx.distributed.all_gather(weights_digest([weights[k] for k in names])[None], group=self.group)
        every = np.array(every)
        for r in range(1, every.shape[0]):
            differ = [names[j] for j in np.nonzero(every[r] != every[0])[0]]
            if differ:
                raise RanksDivergedError(
                    f"data-parallel ranks disagree at step {step}: rank {r}'s trainable weights differ "
                    f"from rank 0's in {len(differ)} of {len(names)} tensors (first: {differ[0]}). Every rank "
                    "applies the same averaged update, so something changed one rank's weights outside the "
                    "training step (e.g. a callback or per-rank code)")
