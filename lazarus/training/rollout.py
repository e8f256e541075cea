"""Rollouts for online RL: batched KV-cache sampling, packing, and the shared RL trainer base.

Generation runs every completion of a rollout in one batch: prompts are left-padded and
decoded with mlx-lm's batch KV caches (``BatchKVCache`` / ``BatchRotatingKVCache``, whose
masks hide the padding and whose per-row offsets keep positions as if unpadded). Models
whose caches cannot be batched fall back to one row at a time with ``make_prompt_cache``.
Sampling draws from ``mx.random`` (the Loop seeds it and checkpoints its state, so a resumed
run samples the same completions). Generated token ids are kept as they are (never decoded
and re-tokenized) together with their sampling log-probabilities.

:class:`OnlineRLTrainer` is what GRPO and PPO share: rewards, sampling a prompt batch,
the frozen reference, evaluation by generation, rollout timing.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from lazarus.data import PromptDataset
from lazarus.loop import set_mlx_rng_key
from lazarus.data.batching import DataLoader
from lazarus.models import fast_cpu
from lazarus.models.lora import adapters_disabled, lora_settings
from pydantic import Field

from lazarus.training.base import Trainer, TrainerConfig, logps_from_logits, token_logps  # noqa: F401
from lazarus.training.rewards import RewardFunctions

#: Prefix of batch entries that ``compute_loss`` passes through as logged metrics.
LOG_PREFIX = "log/"


# ---------------------------------------------------------------------------------- generation
@dataclass
class Completions:
    """The result of :func:`generate_completions`, one entry per sequence.

    ``completion_ids[i]`` includes the final EOS when ``finished[i]``; ``texts[i]`` is
    ``tokenizer.decode`` of the ids without that EOS. ``logprobs[i][t]`` is the log-prob of
    token ``t`` under the (temperature-scaled, before top-p) distribution it was drawn from.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]
    texts: list[str]
    seconds: float = 0.0
    max_tokens: int = 0

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(c) for c in self.completion_ids], dtype=np.int64)

    def metrics(self) -> dict[str, float]:
        lens = self.lengths
        return {"completions/mean_length": float(lens.mean()), "completions/min_length": float(lens.min()),
                "completions/max_length": float(lens.max()),
                "completions/clipped_ratio": float(1.0 - np.mean(self.finished))}


def eos_token_ids(tokenizer) -> set[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids:
        return {int(i) for i in ids}
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("the tokenizer has no eos_token_id; generation could never stop early")
    return {int(tokenizer.eos_token_id)}


def pad_token_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else min(eos_token_ids(tokenizer))


def _batch_cache(model, left_padding: list[int]):
    """Per-layer batch caches for left-padded prompts, or None if the model's cache kinds
    cannot be batched this way."""
    from mlx_lm.models.cache import (BatchKVCache, BatchRotatingKVCache, KVCache, RotatingKVCache,
                                     make_prompt_cache)

    out = []
    for c in make_prompt_cache(model):
        if type(c) is KVCache:
            out.append(BatchKVCache(left_padding))
        elif type(c) is RotatingKVCache and getattr(c, "keep", 0) == 0:
            out.append(BatchRotatingKVCache(c.max_size, left_padding))
        else:
            return None
    return out


def _sample(logits, temperature: float, top_p: float, key=None):
    logits = logits.astype(mx.float32)
    if temperature <= 0:
        logprobs = logits - fast_cpu.log_normalizer(logits, keepdims=True)
        tokens = mx.argmax(logits, axis=-1)
    else:
        scaled = logits * (1.0 / temperature)
        logprobs = scaled - fast_cpu.log_normalizer(scaled, keepdims=True)
        candidates = logprobs
        if top_p < 1.0:
            from mlx_lm.sample_utils import apply_top_p
            candidates = apply_top_p(logprobs, top_p)
        tokens = mx.random.categorical(candidates, key=key)
    lp = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(mx.int32), lp


def _decode_loop(model, x, cache, max_tokens, temperature, top_p, eos: np.ndarray, key=None):
    """Prefill ``x`` (left-padded prompts) into ``cache`` then sample up to ``max_tokens``.
    Returns (tokens (steps, N), logprobs (steps, N)) as numpy arrays. ``key``: an explicit
    PRNG key (split per step) instead of the global ``mx.random`` state."""

    def draw(logits):
        nonlocal key
        sub = None
        if key is not None and temperature > 0:
            key, sub = mx.random.split(key)
        return _sample(logits, temperature, top_p, sub)

    if x.shape[1] > 1:
        model(x[:, :-1], cache=cache)
        mx.eval([c.state for c in cache])
    logits = model(x[:, -1:], cache=cache)[:, -1, :]
    tok, lp = draw(logits)
    mx.async_eval(tok, lp)
    n = x.shape[0]
    done = np.zeros(n, dtype=bool)
    toks, lps = [], []
    for t in range(max_tokens):
        if t + 1 < max_tokens:  # queue the next step before reading this one (pipelining)
            logits = model(tok[:, None], cache=cache)[:, -1, :]
            nxt, nlp = draw(logits)
            mx.async_eval(nxt, nlp)
        tok_np, lp_np = np.array(tok), np.array(lp)
        toks.append(tok_np)
        lps.append(lp_np)
        done |= np.isin(tok_np, eos)
        if done.all() or t + 1 >= max_tokens:
            break
        tok, lp = nxt, nlp
    return np.stack(toks), np.stack(lps)


@contextmanager
def eval_mode(model):
    """Run ``model`` in eval mode (no dropout) inside the block, restoring its mode after."""
    was = getattr(model, "training", False)
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def generate_completions(model, tokenizer, prompt_ids: list[list[int]], *, max_tokens: int,
                         temperature: float = 1.0, top_p: float = 1.0, key=None) -> Completions:
    """Sample one completion per prompt (repeat a prompt to get several), all in one batch.

    Stops a row at its first EOS or after ``max_tokens`` tokens. ``temperature=0`` is greedy
    decoding (and uses no randomness). Randomness comes from the global ``mx.random`` state
    unless a PRNG ``key`` is given."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    if not prompt_ids:
        raise ValueError("no prompts to generate from")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    t0 = time.perf_counter()
    eos_set = eos_token_ids(tokenizer)
    eos = np.array(sorted(eos_set))
    pad = pad_token_id(tokenizer)
    n = len(prompt_ids)
    width = max(len(p) for p in prompt_ids)
    left = [width - len(p) for p in prompt_ids]
    with eval_mode(model):
        cache = _batch_cache(model, left)
        rows = None
        if cache is not None:
            x = mx.array([[pad] * lp + list(p) for lp, p in zip(left, prompt_ids)], dtype=mx.int32)
            rng = mx.random.state[0]
            try:
                steps_tok, steps_lp = _decode_loop(model, x, cache, max_tokens, temperature, top_p, eos, key)
                rows = [(steps_tok[:, i], steps_lp[:, i]) for i in range(n)]
            except (TypeError, ValueError, AttributeError):
                # an architecture whose attention cannot take per-row cache offsets: fall back
                # to one row at a time (from the same random state, so runs stay reproducible)
                set_mlx_rng_key(rng)
        if rows is None:  # cache kinds that cannot be left-padded: one row at a time
            from mlx_lm.models.cache import make_prompt_cache
            rows = []
            keys = mx.random.split(key, n) if key is not None else [None] * n
            for p, k in zip(prompt_ids, keys):
                st, sl = _decode_loop(model, mx.array([list(p)], dtype=mx.int32), make_prompt_cache(model),
                                      max_tokens, temperature, top_p, eos, k)
                rows.append((st[:, 0], sl[:, 0]))
    completion_ids, logprobs, finished, texts = [], [], [], []
    for toks, lps in rows:
        toks = toks.tolist()
        hits = [j for j, t in enumerate(toks) if t in eos_set]
        end = hits[0] + 1 if hits else min(len(toks), max_tokens)
        ids = [int(t) for t in toks[:end]]
        completion_ids.append(ids)
        logprobs.append([float(v) for v in lps[:end]])
        finished.append(bool(hits))
        texts.append(tokenizer.decode(ids[:-1] if hits else ids))
    return Completions([list(p) for p in prompt_ids], completion_ids, logprobs, finished, texts,
                       time.perf_counter() - t0, max_tokens)


def answer_accuracy(model, tokenizer, prompts, samples: int = 0, seed: int = 0, *, column: str = "answer",
                    max_tokens: int = 6) -> float:
    """Share of completions that equal the prompt dataset's ``column`` (whitespace-stripped):
    greedy when ``samples == 0``, else the mean over ``samples`` completions per prompt at
    temperature 1 (seeded, so before/after comparisons sample alike)."""
    ids = [e.ids for e in prompts.examples]
    answers = [str(e.columns[column]).strip() for e in prompts.examples]
    if samples:
        mx.random.seed(seed)
        ids = [p for p in ids for _ in range(samples)]
        answers = [a for a in answers for _ in range(samples)]
    comps = generate_completions(model, tokenizer, ids, max_tokens=max_tokens, temperature=1.0 if samples else 0.0)
    return sum(t.strip() == a for t, a in zip(comps.texts, answers)) / len(answers)


def _draw_key():
    """A fresh PRNG key drawn from (and advancing) the global ``mx.random`` state."""
    return mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)


# ---------------------------------------------------------------------------------- scoring
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


# ---------------------------------------------------------------------------------- shared trainer
class OnlineRLConfig(TrainerConfig):
    """Sampling and clipping settings shared by GRPO and PPO. ``batch_size`` is the number of
    prompts per rollout (global)."""

    max_completion_length: int = Field(128, ge=1, description="Token limit of each completion")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (also scales the training logits)")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1.0 disables)")
    clip_epsilon: float = Field(0.2, gt=0, description="Policy ratio clip range (GRPO: the lower one)")


class OnlineRLTrainer(Trainer):
    """Base of GRPO and PPO: samples completions for each prompt batch, scores them with the
    reward functions and turns them into optimizer-step batches (``rollout``), which the Loop
    consumes one per step. Subclasses implement ``rollout`` and ``compute_loss``.

    The reference policy (for the KL term) is, in order: ``reference_model`` when given;
    the policy with its LoRA adapters disabled when it is a LoRA model; else a snapshot of
    the trainable weights taken when training starts (kept in checkpoints for exact resume).
    It is only computed when ``beta > 0``.
    """

    dataset_class = PromptDataset

    def __init__(self, model, tokenizer, config=None, reward_fn=None, *, reward_funcs=None, reward_weights=None,
                 reference_model=None, callbacks=None, optimizer=None):
        funcs = []
        if reward_fn is not None:
            funcs.extend(reward_fn if isinstance(reward_fn, (list, tuple)) else [reward_fn])
        if reward_funcs is not None:
            funcs.extend(reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs])
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

    # ---- config-derived -----------------------------------------------------------------
    def steps_per_rollout(self) -> int:
        """Optimizer steps (batches) that one rollout produces."""
        return 1

    def train(self, dataset, eval_dataset=None, resume_from=None, allow_data_change: bool = False):
        from lazarus.callbacks import Checkpoint

        dataset = self.as_dataset(dataset)
        for ds in (dataset, self.as_dataset(eval_dataset) if eval_dataset is not None else None):
            if ds is not None and not (len(ds) and "prompt_ids" in ds.collate([0])):
                raise TypeError(f"{type(self).__name__} trains on prompts: pass a PromptDataset (or a JSONL path of "
                                f"{{\"prompt\": ...}} records), got {type(ds).__name__}")
        ckpt_cb = self.get_callback(Checkpoint)
        if ckpt_cb is not None and ckpt_cb.monitor is None:
            ckpt_cb.monitor = "eval/reward" if eval_dataset is not None else "reward"
            ckpt_cb.mode = "max"
        if self._needs_snapshot():  # prepare() takes it (after the ranks are synchronised); a resumed
            self._ref_params = None  # run gets the snapshot saved in its checkpoint instead
        return super().train(dataset, eval_dataset, resume_from, allow_data_change)

    def build_loop(self, train_loader, eval_loader=None, **kwargs):
        kwargs.setdefault("rollout", self.rollout)
        return super().build_loop(train_loader, eval_loader, **kwargs)

    # ---- data ---------------------------------------------------------------------------
    def as_dataset(self, data):
        if data is None or hasattr(data, "collate"):
            return data
        return PromptDataset(data, self.tokenizer, max_length=self.max_length())

    def make_loader(self, dataset, split: str = "train") -> DataLoader:
        c = self.config
        if split == "train":
            return DataLoader(dataset, c.batch_size, shuffle=True, seed=c.seed, collate_fn=dataset.collate)
        return DataLoader(dataset, c.batch_size * c.group_size, shuffle=False, bucket=False,
                          collate_fn=self._eval_collate(dataset))

    def _eval_collate(self, dataset):
        def collate(indices, pad_multiple: int = 8):
            batch = dataset.collate(indices, pad_multiple)
            comps = self.generate(batch["prompt_ids"], temperature=0.0)  # greedy: draws no random numbers
            total, per = self.rewards(batch["prompts"], comps.texts, batch["columns"])
            metrics = {"reward": float(total.mean()), **self._per_reward_means(per), **comps.metrics()}
            out = {LOG_PREFIX + k: mx.array(v, dtype=mx.float32) for k, v in metrics.items()}
            out["loss_weight"] = mx.array(float(len(indices)))
            return out
        return collate

    def eval_loss(self, model, batch):
        """Evaluation generates greedily from each eval prompt and scores it; ``loss`` is
        ``-reward`` so loss-watching tools (best checkpoint, early stopping) also work."""
        metrics = {k[len(LOG_PREFIX):]: v for k, v in batch.items() if k.startswith(LOG_PREFIX)}
        return -metrics["reward"], metrics

    # ---- sampling and scoring -------------------------------------------------------------
    def generate(self, prompt_ids, temperature: float | None = None) -> Completions:
        c = self.config
        temperature = c.temperature if temperature is None else temperature
        key = None
        loop = self.loop
        if loop is not None and loop.world_size > 1 and temperature > 0:
            # every rank holds the same global RNG state: give each its own stream for sampling
            key = mx.random.split(_draw_key(), loop.world_size)[loop.rank]
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

    def all_ranks_sum(self, x: float) -> float:
        """``x`` summed over the data-parallel ranks (a collective: every rank must call it)."""
        loop = self.loop
        if loop is None or loop.group is None:
            return x
        return mx.distributed.all_sum(mx.array(x, dtype=mx.float32), group=loop.group).item()

    @staticmethod
    def log_arrays(metrics: dict[str, float]) -> dict:
        return {LOG_PREFIX + k: mx.array(float(v), dtype=mx.float32) for k, v in metrics.items()}

    @staticmethod
    def passthrough_metrics(batch: dict) -> dict:
        return {k[len(LOG_PREFIX):]: v for k, v in batch.items() if k.startswith(LOG_PREFIX)}

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
        if self._ref_params is not None and self._needs_snapshot():
            return {f"ref_params.{k}": v for k, v in self._ref_params.items()}, {}
        return {}, {}

    def load_resume_state(self, arrays, doc):
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

    def _finish_rollout(self, t0: float) -> None:
        self._rollout_seconds += time.perf_counter() - t0


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


__all__ = ["Completions", "generate_completions", "pack_sequences", "token_logps", "logps_from_logits",
           "OnlineRLTrainer", "LOG_PREFIX", "eval_mode", "masked_mean", "split_minibatches", "take_rows",
           "trim_width"]
