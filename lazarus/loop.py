"""The generic training Loop: draws batches (or rollouts), steps the optimizer, emits events.

The objective is injected as ``compute_loss(model, batch) -> (loss, metrics)`` where ``batch``
holds only the ``mx.array`` entries of the collated batch and ``metrics`` is a dict of scalar
arrays. Everything else (schedules, clipping, checkpoints, early stopping, logging) is a
callback. The rooms around it: :mod:`lazarus.step` (the compiled optimizer step),
:mod:`lazarus.resume` (what a checkpoint holds to resume exactly), :mod:`lazarus.guards` (signals,
watchdog), :mod:`lazarus.ranks` (data parallel), :mod:`lazarus.interval_metrics` (logged averages).
See ``docs/architecture.md`` for the event order and the state object.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
import mlx.nn as nn

from lazarus import checkpointing as ckpt
from lazarus import resume
from lazarus.callbacks.base import Callback, Event, sort_callbacks
from lazarus.guards import run_guards
from lazarus.interval_metrics import IntervalMetrics
from lazarus.protocols import (DefaultHooks, DistributedBatchSource, PaddingReport, Rollout, missing_hooks)
from lazarus.ranks import Ranks
from lazarus.rng import seed_all
from lazarus.state import State
from lazarus.step import OptimizerStep, array_part, eval_mode, resolve_cpu_streams

LossFn = Callable[[nn.Module, dict], tuple]
EvalStep = Callable[[dict], tuple[dict, float]]


@dataclass
class TrainResult:
    history: list[dict]
    stop_reason: str
    checkpoint_dir: str | None
    state: State = field(repr=False)


class Loop:
    """Runs training. One ``mx.eval`` per optimizer step; everything else is events.

    Args:
        model: the ``nn.Module`` being trained (its trainable parameters are optimised).
        optimizer: an ``mlx.optimizers.Optimizer``.
        compute_loss: the objective, ``(model, batch_arrays) -> (loss, metrics)``.
        train_data: a :class:`lazarus.protocols.BatchSource` (``__len__``, ``get_batch(epoch, i)``).
        rollout: optional ``rollout(state, prompt_batch) -> Rollout | list[batch]``; each batch is
            one optimizer step (online RL); a ``Rollout``'s metrics are logged with those steps.
        eval_data: optional batch source; evaluated every ``eval_interval`` steps, or after every
            epoch and at the end when ``eval_interval`` is None.
        eval_loss: the compiled eval objective (default ``compute_loss``); ``eval_step(batch) ->
            (metrics, weight)`` replaces it with any Python (online RL generates and scores).
        trainer: the :class:`lazarus.protocols.TrainerHooks` (a ``Trainer``); None: no hooks.
        cpu_streams: on the CPU backend, split each training batch into this many shards computed
            concurrently on CPU streams; None = auto (2 when this rank has >= 2 cores).
    """

    def __init__(self, model: nn.Module, optimizer, compute_loss: LossFn, train_data=None, *,
                 rollout: Callable | None = None, eval_data=None, eval_loss: LossFn | None = None,
                 eval_step: EvalStep | None = None, callbacks: Iterable[Callback] = (),
                 max_steps: int | None = None, num_epochs: int | None = 1, grad_accumulation_steps: int = 1,
                 log_interval: int = 10, eval_interval: int | None = None, seed: int = 0, trainer=None,
                 config=None, compile: bool = True, distributed: bool | str = "auto", handle_signals: bool = True,
                 distributed_timeout: float | None = None, cpu_streams: int | None = None):
        if train_data is None:
            raise ValueError("Loop needs train_data (a loader of batches or of prompts for rollouts)")
        if grad_accumulation_steps < 1:
            raise ValueError("grad_accumulation_steps must be >= 1")
        if max_steps is None and not num_epochs:
            raise ValueError("give max_steps or num_epochs")
        if trainer is not None and missing_hooks(trainer):
            raise TypeError(f"Loop(trainer=...) needs the TrainerHooks methods; {type(trainer).__name__} lacks "
                            f"{', '.join(missing_hooks(trainer))} (derive from lazarus.protocols.DefaultHooks)")
        self.model, self.optimizer, self.compute_loss = model, optimizer, compute_loss
        self.eval_loss, self.eval_step = eval_loss or compute_loss, eval_step
        self.train_data, self.eval_data, self.rollout = train_data, eval_data, rollout
        self.hooks = trainer if trainer is not None else DefaultHooks()
        self.callbacks = sort_callbacks(callbacks)
        self.max_steps, self.num_epochs, self.accum = max_steps, num_epochs, grad_accumulation_steps
        self.log_interval, self.eval_interval, self.seed = max(1, int(log_interval)), eval_interval, seed
        # An eval set without eval_interval is evaluated after every epoch and once at the end (if
        # the run stopped mid-epoch), so `best` and `eval/...` metrics exist without extra settings.
        self.evaluates_per_epoch = eval_data is not None and not eval_interval
        self.use_compile, self.handle_signals = compile, handle_signals
        self.ranks = Ranks(distributed)
        self.group, self.rank, self.world_size = self.ranks.group, self.ranks.rank, self.ranks.size
        # a dead peer would block the others in a collective forever: the watchdog's limit
        self.distributed_timeout = float(os.environ.get("LAZARUS_DIST_TIMEOUT", "600")) \
            if distributed_timeout is None else distributed_timeout
        for data in (train_data, eval_data):
            if isinstance(data, DistributedBatchSource):
                data.set_distributed(self.rank, self.world_size)
        self.cpu_streams = resolve_cpu_streams(cpu_streams, train_data, rollout is not None, self.world_size)
        #: the CPU streams that batch shards run on (empty with one stream); trainers may reuse them
        self.streams = [mx.new_stream(mx.cpu) for _ in range(self.cpu_streams)] if self.cpu_streams > 1 else []
        self.state = State(model=model, optimizer=optimizer, trainer=trainer, config=config, max_steps=max_steps,
                           num_epochs=num_epochs, rank=self.rank, world_size=self.world_size,
                           has_eval_data=eval_data is not None, checkpoint_writer=self.save_checkpoint,
                           default_monitors=(self.hooks.default_monitor(True), self.hooks.default_monitor(False)))
        self.pending: list[tuple[dict, dict]] = []  # rollout batches not yet trained on, with their metrics
        self.epoch_open, self.interval, self.optimizer_step = False, IntervalMetrics(), None
        self._step_extra: dict[str, float] = {}  # the metrics of the rollout that fed this step
        self._eval_fn = self._last_eval_step = self._guards = None
        self._padding, self._ranks_synced = (None, 0.0), False  # (epoch, its padding fraction)

    def emit(self, event: Event | str) -> None:
        handler = Event(event).handler  # an unknown event name raises here
        for cb in self.callbacks:
            getattr(cb, handler)(self.state)

    def sync_ranks(self) -> None:
        """Every rank takes rank 0's trainable weights (once; see :meth:`Ranks.sync_weights`)."""
        if not self._ranks_synced:
            self.ranks.sync_weights(self.model)
            self._ranks_synced = True

    def trainable_weights(self) -> dict[str, mx.array]:
        return self.state.trainable_weights()

    # ------------------------------------------------------------------ main
    def fit(self, resume_from: str | os.PathLike | None = None) -> TrainResult:
        st = self.state
        st.steps_per_epoch = len(self.train_data)
        if st.steps_per_epoch == 0:
            raise ValueError("the training data yields no batches (dataset smaller than one batch?)")
        draws = -(-st.steps_per_epoch // self.accum) if self.rollout is None else st.steps_per_epoch * \
            self.hooks.steps_per_rollout()  # optimizer steps per epoch
        st.planned_steps = self.max_steps if self.max_steps is not None else self.num_epochs * draws
        self.sync_ranks()
        self.optimizer.init(self.model.trainable_parameters())
        if resume_from is not None:
            resume.restore(self, resume_from)
        else:
            seed_all(self.seed)
        self.optimizer_step = OptimizerStep(
            self.model, self.optimizer, self.compute_loss, ranks=self.ranks, streams=self.streams,
            transforms=[cb.transform_grads for cb in self.callbacks if cb.transform_grads is not None],
            split=any(cb.overrides(Event.BEFORE_OPTIMIZER_STEP) for cb in self.callbacks),
            check_finite=any(cb.may_skip_steps for cb in self.callbacks), compile=self.use_compile)
        with run_guards(handle_signals=self.handle_signals, rank=self.rank, distributed=self.group is not None,
                        timeout=self.distributed_timeout) as self._guards:
            try:
                self.emit(Event.FIT_START)
                self.interval.restart_clock()
                self._run()
                if self.interval.steps:
                    self._log()
                if self.evaluates_per_epoch and self._last_eval_step != st.step and self._guards.signal is None:
                    self.evaluate()  # the end of a run that stopped mid-epoch (max_steps, early stop)
                self.emit(Event.FIT_END)
            except BaseException as e:
                st.extras["exception"] = e
                self.emit(Event.EXCEPTION)
                if self.group is not None:
                    # Peers are (or will be) blocked in a collective waiting for this rank: say why and
                    # exit now so the launcher reports the failure instead of hanging.
                    traceback.print_exc()
                    print(f"[lazarus] rank {self.rank}: {type(e).__name__}: {e}; aborting the distributed run",
                          file=sys.stderr, flush=True)
                    os._exit(1)
                raise
        return TrainResult(history=st.history, stop_reason=st.stop_reason or "completed",
                           checkpoint_dir=st.checkpoint_dir, state=st)

    def _run(self) -> None:
        st = self.state
        while True:
            if self._guards.signal is not None:
                st.request_stop(f"interrupted by {self._guards.signal}")
                st.request_checkpoint()
            if st.checkpoint_requested:
                st.checkpoint_requested = False
                self.emit(Event.CHECKPOINT)
            if st.should_stop:
                return
            if self.max_steps is not None and st.step >= self.max_steps:
                st.request_stop(f"max_steps reached ({self.max_steps})")
                continue
            if self.max_steps is None and st.epoch >= self.num_epochs:
                st.request_stop(f"completed {self.num_epochs} epochs")
                continue
            if not self.epoch_open:
                self.epoch_open = True
                self.emit(Event.EPOCH_START)
            self.emit(Event.STEP_START)
            micro = self._draw_micro_batches()
            if micro:
                st.batch = micro[-1][0]
                self._take_step(micro)
                self._guards.beat()
                if st.step % self.log_interval == 0 and self.interval.steps:
                    self._log()
                if self.eval_data is not None and self.eval_interval and st.step % self.eval_interval == 0:
                    st.request_eval()
                if st.eval_requested:
                    st.eval_requested = False
                    self.evaluate()
            if st.batch_in_epoch >= len(self.train_data) and not self.pending:  # the epoch is used up
                if self.evaluates_per_epoch and self._last_eval_step != st.step:
                    self.evaluate()
                self.emit(Event.EPOCH_END)
                st.epoch += 1
                st.batch_in_epoch = 0
                self.epoch_open = False

    # ------------------------------------------------------------------ data
    def _draw(self, shards: int = 1) -> dict | list[dict] | None:
        st = self.state
        if st.batch_in_epoch >= len(self.train_data):
            return None
        batch = (self.train_data.get_batch_shards(st.epoch, st.batch_in_epoch, shards) if shards > 1
                 else self.train_data.get_batch(st.epoch, st.batch_in_epoch))
        st.batch_in_epoch += 1
        return batch

    def _next_micro_batch(self) -> list[dict] | None:
        """The next micro-batch as a list of shards (for online RL: the next rollout batch)."""
        if self.rollout is None:
            if self.cpu_streams > 1:
                return self._draw(self.cpu_streams)
            batch = self._draw()
            return None if batch is None else [batch]
        if not self.pending:
            prompts = self._draw()
            if prompts is None:
                return None
            self.state.batch = prompts
            self.emit(Event.ROLLOUT_START)
            out = self.rollout(self.state, prompts)
            batches, metrics = (out.batches, out.metrics) if isinstance(out, Rollout) else (out, {})
            self.pending = [(b, dict(metrics)) for b in batches]
            self.emit(Event.ROLLOUT_END)
        batch, self._step_extra = self.pending.pop(0)
        return [batch]

    def _draw_micro_batches(self) -> list[list[dict]]:
        st = self.state
        micro = []
        for _ in range(self.accum if self.rollout is None else 1):
            shards = self._next_micro_batch()
            if shards is None:
                break
            micro.append(shards)
            st.micro_step += 1
            tokens = sum(int(b.get("num_tokens", 0)) for b in shards)
            st.tokens_seen += tokens
            self.interval.add_tokens(tokens)
        return micro

    # ------------------------------------------------------------------ one optimizer step
    def _take_step(self, micro: list[list[dict]]) -> None:
        st = self.state
        values, st.weights_finite = self.optimizer_step(micro, st, self.emit)
        values.update(self._step_extra)
        st.lr = float(self.optimizer.learning_rate.item()) if "learning_rate" in self.optimizer.state else 0.0
        values["lr"] = st.lr
        st.metrics = values
        self.emit(Event.STEP_END)
        if st.skip_reason is not None:
            if self.optimizer_step.applied:  # skipped at step_end: undo the update
                self.optimizer_step.roll_back()
            st.extras.setdefault("skipped_steps", []).append((st.step + 1, st.skip_reason))
            st.skip_reason = None
            return
        st.step += 1
        self.interval.add_step(values)

    # ------------------------------------------------------------------ logging / eval
    def _log(self) -> None:
        st = self.state
        logged = self.interval.take()
        logged["lr"] = st.lr
        logged["peak_memory_gb"] = mx.get_peak_memory() / 1e9
        logged["epoch"] = st.epoch + (st.batch_in_epoch / max(1, st.steps_per_epoch or 1))
        if isinstance(self.train_data, PaddingReport) and self.rollout is None:
            if self._padding[0] != st.epoch:
                self._padding = (st.epoch, self.train_data.padding_fraction(st.epoch))
            logged["padding_fraction"] = self._padding[1]
        logged.update(self.hooks.derived_metrics(logged))
        st.logged = logged
        st.history.append({"step": st.step, **logged})
        self.emit(Event.LOG)

    def _eval_batch(self, batch: dict) -> tuple[dict, mx.array]:
        if self.eval_step is not None:
            metrics, weight = self.eval_step(batch)
            return {k: mx.array(v, dtype=mx.float32) for k, v in metrics.items()}, mx.array(float(weight))
        if self._eval_fn is None:  # the weights are inputs (they change between evaluations), not traced constants
            fn = lambda arrays: self.eval_loss(self.model, arrays)  # noqa: E731
            self._eval_fn = mx.compile(fn, inputs=[self.model.state]) if self.use_compile else fn
        arrays = array_part(batch)
        loss, metrics = self._eval_fn(arrays)
        return {"loss": loss, **metrics}, arrays.get("loss_weight", mx.array(1.0))

    def evaluate(self) -> dict[str, float]:
        """Weighted mean of the eval metrics over the whole eval set (no grads), on every rank."""
        st = self.state
        if self.eval_data is None:
            return {}
        self.emit(Event.EVAL_START)
        totals: dict[str, mx.array] = {}
        wsum = mx.array(0.0)
        with eval_mode(self.model):  # no dropout while evaluating
            for i in range(len(self.eval_data)):
                metrics, weight = self._eval_batch(self.eval_data.get_batch(0, i))
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v * weight
                wsum = wsum + weight
                mx.eval(totals, wsum)
                if self._guards is not None:
                    self._guards.beat()
        totals = {k: self.ranks.all_sum(v) for k, v in totals.items()}
        wsum = self.ranks.all_sum(wsum)
        mx.eval(totals, wsum)
        st.eval_metrics = {k: (v / wsum).item() for k, v in totals.items()}
        st.history.append({"step": st.step, **{f"eval/{k}": v for k, v in st.eval_metrics.items()}})
        self._last_eval_step = st.step
        self.emit(Event.EVAL_END)
        return st.eval_metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | os.PathLike) -> Path | None:
        """Write weights + resume state atomically, and the trainer's files beside them (rank 0;
        other ranks return None). Every rank calls it: the ranks first check they agree."""
        training = self.trainable_weights()
        self.ranks.check_agree(training, self.state.step)
        if self.rank != 0:
            return None
        arrays, doc = resume.resume_payload(self)
        weights = self.hooks.weights_for_saving(training)
        arrays.update(resume.master_copies(training, weights))
        mx.eval(arrays, weights)
        last = self.state.extras.get("last_checkpoint")
        written = ckpt.write_checkpoint(path, weights, arrays, doc, non_finite_hint=(
            f" after step {self.state.step} (the run diverged; lower the learning rate). "
            f"Last good checkpoint: {last or 'none written'}"))
        self.hooks.save_adapters(Path(path).parent)
        return written
