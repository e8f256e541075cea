"""The optimizer step, compiled: gradients, averaging over shards and ranks, gradient transforms,
the update, and a rollback copy when a callback may discard the step.

Two shapes (see docs/architecture.md, "What is compiled"): one ``fused`` function for a step of
one micro-batch with no callback that must see the gradients; otherwise ``grad`` per micro-batch
(gradients times the batch's ``loss_weight``, summed) and ``apply`` (transforms + update), with
``before_optimizer_step`` emitted between them. The compiled functions take and return
``[model.state, optimizer.state, mx.random.state]`` (the mlx-lm idiom), so nothing is re-traced
while batch shapes repeat.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from lazarus import _blas
from lazarus.protocols import ShardedBatchSource
from lazarus.tree_reductions import reduction_streams, summed_over_leaves


def array_part(batch: dict) -> dict:
    """The entries of a batch that the compiled step consumes."""
    return {k: v for k, v in batch.items() if isinstance(v, mx.array)}


def all_finite(tree) -> mx.array:
    """A scalar bool, lazy: no floating-point leaf of ``tree`` holds NaN or inf.

    A float32 sum (NaN and inf propagate through a sum) costs half of an ``isfinite(...).all()``,
    which matters inside every training step (grouped as in ``global_norm``). A finite sum can only overflow when the weights are
    around 1e38 / size: diverged anyway."""
    total = summed_over_leaves(tree, lambda v: v)
    return mx.array(True) if total is None else mx.isfinite(total)


@contextlib.contextmanager
def eval_mode(model):
    """Run ``model`` in eval mode (no dropout) inside the block, restoring its mode after."""
    was = getattr(model, "training", False)
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def _set_path(tree, path: str, value) -> None:
    """Assign ``value`` at a dotted ``path`` inside nested dicts/lists, in place."""
    keys = path.split(".")
    node = tree
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def set_optimizer_state(optimizer, flat: list[tuple[str, mx.array]]) -> None:
    """Put ``(dotted path, array)`` pairs (``tree_flatten(optimizer.state)``) back into ``optimizer.state``."""
    for k, v in flat:
        _set_path(optimizer.state, k, v)


def resolve_cpu_streams(requested: int | None, train_data, online_rl: bool, world_size: int) -> int:
    """How many parts each training batch is split into, computed concurrently on CPU streams.

    MLX runs each stream's element-wise work on one thread; two streams use two cores for it
    (matmuls then get one BLAS thread per stream). Auto (None): 2 on the CPU backend when this
    rank has at least 2 cores, else 1. Online RL batches come from rollouts: always 1. Costs:
    each new batch shape traces the step for both parts, and both parts' activations are alive
    at once (more peak memory); ``cpu_streams: 1`` turns it off."""
    if requested is not None and requested < 1:
        raise ValueError(f"cpu_streams must be >= 1, got {requested}")
    if online_rl or mx.default_device() != mx.cpu or not isinstance(train_data, ShardedBatchSource):
        return 1
    if requested is not None:
        return requested
    return 2 if (os.cpu_count() or 1) // world_size >= 2 else 1


class OptimizerStep:
    """One optimizer step over a list of micro-batches (each a list of shards).

    ``transforms``: callbacks' ``transform_grads`` (traced into the step). ``split``: a callback
    must see ``state.grads`` (``before_optimizer_step``), so gradients and update run apart.
    ``check_finite``: the step also reports whether the updated weights are finite (a callback
    may skip steps); ``streams``: CPU streams the shards of a micro-batch run on, side by side."""

    def __init__(self, model: nn.Module, optimizer, compute_loss: Callable, *, ranks, transforms: list,
                 streams: list, split: bool, check_finite: bool, compile: bool):
        self.model, self.optimizer, self.ranks = model, optimizer, ranks
        self.transforms, self.streams = transforms, streams
        self.split, self.check_finite = split, check_finite
        self.value_and_grad = nn.value_and_grad(model, compute_loss)
        state = [model.state, optimizer.state, mx.random.state]
        wrap = (lambda fn: mx.compile(fn, inputs=state, outputs=state)) if compile else (lambda fn: fn)
        self._fused, self._grad, self._apply = wrap(self._fused_fn), wrap(self._weighted_sums), wrap(self._apply_fn)
        self._saved = None
        self.applied = False  # the last step's update was applied (not skipped at before_optimizer_step)

    # ---- traced pieces ---------------------------------------------------------------
    def _weighted_sums(self, shards):
        """(loss, metrics, grads) of the shards, each times its shard's ``loss_weight`` and summed,
        the summed weight, and a scalar ``join`` that depends on every gradient (None for one shard).
        Shard j runs on CPU stream j; evaluating ``join`` before the step's other outputs lets MLX
        schedule the streams' work side by side (evaluating the many outputs directly serialises
        them: measured ~1.6x slower than one stream)."""
        parts = []
        for j, batch in enumerate(shards):
            stream = mx.stream(self.streams[j % len(self.streams)]) if self.streams else contextlib.nullcontext()
            with stream:
                (loss, metrics), grads = self.value_and_grad(self.model, batch)
                weight = batch.get("loss_weight", mx.array(1.0))
                parts.append((loss * weight, {k: v * weight for k, v in metrics.items()},
                              tree_map(lambda g: g * weight, grads), weight))
        loss, metrics, grads, weight = parts[0]
        for loss2, metrics2, grads2, weight2 in parts[1:]:
            loss, weight = loss + loss2, weight + weight2
            metrics = {k: v + metrics2[k] for k, v in metrics.items()}
            grads = tree_map(mx.add, grads, grads2)
        join = sum((g.sum() for _, g in tree_flatten(grads)), loss) if len(parts) > 1 else None
        return loss, metrics, grads, weight, join

    def _transform_and_update(self, grads) -> tuple[dict, mx.array]:
        extra = {}
        for transform in self.transforms:
            grads, metrics = transform(grads)
            extra.update(metrics or {})
        self.optimizer.update(self.model, grads)
        finite = all_finite(self.model.trainable_parameters()) if self.check_finite else mx.array(True)
        return extra, finite

    def _fused_fn(self, shards):
        if len(shards) == 1 and self.ranks.group is None:
            (loss, metrics), grads = self.value_and_grad(self.model, shards[0])
            join = None
        else:  # the loss_weight-weighted mean over the shards and ranks
            loss, metrics, grads, weight, join = self._weighted_sums(shards)
            loss, metrics, grads = self._mean_over_ranks(loss, metrics, grads, weight)
        extra, finite = self._transform_and_update(grads)
        return loss, {**metrics, **extra}, finite, join

    def _apply_fn(self, grads):
        return self._transform_and_update(grads)

    def _mean_over_ranks(self, loss, metrics, grads, weight):
        all_sum = self.ranks.all_sum
        total = all_sum(weight)
        return (all_sum(loss) / total, {k: all_sum(v) / total for k, v in metrics.items()},
                tree_map(lambda g: all_sum(g) / total, grads))

    # ---- one step --------------------------------------------------------------------
    def __call__(self, micro: list[list[dict]], state, emit) -> tuple[dict[str, float], bool | None]:
        """Run the step; returns the host values of ``loss`` and the metrics (one ``mx.eval``, one
        sync), and whether the updated weights are finite (None when not checked). ``emit`` is
        called with ``before_optimizer_step`` when ``split``; ``state.skip_reason`` set there
        discards the update."""
        self.applied = True
        arrays = [[array_part(b) for b in shards] for shards in micro]
        busy_streams = len(self.streams) if any(len(shards) > 1 for shards in arrays) else 1
        # reduction_streams: the gradient norm and the finite check, traced here, spread their reads
        # over the CPU streams (see lazarus.tree_reductions)
        with _blas.threads_for_streams(busy_streams, self.ranks.size), reduction_streams(self.streams):
            if self.check_finite:
                self._saved = (tree_flatten(self.model.trainable_parameters()), tree_flatten(self.optimizer.state))
            if len(arrays) == 1 and not self.split:
                loss, metrics, finite, join = self._fused(arrays[0])
                if join is not None:
                    mx.eval(join)
            else:
                loss, metrics, finite = self._accumulated(arrays, state, emit)
            mx.eval(loss, metrics, finite, self.model.state, self.optimizer.state)
        values = {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}}
        return values, (bool(finite.item()) if self.check_finite else None)

    def _accumulated(self, arrays, state, emit):
        grad_sum = loss_sum = weight_sum = None
        metric_sums: dict = {}
        for shards in arrays:
            loss, metrics, grads, weight, join = self._grad(shards)
            if join is not None:
                mx.eval(join)  # this micro-batch's shards side by side (see _weighted_sums)
            grad_sum = grads if grad_sum is None else tree_map(mx.add, grad_sum, grads)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            weight_sum = weight if weight_sum is None else weight_sum + weight
            metric_sums = {k: metric_sums[k] + v if k in metric_sums else v for k, v in metrics.items()}
        loss, metrics, grads = self._mean_over_ranks(loss_sum, metric_sums, grad_sum, weight_sum)
        finite = mx.array(True)
        if self.split:
            state.grads = grads
            emit("before_optimizer_step")
            state.grads = None
        if state.skip_reason is None:
            extra, finite = self._apply(grads)
            metrics.update(extra)
        else:
            self.applied = False
        return loss, metrics, finite

    def roll_back(self) -> None:
        """Put back the weights and optimizer state from before the last step (``check_finite`` only)."""
        if self._saved is None:
            raise RuntimeError("a callback skipped a step at step_end without a rollback copy: set may_skip_steps = "
                               "True on it (the Loop then keeps the weights from before each step)")
        params, opt_state = self._saved
        self.model.update(tree_unflatten(params))
        set_optimizer_state(self.optimizer, opt_state)
