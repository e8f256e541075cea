"""GRPO rollouts: batched KV-cache sampling vs token-at-a-time samplers, and GRPO steps/s.

Same tiny model, same prompts (8 prompts x group 8 = 64 completions, up to 32 new tokens,
temperature 1). Rollout throughput = generated tokens per second for:
  * Lazarus: every completion in one batch, left-padded prompts, mlx-lm batch KV caches;
  * one sequence at a time with a KV cache (mlx-lm's make_prompt_cache);
  * token-at-a-time with no cache (full forward over the sequence for every new token; 8 rows only).
Then whole GRPO steps/s with batched rollouts vs the same trainer forced to sample one row at a
time. Target: >= 2x. (`mlx_lm_lora` is not installed here; it pins its own mlx-lm.)

    .venv/bin/python bench/grpo.py [--steps 6]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lazarus  # noqa: F401
import mlx.core as mx
import numpy as np

from lazarus.data import PromptDataset
from lazarus.models import create_tiny_model, load_model
from lazarus.models.tiny import EXAMPLES
from lazarus.training import rollout as ro
from lazarus.training.grpo import GRPOConfig, GRPOTrainer


def one_at_a_time(model, tok, prompts, max_tokens):
    from mlx_lm.models.cache import make_prompt_cache

    eos = np.array(sorted(ro.eos_token_ids(tok)))
    n = 0
    for p in prompts:
        toks, _ = ro._decode_loop(model, mx.array([p], dtype=mx.int32), make_prompt_cache(model), max_tokens,
                                  1.0, 1.0, eos)
        hits = np.nonzero(np.isin(toks[:, 0], eos))[0]
        n += int(hits[0]) + 1 if len(hits) else len(toks)
    return n


def no_cache(model, tok, prompts, max_tokens):
    eos = set(ro.eos_token_ids(tok))
    n = 0
    for p in prompts:
        seq = list(p)
        for _ in range(max_tokens):
            logits = model(mx.array([seq], dtype=mx.int32))[:, -1, :]
            t = int(mx.random.categorical(logits).item())
            seq.append(t)
            n += 1
            if t in eos:
                break
    return n


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    model_dir = create_tiny_model(tmp / "m")
    model, tok = load_model(model_dir)
    ds = PromptDataset(EXAMPLES / "prompts_train.jsonl", tok)
    prompts = [e.ids for e in ds.examples[:8] for _ in range(8)]
    mx.random.seed(0)
    ro.generate_completions(model, tok, prompts[:8], max_tokens=4)  # warm-up
    batched, tb = timed(lambda: ro.generate_completions(model, tok, prompts, max_tokens=args.max_tokens))
    nb = int(batched.lengths.sum())
    n1, t1 = timed(lambda: one_at_a_time(model, tok, prompts, args.max_tokens))
    n0, t0 = timed(lambda: no_cache(model, tok, prompts[:8], args.max_tokens))
    rows = [("Lazarus batched KV cache", nb / tb), ("one sequence at a time, KV cache", n1 / t1),
            ("token at a time, no cache (8 rows)", n0 / t0)]

    def grpo_steps_per_second(force_rows: bool):
        mx.random.seed(0)
        policy, ptok = load_model(model_dir, use_lora=True)
        cfg = GRPOConfig(max_steps=args.steps, batch_size=4, group_size=8, max_completion_length=args.max_tokens,
                         learning_rate=1e-5, log_interval=10 ** 6, checkpoint_interval=None,
                         checkpoint_dir=str(tmp / f"ck{force_rows}"))
        trainer = GRPOTrainer(policy, ptok, cfg, reward_fn=lambda prompts, completions, **c: [
            float(x.strip() == a) for x, a in zip(completions, c["answer"])])
        original = ro._batch_cache
        if force_rows:
            ro._batch_cache = lambda model, left: None
        try:
            t = time.perf_counter()
            trainer.train(PromptDataset(EXAMPLES / "prompts_train.jsonl", ptok))
            return args.steps / (time.perf_counter() - t)
        finally:
            ro._batch_cache = original

    g_rows = grpo_steps_per_second(True)
    g_batch = grpo_steps_per_second(False)
    base = rows[1][1]
    print("\n| rollout sampler | generated tokens/s | vs one-at-a-time |")
    print("|---|---|---|")
    for name, v in rows:
        print(f"| {name} | {v:.0f} | {v / base:.2f}x |")
    print("\n| GRPO (4 prompts x 8 completions per step) | steps/s | ratio |")
    print("|---|---|---|")
    print(f"| rollouts one row at a time | {g_rows:.2f} | 1.00x |")
    print(f"| Lazarus batched rollouts | {g_batch:.2f} | {g_batch / g_rows:.2f}x |")
    print(f"target >= 2x: {'PASS' if g_batch / g_rows >= 2 and rows[0][1] / base >= 2 else 'MISS'}")


if __name__ == "__main__":
    sys.exit(main())
