"""What GRPO and PPO share: their common config fields and :class:`OnlineRLTrainer` (rewards,
sampling a prompt batch, the frozen reference, evaluation by generation, rollout timing), plus the
helpers that turn a rollout into per-step minibatches.

A rollout hands the Loop a :class:`~lazarus.protocols.Rollout`: its training batches and its host
metrics (reward, completion lengths...), which the Loop logs with every step those batches feed.
Evaluation is the Loop's ``eval_step``: :meth:`OnlineRLTrainer.evaluate_prompts` generates greedily
from each eval batch's prompts and scores the completions.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import ClassVar

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from pydantic import Field, model_validator

from lazarus.data import PromptDataset
from lazarus.data.batching import DataLoader
from lazarus.models.lora import adapters_disabled, lora_settings
from lazarus.protocols import Rollout
from lazarus.training.base import Trainer, TrainerConfig, token_logps
from lazarus.step import eval_mode
from lazarus.training.generation import Completions, draw_key, eos_token_ids, generate_completions, pad_token_id
from lazarus.training.rewards import RewardFunctions, model_reward


# ---------------------------------------------------------------------------------- rollout batches
def pack_sequences(prompt_ids, completion_ids, pad_id: int, pad_multiple: int = 8):
    """Right-padded next-token arrays for prompt+completion rows (numpy).

    Returns ``inputs``, ``targets`` (int32, width rounded up to ``pad_multiple``) and ``mask``
    (float32, 1 on the targets that are completion tokens)."""
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(s) for s in seqs) - 1
    width = max(pad_multiple, -(-width // pad_multiple) * pad_multiple)
    n = len(seqs)
    inputs = np.full((n, width), pad_id, dtype=np.int32)
    targets = np.full((n, width), pad_id, dtype=np.int32)
    mask = np.zeros((n, width), dtype=np.float32)
    for b, (s, p) in enumerate(zip(seqs, prompt_ids)):
        inputs[b, : len(s) - 1] = s[:-1]
        targets[b, : len(s) - 1] = s[1:]
        mask[b, len(p) - 1: len(s) - 1] = 1.0
    return inputs, targets, mask


def masked_mean(x, mask, axis=None):
    return (x * mask).sum(axis=axis) / mx.maximum(mask.sum(axis=axis), 1.0)


def chunked(fn, n: int, chunk: int, *arrays):
    """``fn`` over row chunks of ``arrays`` (evaluated chunk by chunk), concatenated."""
    outs = []
    for s in range(0, n, max(1, chunk)):
        out = fn(*(a[s: s + chunk] for a in arrays))
        out = mx.stop_gradient(out) if isinstance(out, mx.array) else tuple(mx.stop_gradient(o) for o in out)
        mx.eval(out)
        outs.append(out)
    if isinstance(outs[0], mx.array):
        return mx.concatenate(outs, axis=0)
    return tuple(mx.concatenate([o[i] for o in outs], axis=0) for i in range(len(outs[0])))


def split_minibatches(n: int, num_minibatches: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Row index sets for ``num_minibatches`` near-equal minibatches (shuffled with ``rng``)."""
    if num_minibatches > n:
        raise ValueError(f"num_minibatches={num_minibatches} exceeds the {n} sequences of a rollout "
                         f"(batch_size x group_size)")
    order = rng.permutation(n) if (rng is not None and num_minibatches > 1) else np.arange(n)
    return [np.sort(p) for p in np.array_split(order, num_minibatches)]


def take_rows(arrays: dict, idx: np.ndarray) -> dict:
    """Rows ``idx`` of every array with a leading batch axis (scalars are kept as they are)."""
    sel = mx.array(idx.astype(np.int32))
    return {k: (v[sel] if v.ndim > 0 else v) for k, v in arrays.items()}


def trim_width(arrays: dict, mask_key: str = "mask", pad_multiple: int = 8) -> dict:
    """Cut trailing all-padding columns (to a multiple of ``pad_multiple``) off 2-D arrays."""
    mask = np.array(arrays[mask_key])
    cols = np.nonzero(mask.any(axis=0))[0]
    last = int(cols[-1]) + 1 if cols.size else 1
    width = max(pad_multiple, -(-last // pad_multiple) * pad_multiple)
    if width >= mask.shape[1]:
        return arrays
    return {k: (v[:, :width] if v.ndim == 2 else v) for k, v in arrays.items()}

# ---------------------------------------------------------------------------------- shared trainer
class OnlineRLConfig(TrainerConfig):
    """Settings GRPO and PPO share. ``batch_size`` is the number of prompts per rollout (global); a
    rollout feeds one optimizer step per minibatch, so ``grad_accumulation_steps`` stays 1. The
    subclasses override the defaults that differ (``group_size``, ``beta``, ``learning_rate``)."""

    #: Named in the error of the validator.
    paradigm: ClassVar[str] = "online RL"

    group_size: int = Field(1, ge=1, description="Completions sampled per prompt")
    max_completion_length: int = Field(128, ge=1, description="Token limit of each completion")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (also scales the training logits)")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1.0 disables)")
    beta: float = Field(0.0, ge=0, description="KL-to-reference coefficient (GRPO: k3 estimator in the loss); "
                                              "0 needs no reference")
    clip_epsilon: float = Field(0.2, gt=0, description="Policy ratio clip range (GRPO: the lower one, and the "
                                                       "upper one unless clip_epsilon_high)")
    num_minibatches: int = Field(1, ge=1, description="Optimizer steps per pass (the rollout is split)")
    # RL-friendly overrides of the shared defaults
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate (small for RL)")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps")

    @model_validator(mode="after")
    def _check(self):
        if self.grad_accumulation_steps != 1:
            raise ValueError(f"grad_accumulation_steps: {self.paradigm} takes one optimizer step per rollout "
                             "minibatch; use num_minibatches / batch_size instead")
        return self


class OnlineRLTrainer(Trainer):
    """Base of GRPO and PPO: samples completions for each prompt batch, scores them with the
    reward functions and turns them into optimizer-step batches (``rollout``), which the Loop
    consumes one per step. Subclasses implement ``rollout`` and ``compute_loss``.

    ``reward_model`` (a :class:`~lazarus.training.RewardModel` or the path of a saved one) is scored
    after the reward functions, as one more function named ``reward_model`` (its weight is the last
    of ``reward_weights``): each completion's prompt and text, tokenized with the reward model's own
    tokenizer (else the policy's) as its training pairs were, in batches, without gradients.

    The reference policy (for the KL term) is, in order: ``reference_model`` when given;
    the policy with its LoRA adapters disabled when it is a LoRA model; else a snapshot of
    the trainable weights taken when training starts (kept in checkpoints for exact resume).
    It is only computed when ``beta > 0``.
    """

    dataset_class = PromptDataset

    def __init__(self, model, tokenizer, config=None, reward_fn=None, *, reward_funcs=None, reward_weights=None,
                 reward_model=None, reference_model=None, callbacks=None, optimizer=None):
        funcs = []
        if reward_fn is not None:
            funcs.extend(reward_fn if isinstance(reward_fn, (list, tuple)) else [reward_fn])
        if reward_funcs is not None:
            funcs.extend(reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs])
        self.reward_model = model_reward(reward_model)
        if self.reward_model is not None:  # scored after the functions: reward_weights lists it last
            funcs.append(self.reward_model.as_reward_function(tokenizer))
        self.rewards = RewardFunctions(funcs, reward_weights)
        self.reference_model = reference_model
        if reference_model is not None:
            reference_model.freeze()
            reference_model.eval()
        super().__init__(model, tokenizer, config, callbacks, optimizer)
        self.pad_id = pad_token_id(tokenizer)
        eos_token_ids(tokenizer)  # fail early without an EOS
        self._ref_params: dict | None = None
        self._rollout_seconds = 0.0
        self._timer_start = time.perf_counter()
        self.last_completions: Completions | None = None

    def frozen_models(self) -> list:
        """The reference model and the reward model: run, not trained, in the same compute dtype."""
        return super().frozen_models() + ([self.reward_model] if self.reward_model is not None else [])

    # ---- config-derived -----------------------------------------------------------------
    def steps_per_rollout(self) -> int:
        """Optimizer steps (batches) that one rollout produces."""
        return 1

    def train(self, dataset, eval_dataset=None, resume_from=None, allow_data_change: bool = False):
        dataset = self.as_dataset(dataset)
        for ds in (dataset, self.as_dataset(eval_dataset) if eval_dataset is not None else None):
            if ds is not None and not (len(ds) and "prompt_ids" in ds.collate([0])):
                raise TypeError(f"{type(self).__name__} trains on prompts: pass a PromptDataset (or a JSONL path of "
                                f"{{\"prompt\": ...}} records), got {type(ds).__name__}")
        if self._needs_snapshot():  # prepare() takes it (after the ranks are synchronised); a resumed
            self._ref_params = None  # run gets the snapshot saved in its checkpoint instead
        return super().train(dataset, eval_dataset, resume_from, allow_data_change)

    def default_monitor(self, evaluated: bool) -> str:
        """RL has no loss worth watching: best checkpoints and early stopping follow the reward."""
        return "eval/reward" if evaluated else "reward"

    def build_loop(self, train_loader, eval_loader=None, **kwargs):
        kwargs.setdefault("rollout", self.rollout)
        kwargs.setdefault("eval_step", self.evaluate_prompts)
        return super().build_loop(train_loader, eval_loader, **kwargs)

    # ---- data ---------------------------------------------------------------------------
    def as_dataset(self, data):
        if data is None or hasattr(data, "collate"):
            return data
        from lazarus.data.formats import format_options

        return PromptDataset(data, self.tokenizer, max_length=self.max_length(),
                             **format_options(self.config, PromptDataset))

    def make_loader(self, dataset, split: str = "train") -> DataLoader:
        c = self.config
        if split == "train":
            return DataLoader(dataset, c.batch_size, shuffle=True, seed=c.seed, collate_fn=dataset.collate)
        return DataLoader(dataset, c.batch_size * c.group_size, shuffle=False, bucket=False,
                          collate_fn=dataset.collate)

    def evaluate_prompts(self, batch: dict) -> tuple[dict[str, float], float]:
        """The Loop's ``eval_step``: one greedy completion per prompt of ``batch`` (a collated prompt
        batch), scored by the reward functions. Returns the batch's mean ``reward``,
        ``rewards/<name>`` and ``completions/*``, and its weight: the number of prompts."""
        comps = self.generate(batch["prompt_ids"], temperature=0.0)  # greedy: draws no random numbers
        total, per = self.rewards(batch["prompts"], comps.texts, batch["columns"])
        return {"reward": float(total.mean()), **self._per_reward_means(per), **comps.metrics()}, float(len(comps))

    # ---- sampling and scoring -------------------------------------------------------------
    def generate(self, prompt_ids, temperature: float | None = None) -> Completions:
        c = self.config
        temperature = c.temperature if temperature is None else temperature
        key = None
        loop = self.loop
        if loop is not None and loop.world_size > 1 and temperature > 0:
            # every rank holds the same global RNG state: give each its own stream for sampling
            key = mx.random.split(draw_key(), loop.world_size)[loop.rank]
        return generate_completions(self.model, self.tokenizer, prompt_ids, max_tokens=c.max_completion_length,
                                    temperature=temperature, top_p=c.top_p, key=key)

    def sample(self, prompt_batch: dict, group_size: int):
        """Generate ``group_size`` completions per prompt; returns (completions, prompts,
        columns), the last two repeated to align with the completions."""
        rep = lambda xs: [x for x in xs for _ in range(group_size)]  # noqa: E731
        prompt_ids = rep(prompt_batch["prompt_ids"])
        comps = self.generate(prompt_ids)
        self.last_completions = comps
        prompts = rep(prompt_batch["prompts"])
        columns = {k: rep(v) for k, v in prompt_batch.get("columns", {}).items()}
        return comps, prompts, columns

    @staticmethod
    def _per_reward_means(per: dict) -> dict[str, float]:
        out = {}
        for name, vals in per.items():
            ok = ~np.isnan(vals)
            out[f"rewards/{name}"] = float(vals[ok].mean()) if ok.any() else 0.0
        return out

    def _all_sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the data-parallel ranks (one collective: every rank must call it)."""
        if self.loop is None:
            return list(values)
        return self.loop.ranks.all_sum(mx.array(values, dtype=mx.float32)).tolist()

    def all_ranks_sum(self, x: float) -> float:
        """``x`` summed over the data-parallel ranks (a collective: every rank must call it)."""
        return self._all_sum([x])[0]

    def rollout_result(self, t0: float, batches: list[dict], metrics: dict[str, float], rows: int) -> Rollout:
        """The Loop's :class:`Rollout` of a rollout that started at ``t0``; with several ranks
        ``metrics`` become means over the whole generation batch (each rank's weighted by its
        ``rows``), so the logs show every rank's completions, not rank 0's alone."""
        if self.loop is not None and self.loop.group is not None:
            names = sorted(metrics)
            *sums, total = self._all_sum([float(metrics[k]) * rows for k in names] + [float(rows)])
            metrics = {k: v / max(total, 1.0) for k, v in zip(names, sums)}
        self._finish_rollout(t0)
        return Rollout(batches, metrics)

    # ---- log-probs of the rollout ---------------------------------------------------------
    def policy_logps(self, inputs, targets, chunk: int):
        """Log-probs of the current (sampling) policy, no gradient, in eval mode."""
        t = self.config.temperature
        with eval_mode(self.model):
            return chunked(lambda i, g: token_logps(self.model, i, g, t), inputs.shape[0], chunk, inputs, targets)

    def needs_reference(self) -> bool:
        return self.config.beta > 0

    @contextmanager
    def reference(self):
        """The reference policy as a model (frozen, eval mode) inside the block."""
        if self.reference_model is not None:
            yield self.reference_model
        elif lora_settings(self.model) is not None:
            with eval_mode(self.model), adapters_disabled(self.model):
                yield self.model
        else:
            if self._ref_params is None:
                raise RuntimeError("no reference weights: call train() first (they are snapshotted then)")
            current = tree_flatten(self.model.trainable_parameters())
            with eval_mode(self.model):
                self.model.update(tree_unflatten(list(self._ref_params.items())))
                try:
                    yield self.model
                finally:
                    self.model.update(tree_unflatten(current))

    def snapshot_reference(self) -> None:
        """Take the current trainable weights as the reference (``train()`` does this when no
        reference model or LoRA provides one). Arrays are immutable, so holding references to
        them is the snapshot: it costs memory only once the optimizer replaces them."""
        self._ref_params = dict(tree_flatten(self.model.trainable_parameters()))

    def reference_logps(self, inputs, targets, chunk: int):
        t = self.config.temperature
        with self.reference() as ref:
            return chunked(lambda i, g: token_logps(ref, i, g, t), inputs.shape[0], chunk, inputs, targets)

    def _needs_snapshot(self) -> bool:
        return self.needs_reference() and self.reference_model is None and lora_settings(self.model) is None

    # ---- hooks of the base Trainer -----------------------------------------------------------
    def prepare(self, train_loader, eval_loader, resuming: bool) -> None:
        self._rollout_seconds = 0.0
        self._timer_start = time.perf_counter()
        if not resuming and self._ref_params is None and self._needs_snapshot():
            self.snapshot_reference()

    def resume_state(self):
        arrays, doc = super().resume_state()
        if self._ref_params is not None and self._needs_snapshot():
            arrays.update({f"ref_params.{k}": v for k, v in self._ref_params.items()})
        return arrays, doc

    def load_resume_state(self, arrays, doc):
        super().load_resume_state(arrays, doc)
        ref = {k[len("ref_params."):]: v for k, v in arrays.items() if k.startswith("ref_params.")}
        if ref:
            self._ref_params = ref
        elif self._needs_snapshot():
            raise ValueError("this checkpoint holds no reference weights but beta > 0 needs them (it was saved "
                             "with beta == 0, a reference_model or LoRA); resume with the same setup")

    def derived_metrics(self, logged: dict) -> dict:
        now = time.perf_counter()
        span = max(now - self._timer_start, 1e-9)
        share = min(1.0, self._rollout_seconds / span)
        self._rollout_seconds, self._timer_start = 0.0, now
        return {"timing/rollout_share": share}

    def minibatches(self, arrays: dict, n: int, passes: int, step: int, salt: int):
        """``(row indices, arrays)`` of each optimizer step of a rollout of ``n`` rows: ``passes``
        shuffled splits into ``num_minibatches`` (the whole rollout when there is one), with padding
        columns no row of a minibatch uses cut off."""
        k = self.config.num_minibatches
        rng = np.random.default_rng([self.config.seed, step, salt])
        for _ in range(passes):
            for idx in split_minibatches(n, k, rng):
                yield idx, (trim_width(take_rows(arrays, idx)) if k > 1 else dict(arrays))

    def _finish_rollout(self, t0: float) -> None:
        self._rollout_seconds += time.perf_counter() - t0


__all__ = ["OnlineRLConfig", "OnlineRLTrainer", "pack_sequences", "masked_mean", "chunked",
           "split_minibatches", "take_rows", "trim_width"]
