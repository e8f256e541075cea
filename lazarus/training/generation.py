"""Batched KV-cache sampling: completions of many prompts in one batch.

Prompts are left-padded and decoded with mlx-lm's batch KV caches (``BatchKVCache`` /
``BatchRotatingKVCache``, whose masks hide the padding and whose per-row offsets keep positions
as if unpadded). Models whose caches cannot be batched fall back to one row at a time with
``make_prompt_cache``. Sampling draws from ``mx.random`` (the Loop seeds it and checkpoints its
state, so a resumed run samples the same completions) unless an explicit key is given. Generated
token ids are kept as they are (never decoded and re-tokenized) together with their sampling
log-probabilities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from lazarus.models import fast_cpu
from lazarus.rng import set_mlx_rng_key
from lazarus.step import eval_mode


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
    """The tokens generation stops at: the EOS ids (mlx-lm's ``eos_token_ids``, which hold
    ``generation_config.json``'s ``eos_token_id`` list, and ``eos_token_id``) and the chat
    template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), which is what
    training puts at the end of every reply (:func:`lazarus.data.chat.stop_ids`)."""
    from lazarus.data.chat import stop_ids

    ids = stop_ids(tokenizer)
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id; generation could never stop early")
    return ids


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


def draw_key():
    """A fresh PRNG key drawn from (and advancing) the global ``mx.random`` state."""
    return mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)


__all__ = ["Completions", "generate_completions", "answer_accuracy", "eval_mode", "eos_token_ids", "pad_token_id",
           "draw_key"]
