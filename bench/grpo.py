"""GRPO rollouts: batched KV-cache sampling vs token-at-a-time samplers, and GRPO steps/s.

Same tiny model, same prompts (8 prompts x group 8 = 64 completions, up to 32 new tokens,
temperature 1). Rollout throughput = generated tokens per second for:
  * Lazarus: every completion in one batch, left-padded prompts, mlx-lm batch KV caches;
  * one sequence at a time with a KV cache (mlx-lm's make_prompt_cache);
  * token-at-a-time with no cache (full forward over the sequence for every new token; 8 rows only).
Then whole GRPO steps/s with batched rollouts vs the same trainer forced to sample one row at a
time. Target: >= 2x.

When `mlx_lm_lora` is importable (`pip install -e ".[bench]"`) it is measured too, after the
Lazarus runs: its rollout generator `generate_grpo` on the same 64 completions (all in one
BatchGenerator batch, as Lazarus does; temperature 1, no top-p/top-k/min-p, EOS as the only stop
token), and its `train_grpo` on the same LoRA model, prompts, group size, prompts per step,
reward function, AdamW (weight decay 0) at a constant 1e-5, no KL term (beta 0, no reference),
token-mean loss (its "bnpo" = Lazarus "dapo"), the same number of steps, no evaluation, one
report and one adapter save at the end. Gradient clipping is off in the Lazarus GRPO runs
(mlx_lm_lora has none). What cannot be matched is printed under the tables.

    .venv/bin/python bench/grpo.py [--steps 6 --max-tokens 32]
"""

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import _mlx_lm_lora  # bench/ is on sys.path when a script here runs
import lazarus  # noqa: F401
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from lazarus.data import PromptDataset
from lazarus.models import create_tiny_model, load_model
from lazarus.models.tiny import EXAMPLES
from lazarus.training import generation as ro
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


PROMPTS_PER_STEP, GROUP, LR = 4, 8, 1e-5


def exact_answer(prompts, completions, **columns):
    """The reward of both trainers: 1 when the completion is the answer column."""
    return [float(x.strip() == str(a)) for x, a in zip(completions, columns["answer"])]


def lora_generate(grpo_trainer, model, tok, unique_prompts, group, max_tokens):
    """mlx_lm_lora's rollout sampler: ``group`` completions of each prompt. ``batch_size`` is its
    prompts per chunk and also its decode concurrency; len(prompts) * group puts every completion
    in one batch, as Lazarus does. Returns the generated token count (EOS included, as for Lazarus)."""
    comps, _, _ = grpo_trainer.generate_grpo(
        model, tok, unique_prompts, max_tokens=max_tokens, group_size=group,
        batch_size=len(unique_prompts) * group, end_token="", temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
    return sum(int(c.size) for c in comps)


def lora_grpo_steps_per_second(grpo_trainer, model_dir, steps, max_tokens, tmp):
    """mlx_lm_lora's train_grpo on the settings of the Lazarus run; its output is discarded."""
    mx.random.seed(0)
    np.random.seed(0)  # its batch order
    policy, ptok = load_model(model_dir, use_lora=True)
    ds = PromptDataset(EXAMPLES / "prompts_train.jsonl", ptok)
    # its items: (prompt ids, answer ids, prompt text, answer text), prompt ids from our tokenization
    items = [(e.ids, ptok.encode(str(e.columns["answer"])), e.prompt, str(e.columns["answer"])) for e in ds.examples]
    tmp.mkdir(parents=True, exist_ok=True)
    args = grpo_trainer.GRPOTrainingArgs(
        batch_size=PROMPTS_PER_STEP, group_size=GROUP, iters=steps, max_completion_length=max_tokens,
        max_seq_length=max(len(i[0]) for i in items), beta=0.0, epsilon=0.2, grpo_loss_type="bnpo",
        temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, steps_per_report=steps, steps_per_eval=10 ** 9,
        steps_per_save=10 ** 9, adapter_file=str(tmp / "adapters.safetensors"))
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        t = time.perf_counter()
        grpo_trainer.train_grpo(policy, None, ptok, optim.AdamW(learning_rate=LR, weight_decay=0.0), items,
                                val_dataset=None, reward_funcs=[exact_answer], args=args, end_answer_token="")
        return steps / (time.perf_counter() - t)


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
    grpo_trainer = _mlx_lm_lora.trainer_module("grpo_trainer")
    if grpo_trainer is not None:
        unique = [e.ids for e in ds.examples[:8]]
        mx.random.seed(0)
        lora_generate(grpo_trainer, model, tok, unique[:1], 8, 4)  # warm-up, as for Lazarus: 8 rows, 4 tokens
        nl, tl = timed(lambda: lora_generate(grpo_trainer, model, tok, unique, 8, args.max_tokens))
        rows.append(("mlx_lm_lora generate_grpo (BatchGenerator, one batch)", nl / tl))

    def grpo_steps_per_second(force_rows: bool):
        mx.random.seed(0)
        policy, ptok = load_model(model_dir, use_lora=True)
        cfg = GRPOConfig(max_steps=args.steps, batch_size=PROMPTS_PER_STEP, group_size=GROUP,
                         max_completion_length=args.max_tokens, learning_rate=LR, warmup_steps=0,
                         lr_schedule="constant", weight_decay=0.0, max_grad_norm=None, beta=0.0, loss_type="dapo",
                         temperature=1.0, top_p=1.0, log_interval=10 ** 6, checkpoint_interval=None,
                         checkpoint_dir=str(tmp / f"ck{force_rows}"))
        trainer = GRPOTrainer(policy, ptok, cfg, reward_fn=exact_answer,
                              optimizer=optim.AdamW(learning_rate=LR, weight_decay=0.0))
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
    g_lora = None
    if grpo_trainer is not None:
        g_lora = lora_grpo_steps_per_second(grpo_trainer, model_dir, args.steps, args.max_tokens, tmp / "lora")
    base = rows[1][1]
    print("\n| rollout sampler | generated tokens/s | vs one-at-a-time |")
    print("|---|---|---|")
    for name, v in rows:
        print(f"| {name} | {v:.0f} | {v / base:.2f}x |")
    if grpo_trainer is not None:
        print(f"| **Lazarus / mlx_lm_lora** | | **{rows[0][1] / rows[-1][1]:.2f}x** |")
    print(f"\n| GRPO ({PROMPTS_PER_STEP} prompts x {GROUP} completions per step) | steps/s | ratio |")
    print("|---|---|---|")
    print(f"| rollouts one row at a time | {g_rows:.2f} | 1.00x |")
    print(f"| Lazarus batched rollouts | {g_batch:.2f} | {g_batch / g_rows:.2f}x |")
    if g_lora is not None:
        print(f"| mlx_lm_lora train_grpo | {g_lora:.2f} | {g_lora / g_rows:.2f}x |")
        print(f"| **Lazarus / mlx_lm_lora** | | **{g_batch / g_lora:.2f}x** |")
    print(f"target >= 2x: {'PASS' if g_batch / g_rows >= 2 and rows[0][1] / base >= 2 else 'MISS'}")
    if grpo_trainer is None:
        print('mlx_lm_lora rows skipped: not importable (`pip install -e ".[bench]"` adds them).')
        return
    n = PROMPTS_PER_STEP * GROUP
    print(f"\nBoth GRPO trainers take {n} completions per step, so completions/s ratios equal the steps/s ratio. "
          f"Same: model, prompt token ids, 8 (rollouts) / {PROMPTS_PER_STEP} (GRPO) prompts x {GROUP}, max new "
          "tokens, temperature 1 with no top-p/top-k/min-p, EOS-only stop, reward, AdamW(wd=0) at a constant LR, "
          "no gradient clipping, no KL term, token-mean loss, steps; one warm-up generation each before the "
          "rollout timing; compile time inside the timed GRPO span.")
    print(f"Differs (mlx_lm_lora's design, not settable): train_grpo decodes at most batch_size "
          f"({PROMPTS_PER_STEP}) rows at a time where Lazarus decodes all {n} together (the rollout table runs "
          f"both with every row in one batch); it scores and backpropagates a step in {GROUP} microbatches of "
          f"{PROMPTS_PER_STEP} rows (Lazarus: one batch) and does not mx.compile the step; it prefills each "
          "prompt once and shares that cache across the group (prompts of 8+ tokens). Sampled completions, "
          "hence their lengths and the tokens trained on, differ between the trainers.")


if __name__ == "__main__":
    sys.exit(main())
