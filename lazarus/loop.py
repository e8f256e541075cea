"""The generic training Loop: draws batches (or rollouts), steps the optimizer, emits events.

The objective is injected as ``compute_loss(model, batch) -> (loss, metrics)`` where ``batch``
holds only the ``mx.array`` entries of the collated batch and ``metrics`` is a dict of scalar
arrays. Everything else (schedules, clipping, checkpoints, early stopping, logging) is a
callback. See ``docs/architecture.md`` for the event order and the state object.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import traceback
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from lazarus import _blas
from lazarus import checkpointing as ckpt
from lazarus.callbacks.base import Callback, sort_callbacks
from lazarus.state import State

LossFn = Callable[[nn.Module, dict], tuple]


@dataclass
class TrainResult:
    history: list[dict]
    stop_reason: str
    checkpoint_dir: str | None
    state: State = field(repr=False)

    @property
    def final_metrics(self) -> dict:
        return self.history[-1] if self.history else {}


def array_part(batch: dict) -> dict:
    """The entries of a batch that the compiled step consumes."""
    return {k: v for k, v in batch.items() if isinstance(v, mx.array)}


_JOIN = "_lazarus_streams_join"  # not a metric: popped by the Loop before anything reads metrics
_FINITE = "_lazarus_weights_finite"  # not a metric either: 1 when every updated trainable weight is finite


def all_finite(tree) -> mx.array:
    """A scalar bool, lazy: no floating-point leaf of ``tree`` holds NaN or inf.

    A float32 sum (NaN and inf propagate through a sum) costs half of an ``isfinite(...).all()``,
    which matters inside every training step (grouped as in ``global_norm``). A finite sum can
    only overflow when the weights are around 1e38 / size: diverged anyway."""
    from lazarus.callbacks.gradient_clipping import summed_over_leaves

    total = summed_over_leaves(tree, lambda v: v)
    return mx.array(True) if total is None else mx.isfinite(total)


def _listed(batch):
    return None if batch is None else [batch]


def set_mlx_rng_key(key: mx.array) -> None:
    """Make ``key`` (a saved ``mx.random.state[0]``) MLX's global PRNG key again.

    The state object is not assignable; ``mx.random.seed(n)`` installs key ``[n >> 32, n & 0xffffffff]``,
    so seeding with ``hi << 32 | lo`` restores ``[hi, lo]`` exactly."""
    hi, lo = (int(v) for v in key.tolist())
    mx.random.seed((hi << 32) | lo)


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Inside the block MLX's global PRNG is seeded with ``seed``; after it, the key it had before
    is back, so code drawing random numbers here neither depends on nor disturbs the caller's
    random stream (MLX seeds that stream from the clock)."""
    saved = mx.random.state[0]
    mx.random.seed(seed)
    try:
        yield
    finally:
        set_mlx_rng_key(saved)


class RanksDivergedError(RuntimeError):
    """Data-parallel ranks hold different trainable weights."""


def weights_digest(arrays: list[mx.array]) -> mx.array:
    """One uint32 per array: the sum of its elements' bit patterns modulo 2**32, on the device.

    Any single changed element changes its entry (the change is a non-zero difference mod 2**32),
    and ranks that drifted apart differ almost everywhere, so comparing these few bytes across
    ranks stands in for comparing the weights themselves."""
    unsigned = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint32}
    return mx.stack([a.reshape(-1).view(unsigned[a.itemsize]).astype(mx.uint32).sum() for a in arrays])


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


class Loop:
    """Runs training. One ``mx.eval`` per optimizer step; everything else is events.

    Args:
        model: the ``nn.Module`` being trained (its trainable parameters are optimised).
        optimizer: an ``mlx.optimizers.Optimizer``.
        compute_loss: the objective, ``(model, batch_arrays) -> (loss, metrics)``.
        train_data: a loader with ``__len__`` (batches per epoch) and ``get_batch(epoch, i)``
            returning a dict (``mx.array`` entries go to the step; ``num_tokens`` (int) feeds
            throughput; ``loss_weight`` (scalar array) weights micro-batches and ranks).
        rollout: optional ``rollout(state, prompt_batch) -> list[batch]``; each returned batch
            is one optimizer step (online RL).
        eval_data: optional loader like ``train_data``; ``eval_loss`` defaults to compute_loss.
        cpu_streams: on the CPU backend, split each training batch into this many shards
            (``train_data.get_batch_shards``) computed concurrently on CPU streams; None = auto
            (2 when this rank has >= 2 cores). See ``_resolve_cpu_streams``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer,
        compute_loss: LossFn,
        train_data=None,
        *,
        rollout: Callable | None = None,
        eval_data=None,
        eval_loss: LossFn | None = None,
        callbacks: Iterable[Callback] = (),
        max_steps: int | None = None,
        num_epochs: int | None = 1,
        grad_accumulation_steps: int = 1,
        log_interval: int = 10,
        eval_interval: int | None = None,
        seed: int = 0,
        trainer: Any = None,
        config: Any = None,
        compile: bool = True,
        distributed: bool | str = "auto",
        handle_signals: bool = True,
        distributed_timeout: float | None = None,
        cpu_streams: int | None = None,
    ):
        if train_data is None:
            raise ValueError("Loop needs train_data (a loader of batches or of prompts for rollouts)")
        if grad_accumulation_steps < 1:
            raise ValueError("grad_accumulation_steps must be >= 1")
        if max_steps is None and not num_epochs:
            raise ValueError("give max_steps or num_epochs")
        self.model = model
        self.optimizer = optimizer
        self.compute_loss = compute_loss
        self.eval_loss = eval_loss or compute_loss
        self.train_data = train_data
        self.eval_data = eval_data
        self.rollout = rollout
        self.callbacks = sort_callbacks(callbacks)
        self.max_steps = max_steps
        self.num_epochs = num_epochs
        self.accum = grad_accumulation_steps
        self.log_interval = max(1, int(log_interval))
        self.eval_interval = eval_interval
        # An eval set without eval_interval is evaluated after every epoch and once at the end (if
        # the run stopped mid-epoch), so `best` and `eval/...` metrics exist without extra settings.
        self._evaluates_per_epoch = eval_data is not None and not eval_interval
        self._last_eval_step: int | None = None
        self.seed = seed
        self.use_compile = compile
        self.handle_signals = handle_signals
        self.group = None
        if distributed:
            group = mx.distributed.init()
            if group.size() > 1:
                self.group = group
        self.world_size = self.group.size() if self.group else 1
        # A peer that dies leaves the others blocked in a collective forever; the watchdog
        # turns that into a clean non-zero exit after `distributed_timeout` seconds of no progress.
        if distributed_timeout is None:
            distributed_timeout = float(os.environ.get("LAZARUS_DIST_TIMEOUT", "600"))
        self.distributed_timeout = distributed_timeout
        self._heartbeat = time.monotonic()
        self.rank = self.group.rank() if self.group else 0
        if hasattr(train_data, "set_distributed"):
            train_data.set_distributed(self.rank, self.world_size)
        if eval_data is not None and hasattr(eval_data, "set_distributed"):
            eval_data.set_distributed(self.rank, self.world_size)
        self.cpu_streams = self._resolve_cpu_streams(cpu_streams)
        #: the CPU streams that batch shards run on (empty with one stream); trainers may reuse them
        self.streams = [mx.new_stream(mx.cpu) for _ in range(self.cpu_streams)] if self.cpu_streams > 1 else []
        self.state = State(model=model, optimizer=optimizer, trainer=trainer, config=config,
                           max_steps=max_steps, num_epochs=num_epochs, rank=self.rank,
                           world_size=self.world_size)
        self.state.loop = self
        self._pending: list[dict] = []
        self._epoch_open = False
        self._sums: dict[str, float] = {}
        self._sum_count = 0
        self._interval_tokens = 0
        self._interval_start = None
        self._signal: str | None = None
        self._steps: dict[str, Callable] = {}
        self._padding: tuple[int | None, float] = (None, 0.0)
        self._ranks_synced = False
        self.checkpoint_dir: str | None = None

    def _resolve_cpu_streams(self, requested: int | None) -> int:
        """How many parts each training batch is split into, computed concurrently on CPU streams.

        MLX runs each stream's element-wise work on one thread; two streams use two cores for
        it (matmuls then get one BLAS thread per stream). Auto (None): 2 on the CPU backend when
        this rank has at least 2 cores, else 1. Online RL batches come from rollouts: always 1.
        Costs: each new batch shape traces the step for both parts, and both parts' activations
        are alive at once (more peak memory); ``cpu_streams: 1`` turns it off."""
        if requested is not None and requested < 1:
            raise ValueError(f"cpu_streams must be >= 1, got {requested}")
        if (self.rollout is not None or mx.default_device() != mx.cpu
                or not hasattr(self.train_data, "get_batch_shards")):
            return 1
        if requested is not None:
            return requested
        return 2 if (os.cpu_count() or 1) // self.world_size >= 2 else 1

    # ------------------------------------------------------------------ data-parallel agreement
    def sync_ranks(self) -> None:
        """Make every rank's trainable parameters equal to rank 0's, as DDP does at start (once).

        MLX seeds its RNG from the clock, so whatever a process initialises at random (LoRA A,
        a value head, the user's own init) differs between ranks; averaged gradients would then
        train different models forever. MLX has no broadcast: rank 0 gives its values and the
        other ranks zeros to one ``all_sum``, evaluated once. Optimizer state starts at zero (or
        from the same checkpoint) and the RNGs are seeded from ``seed``, so they agree already."""
        if self.group is None or self._ranks_synced:
            return
        mine = self.rank == 0
        params = tree_flatten(self.model.trainable_parameters())
        self.model.update(tree_unflatten([(k, self._all_sum(v if mine else mx.zeros_like(v))) for k, v in params]))
        mx.eval(self.model.parameters())
        self._ranks_synced = True

    def rank0_choice(self, value: bool) -> bool:
        """Rank 0's ``value``, on every rank: for decisions a process makes by itself (e.g. a
        per-machine measurement) that must nevertheless be the same on all ranks."""
        if self.group is None:
            return bool(value)
        return bool(self._all_sum(mx.array(float(bool(value)) if self.rank == 0 else 0.0)).item())

    def check_ranks_agree(self) -> None:
        """Raise :class:`RanksDivergedError` unless every rank holds the same trainable weights
        (compared by :func:`weights_digest`, a few bytes per tensor)."""
        if self.group is None:
            return
        weights = self.trainable_weights()
        names = sorted(weights)
        every = mx.distributed.all_gather(weights_digest([weights[k] for k in names])[None], group=self.group)
        every = np.array(every)
        for r in range(1, every.shape[0]):
            differ = [names[j] for j in np.nonzero(every[r] != every[0])[0]]
            if differ:
                raise RanksDivergedError(
                    f"data-parallel ranks disagree at step {self.state.step}: rank {r}'s trainable weights differ "
                    f"from rank 0's in {len(differ)} of {len(names)} tensors (first: {differ[0]}). Every rank "
                    "applies the same averaged update, so something changed one rank's weights outside the "
                    "training step (e.g. a callback or per-rank code)")

    # ------------------------------------------------------------------ events
    def emit(self, event: str) -> None:
        for cb in self.callbacks:
            getattr(cb, f"on_{event}")(self.state)

    # ------------------------------------------------------------------ compiled pieces
    def _compile_state(self):
        return [self.model.state, self.optimizer.state, mx.random.state]

    def _maybe_compile(self, fn):
        if not self.use_compile:
            return fn
        st = self._compile_state()
        return mx.compile(fn, inputs=st, outputs=st)

    def _all_sum(self, x):
        return mx.distributed.all_sum(x, group=self.group) if self.group else x

    def _grad_transforms(self, grads):
        extra = {}
        for cb in self.callbacks:
            if cb.transform_grads is not None:
                grads, m = cb.transform_grads(grads)
                extra.update(m or {})
        return grads, extra

    def _build_steps(self) -> None:
        model, optimizer = self.model, self.optimizer
        value_and_grad = nn.value_and_grad(model, self.compute_loss)
        distributed = self.group is not None
        streams = self.streams
        # A step that leaves a weight NaN/inf must be caught at that step (a later loss may not show it:
        # e.g. embedding rows unused by the next batch), so when a callback can skip steps the compiled
        # step also reports whether the updated weights are finite: one read of them, no extra sync.
        check_finite = any(getattr(cb, "may_skip_steps", False) for cb in self.callbacks)

        def finite_flag():
            return {_FINITE: all_finite(model.trainable_parameters())} if check_finite else {}

        def weighted_sums(shards):
            """Sum over the shards of (loss, metrics, grads) times each shard's loss_weight, and
            the weights; shard j runs on CPU stream j so the shards compute concurrently."""
            parts = []
            for j, batch in enumerate(shards):
                with mx.stream(streams[j % len(streams)]) if streams else contextlib.nullcontext():
                    (loss, metrics), grads = value_and_grad(model, batch)
                    w = batch.get("loss_weight", mx.array(1.0))
                    parts.append((loss * w, {k: v * w for k, v in metrics.items()}, tree_map(lambda g: g * w, grads), w))
            loss, metrics, grads, w = parts[0]
            if len(parts) == 1:
                return loss, metrics, grads, w
            for l2, m2, g2, w2 in parts[1:]:
                loss, w = loss + l2, w + w2
                metrics = {k: v + m2[k] for k, v in metrics.items()}
                grads = tree_map(mx.add, grads, g2)
            # One scalar that depends on every gradient. Evaluating it before the step's other
            # outputs lets MLX schedule the streams' work side by side; evaluating the many
            # outputs directly serialises them (measured: ~1.6x slower than one stream).
            metrics[_JOIN] = sum((g.sum() for _, g in tree_flatten(grads)), loss)
            return loss, metrics, grads, w

        def fused(shards):
            if len(shards) == 1 and not distributed:
                (loss, metrics), grads = value_and_grad(model, shards[0])
            else:  # the loss_weight-weighted mean over the shards and ranks
                loss, metrics, grads, w = weighted_sums(shards)
                join = metrics.pop(_JOIN, None)
                total = self._all_sum(w)
                grads = tree_map(lambda g: self._all_sum(g) / total, grads)
                loss = self._all_sum(loss) / total
                metrics = {k: self._all_sum(v) / total for k, v in metrics.items()}
                if join is not None:
                    metrics[_JOIN] = join
            grads, extra = self._grad_transforms(grads)
            optimizer.update(model, grads)
            return loss, {**metrics, **extra, **finite_flag()}

        def apply(grads):
            grads, extra = self._grad_transforms(grads)
            optimizer.update(model, grads)
            return {**extra, **finite_flag()}

        def evaluate(batch):
            loss, metrics = self.eval_loss(model, batch)
            return loss, metrics

        self._steps = {
            "fused": self._maybe_compile(fused),
            "grad": self._maybe_compile(weighted_sums),
            "apply": self._maybe_compile(apply),
            # the weights change between evaluations: they are inputs, not constants baked in at trace time
            "eval": mx.compile(evaluate, inputs=[self.model.state]) if self.use_compile else evaluate,
        }
        self._split = any(cb.overrides("before_optimizer_step") for cb in self.callbacks)

    # ------------------------------------------------------------------ one optimizer step
    def _optimizer_step(self, micro: list[list[dict]]) -> None:
        """``micro``: the step's micro-batches, each a list of shards (one, or one per CPU stream)."""
        st = self.state
        arrays = [[array_part(b) for b in shards] for shards in micro]
        busy_streams = len(self.streams) if any(len(shards) > 1 for shards in arrays) else 1
        with _blas.threads_for_streams(busy_streams, self.world_size):
            rollback = None
            if any(getattr(cb, "may_skip_steps", False) for cb in self.callbacks):
                rollback = (tree_flatten(self.model.trainable_parameters()), tree_flatten(self.optimizer.state))
            if len(arrays) == 1 and not self._split:
                loss, metrics = self._steps["fused"](arrays[0])
                if _JOIN in metrics:
                    mx.eval(metrics.pop(_JOIN))  # the shards' gradients first (see weighted_sums)
            else:
                acc = loss = wsum = None
                msum: dict = {}
                for a in arrays:
                    l, m, g, w = self._steps["grad"](a)
                    if _JOIN in m:
                        mx.eval(m.pop(_JOIN))  # this micro-batch's shards side by side (see weighted_sums)
                    acc = g if acc is None else tree_map(mx.add, acc, g)
                    loss = l if loss is None else loss + l
                    wsum = w if wsum is None else wsum + w
                    msum = {k: msum[k] + v if k in msum else v for k, v in m.items()}
                if self.group is not None:
                    wsum = self._all_sum(wsum)
                    acc = tree_map(self._all_sum, acc)
                    loss = self._all_sum(loss)
                    msum = {k: self._all_sum(v) for k, v in msum.items()}
                grads = tree_map(lambda g: g / wsum, acc)
                loss = loss / wsum
                metrics = {k: v / wsum for k, v in msum.items()}
                if self._split:
                    st.grads = grads
                    self.emit("before_optimizer_step")
                    st.grads = None
                if st.skip_reason is None:
                    metrics.update(self._steps["apply"](grads))
            mx.eval(loss, metrics, self.model.state, self.optimizer.state)
        finite = metrics.pop(_FINITE, None)
        st.weights_finite = None if finite is None else bool(finite.item())
        values = {"loss": loss.item()}
        values.update({k: v.item() for k, v in metrics.items()})
        st.lr = float(self.optimizer.learning_rate.item()) if "learning_rate" in self.optimizer.state else 0.0
        values["lr"] = st.lr
        st.metrics = values
        self.emit("step_end")
        if st.skip_reason is not None:
            if rollback is not None:
                self._restore_trees(*rollback)
            st.extras.setdefault("skipped_steps", []).append((st.step + 1, st.skip_reason))
            st.skip_reason = None
            return
        st.step += 1
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._sum_count += 1

    def _restore_trees(self, params, opt_state) -> None:
        self.model.update(tree_unflatten(params))
        for k, v in opt_state:
            _set_path(self.optimizer.state, k, v)

    # ------------------------------------------------------------------ logging / eval
    def _log(self) -> None:
        st = self.state
        if self._sum_count == 0:
            return
        now = time.perf_counter()
        elapsed = max(now - (self._interval_start or now), 1e-9)
        logged = {k: v / self._sum_count for k, v in self._sums.items()}
        logged["lr"] = st.lr
        logged["tokens_per_second"] = self._interval_tokens / elapsed
        logged["steps_per_second"] = self._sum_count / elapsed
        logged["peak_memory_gb"] = mx.get_peak_memory() / 1e9
        logged["epoch"] = st.epoch + (st.batch_in_epoch / max(1, st.steps_per_epoch or 1))
        if hasattr(self.train_data, "padding_fraction") and self.rollout is None:
            if self._padding[0] != st.epoch:
                self._padding = (st.epoch, self.train_data.padding_fraction(st.epoch))
            logged["padding_fraction"] = self._padding[1]
        trainer = st.trainer
        if trainer is not None and hasattr(trainer, "derived_metrics"):
            logged.update(trainer.derived_metrics(logged))
        st.logged = logged
        st.history.append({"step": st.step, **logged})
        self._sums, self._sum_count, self._interval_tokens = {}, 0, 0
        self._interval_start = time.perf_counter()
        self.emit("log")

    def evaluate(self) -> dict[str, float]:
        """Weighted mean of the eval objective over the whole eval set (no grads)."""
        st = self.state
        if self.eval_data is None:
            return {}
        self.emit("eval_start")
        if not self._steps:
            self._build_steps()
        totals: dict[str, mx.array] = {}
        wsum = mx.array(0.0)
        for i in range(len(self.eval_data)):
            batch = self.eval_data.get_batch(0, i)
            arrays = array_part(batch)
            loss, metrics = self._steps["eval"](arrays)
            w = arrays.get("loss_weight", mx.array(1.0))
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v * w
            wsum = wsum + w
            mx.eval(totals, wsum)
            self._heartbeat = time.monotonic()
        if self.group is not None:
            totals = {k: self._all_sum(v) for k, v in totals.items()}
            wsum = self._all_sum(wsum)
        mx.eval(totals, wsum)
        st.eval_metrics = {k: (v / wsum).item() for k, v in totals.items()}
        st.history.append({"step": st.step, **{f"eval/{k}": v for k, v in st.eval_metrics.items()}})
        self._last_eval_step = st.step
        self.emit("eval_end")
        return st.eval_metrics

    # ------------------------------------------------------------------ data
    def _draw(self, shards: int = 1) -> dict | list[dict] | None:
        st = self.state
        if st.batch_in_epoch >= len(self.train_data):
            return None
        if shards > 1:
            batch = self.train_data.get_batch_shards(st.epoch, st.batch_in_epoch, shards)
        else:
            batch = self.train_data.get_batch(st.epoch, st.batch_in_epoch)
        st.batch_in_epoch += 1
        return batch

    def _next_micro_batch(self) -> list[dict] | None:
        """The next micro-batch as a list of shards."""
        st = self.state
        if self.rollout is None:
            return self._draw(self.cpu_streams) if self.cpu_streams > 1 else _listed(self._draw())
        if not self._pending:
            prompts = self._draw()
            if prompts is None:
                return None
            st.batch = prompts
            self.emit("rollout_start")
            self._pending = list(self.rollout(st, prompts))
            self.emit("rollout_end")
        return [self._pending.pop(0)]

    def _epoch_exhausted(self) -> bool:
        return self.state.batch_in_epoch >= len(self.train_data) and not self._pending

    # ------------------------------------------------------------------ main
    def fit(self, resume_from: str | os.PathLike | None = None) -> TrainResult:
        st = self.state
        st.steps_per_epoch = len(self.train_data)
        if st.steps_per_epoch == 0:
            raise ValueError("the training data yields no batches (dataset smaller than one batch?)")
        per_draw = 1
        if self.rollout is not None and hasattr(st.trainer, "steps_per_rollout"):
            per_draw = st.trainer.steps_per_rollout()
        st.planned_steps = self.max_steps if self.max_steps is not None else \
            self.num_epochs * -(-st.steps_per_epoch // (1 if self.rollout else self.accum)) * per_draw
        self.sync_ranks()
        self.optimizer.init(self.model.trainable_parameters())
        if resume_from is not None:
            self.load_resume_state(resume_from)
        else:
            mx.random.seed(self.seed)
            np.random.seed(self.seed)
            random.seed(self.seed)
        self._build_steps()
        old_handlers = self._install_signal_handlers()
        watchdog = self._start_watchdog()
        try:
            self.emit("fit_start")
            self._interval_start = time.perf_counter()
            self._run()
            if self._sum_count:
                self._log()
            if self._evaluates_per_epoch and self._last_eval_step != st.step and self._signal is None:
                self.evaluate()  # the end of a run that stopped mid-epoch (max_steps, early stop)
            self.emit("fit_end")
        except BaseException as e:
            st.extras["exception"] = e
            self.emit("exception")
            if self.group is not None:
                # Peers are (or will be) blocked in a collective waiting for this rank: say why and
                # exit now so the launcher reports the failure instead of hanging.
                traceback.print_exc()
                print(f"[lazarus] rank {self.rank}: {type(e).__name__}: {e}; aborting the distributed run",
                      file=sys.stderr, flush=True)
                os._exit(1)
            raise
        finally:
            if watchdog is not None:
                watchdog.set()
            self._restore_signal_handlers(old_handlers)
        return TrainResult(history=st.history, stop_reason=st.stop_reason or "completed",
                           checkpoint_dir=self.checkpoint_dir, state=st)

    def _run(self) -> None:
        st = self.state
        while True:
            if self._signal is not None:
                st.request_stop(f"interrupted by {self._signal}")
                st.request_checkpoint()
            if st.checkpoint_requested:
                st.checkpoint_requested = False
                self.emit("checkpoint")
            if st.should_stop:
                return
            if self.max_steps is not None and st.step >= self.max_steps:
                st.request_stop(f"max_steps reached ({self.max_steps})")
                continue
            if self.max_steps is None and st.epoch >= self.num_epochs:
                st.request_stop(f"completed {self.num_epochs} epochs")
                continue
            if not self._epoch_open:
                self._epoch_open = True
                self.emit("epoch_start")
            self.emit("step_start")
            micro = []
            for _ in range(self.accum if self.rollout is None else 1):
                shards = self._next_micro_batch()
                if shards is None:
                    break
                micro.append(shards)
                st.micro_step += 1
                tokens = sum(int(b.get("num_tokens", 0)) for b in shards)
                st.tokens_seen += tokens
                self._interval_tokens += tokens
            if micro:
                st.batch = micro[-1][0]
                self._optimizer_step(micro)
                self._heartbeat = time.monotonic()
                if st.step % self.log_interval == 0 and self._sum_count:
                    self._log()
                if self.eval_data is not None and self.eval_interval and st.step % self.eval_interval == 0:
                    st.eval_requested = True
                if st.eval_requested:
                    st.eval_requested = False
                    self.evaluate()
            if self._epoch_exhausted():
                if self._evaluates_per_epoch and self._last_eval_step != st.step:
                    self.evaluate()
                self.emit("epoch_end")
                st.epoch += 1
                st.batch_in_epoch = 0
                self._epoch_open = False

    # ------------------------------------------------------------------ distributed watchdog
    def _start_watchdog(self):
        if self.group is None or not self.distributed_timeout:
            return None
        done = threading.Event()
        self._heartbeat = time.monotonic()

        launcher = int(os.environ.get("LAZARUS_LAUNCHER_PID", "0") or 0)
        parent = os.getppid()

        def watch():
            while not done.wait(1.0):
                if (launcher and not _alive(launcher)) or os.getppid() != parent:
                    # the launcher (or the process that started this rank) is gone: nobody will stop
                    # this rank any more, so it must not outlive them as an orphan
                    print(f"[lazarus] rank {self.rank}: the launcher exited; aborting.", file=sys.stderr, flush=True)
                    os._exit(1)
                idle = time.monotonic() - self._heartbeat
                if idle > self.distributed_timeout:
                    print(f"[lazarus] rank {self.rank}: no progress for {idle:.0f}s (limit "
                          f"{self.distributed_timeout:.0f}s, LAZARUS_DIST_TIMEOUT); a peer rank probably "
                          "failed. Aborting.", file=sys.stderr, flush=True)
                    os._exit(3)

        threading.Thread(target=watch, name="lazarus-watchdog", daemon=True).start()
        return done

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self):
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return None
        old = {}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._signal is not None:  # second signal: give up immediately
                raise KeyboardInterrupt(name)
            self._signal = name

        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
        return old

    @staticmethod
    def _restore_signal_handlers(old) -> None:
        if old:
            for sig, h in old.items():
                signal.signal(sig, h)

    # ------------------------------------------------------------------ checkpoints
    def trainable_weights(self) -> dict[str, mx.array]:
        return dict(tree_flatten(self.model.trainable_parameters()))

    def resume_payload(self) -> tuple[dict, dict]:
        """(arrays, json document) that restore this run exactly."""
        st = self.state
        arrays = {f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)}
        arrays["rng.mlx"] = mx.random.state[0]
        np_state = np.random.get_state()
        doc: dict[str, Any] = {
            "step": st.step, "epoch": st.epoch, "micro_step": st.micro_step,
            "batch_in_epoch": st.batch_in_epoch, "tokens_seen": st.tokens_seen,
            "epoch_open": self._epoch_open, "history": st.history, "world_size": self.world_size,
            "stop_reason": None,
            "config": _config_dict(st.config),
            "rng": {"python": _to_jsonable(random.getstate()),
                    "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks if cb.state_dict()},
            "pending": [],
            "interval": {"sums": self._sums, "count": self._sum_count},
        }
        for i, b in enumerate(self._pending):
            meta = {}
            for k, v in b.items():
                if isinstance(v, mx.array):
                    arrays[f"pending.{i}.{k}"] = v
                else:
                    meta[k] = v
            doc["pending"].append(meta)
        if hasattr(self.train_data, "state_dict"):
            doc["data"] = self.train_data.state_dict()
        trainer = st.trainer
        if trainer is not None and hasattr(trainer, "resume_state"):
            t_arrays, t_doc = trainer.resume_state()
            arrays.update({f"trainer.{k}": v for k, v in t_arrays.items()})
            doc["trainer"] = t_doc
        return arrays, doc

    def save_checkpoint(self, path: str | os.PathLike) -> Path | None:
        """Write weights + resume state atomically (rank 0 only; other ranks return None).
        Every rank calls it: the ranks first check that they hold the same weights."""
        arrays, doc = self.resume_payload()
        weights = self.trainable_weights()
        mx.eval(arrays, weights)
        self.check_ranks_agree()
        if self.rank != 0:
            return None
        last = self.state.extras.get("last_checkpoint")
        return ckpt.write_checkpoint(path, weights, arrays, doc, non_finite_hint=(
            f" after step {self.state.step} (the run diverged; lower the learning rate). "
            f"Last good checkpoint: {last or 'none written'}"))

    def load_resume_state(self, path) -> None:
        st = self.state
        weights, arrays, doc = ckpt.read_checkpoint(path)
        check_same_config(path, doc.get("config"), st.config)
        ckpt.check_compatible(path, weights, self.trainable_weights())
        self.model.load_weights(list(weights.items()), strict=False)
        for k, v in arrays.items():
            if k.startswith("optimizer."):
                _set_path(self.optimizer.state, k[len("optimizer."):], v)
        set_mlx_rng_key(arrays["rng.mlx"])
        random.setstate(_from_jsonable(doc["rng"]["python"]))
        n = doc["rng"]["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
        if doc.get("world_size", 1) != self.world_size and doc.get("pending"):
            raise ckpt.CheckpointError(f"{path}: saved with {doc['world_size']} ranks mid-rollout; "
                                       f"resume it with the same number of ranks")
        st.step, st.epoch, st.micro_step = doc["step"], doc["epoch"], doc["micro_step"]
        st.batch_in_epoch, st.tokens_seen = doc["batch_in_epoch"], doc["tokens_seen"]
        st.history = list(doc["history"])
        self._epoch_open = doc["epoch_open"]
        self._sums = dict(doc["interval"]["sums"])
        self._sum_count = doc["interval"]["count"]
        states = doc.get("callbacks", {})
        for cb in self.callbacks:
            if cb.state_key in states:
                cb.load_state_dict(states[cb.state_key])
        if "data" in doc and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(doc["data"], source=str(path))
        self._pending = []
        for i, meta in enumerate(doc.get("pending", [])):
            b = dict(meta)
            prefix = f"pending.{i}."
            b.update({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
            self._pending.append(b)
        trainer = st.trainer
        if trainer is not None and hasattr(trainer, "load_resume_state"):
            t_arrays = {k[len("trainer."):]: v for k, v in arrays.items() if k.startswith("trainer.")}
            trainer.load_resume_state(t_arrays, doc.get("trainer", {}))
        st.extras["resumed_from"] = str(path)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, counts as gone on Linux)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _config_dict(config) -> dict | None:
    dump = getattr(config, "model_dump", None)
    return dump(mode="json") if dump is not None else None


def check_same_config(path, saved: dict | None, config) -> None:
    """Refuse to resume with settings that change the trajectory (``learning_rate``, ``batch_size``,
    ``dpo.beta`` ...): the resumed run would silently differ from what its checkpoint and its
    config.yaml say. Fields in the config class's ``RESUME_MAY_CHANGE`` (how long to train, what
    to write, how fast to compute) may differ."""
    now = _config_dict(config)
    if saved is None or now is None:
        return
    allowed = getattr(config, "RESUME_MAY_CHANGE", frozenset())

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old, new = flat(saved), flat(now)
    changed = [k for k in new if k in old and k not in allowed and old[k] != new[k]]
    if changed:
        diffs = "; ".join(f"{k} is {new[k]!r} now but {old[k]!r} in the checkpoint" for k in changed)
        raise ckpt.CheckpointError(
            f"{path}: resuming would silently change the run: {diffs}. Resume with the checkpoint's settings "
            "(its run folder's config.yaml), or start a new run")


def _to_jsonable(x):
    if isinstance(x, tuple):
        return {"__tuple__": [_to_jsonable(v) for v in x]}
    return x


def _from_jsonable(x):
    if isinstance(x, dict) and "__tuple__" in x:
        return tuple(_from_jsonable(v) for v in x["__tuple__"])
    if isinstance(x, list):
        return [_from_jsonable(v) for v in x]
    return x
