"""DPO: cached reference log-probs vs a reference forward pass every step.

Same LoRA policy, same data, same steps (by default 3 epochs over the data: the cache
is computed once, the baseline pays a reference forward on every step of every epoch). "recompute" is a DPOTrainer whose compute_loss runs
the frozen reference model (stop_gradient) on every batch, as trainers without a cache do.
Target: cached >= 1.4x steps/s.

When `mlx_lm_lora` is importable (`pip install -e ".[bench]"`), its `train_dpo` runs too, in
alternation with the two Lazarus runs of each repeat: the same LoRA policy (built by our
`load_model(..., use_lora=True)`) with a separate frozen reference model, the same tokenized
pairs (prompt + response ids, loss on the response tokens), 8 pairs per step, AdamW with
weight decay 0 (i.e. Adam) at a constant 1e-4, the same number of steps, no evaluation, one
report and one adapter save at the end. Gradient clipping is off in every run here (mlx_lm_lora
has none). Like the "recompute" baseline it runs the reference forward on every step.

    .venv/bin/python bench/dpo.py [--hidden 256 --layers 4 --steps 30 --epochs 3 --repeats 2]
"""

import argparse
import contextlib
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import _mlx_lm_lora  # bench/ is on sys.path when a script here runs
import lazarus  # noqa: F401
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from lazarus.data import PreferenceDataset
from lazarus.models import create_tiny_model, load_model
from lazarus.training import DPOTrainer, DPOTrainerConfig
from lazarus.training.dpo import dpo_loss, sequence_logps


class RecomputeReferenceDPO(DPOTrainer):
    """Baseline: no cache; a reference forward inside every step."""

    def prepare(self, train_loader, eval_loader, resuming):
        pass

    def collate_fn(self, dataset, split):
        return dataset.collate

    def compute_loss(self, model, batch):
        c = self.config.dpo
        ref = mx.stop_gradient(sequence_logps(self.reference_model, batch))
        logps = sequence_logps(model, batch)
        n = logps.shape[0] // 2
        losses, cr, rr = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], c.beta, c.loss_type, c.label_smoothing)
        return losses.mean(), {"rewards/margins": (cr - rr).mean()}


def make_pairs(path: Path, n: int) -> Path:
    """``n`` preference pairs with responses of 8-40 words (seeded)."""
    rng = random.Random(0)
    words = "good bad river stone cloud light north south green blue".split()
    rows = [{"prompt": f"Describe item {i}.", "chosen": " ".join(rng.choice(words) for _ in range(rng.randint(8, 40))),
             "rejected": " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BATCH = 8  # preference pairs per optimizer step (both trainers)
LR = 1e-4
LORA_RANK = 8


def models(model_dir):
    """The LoRA policy, a separate frozen reference, the tokenizer (same for every trainer)."""
    policy, tok = load_model(model_dir, use_lora=True, lora_rank=LORA_RANK)
    reference, _ = load_model(model_dir)
    return policy, reference, tok


def run(cls, model_dir, data, steps, tmp):
    mx.random.seed(0)
    policy, reference, tok = models(model_dir)
    ds = PreferenceDataset(data, tok)
    cfg = DPOTrainerConfig(max_steps=steps, batch_size=BATCH, learning_rate=LR, warmup_steps=0, lr_schedule="constant",
                           weight_decay=0.0, max_grad_norm=None, log_interval=10 ** 6,
                           checkpoint_interval=None, checkpoint_dir=str(tmp), target_reward_margin=None)
    trainer = cls(policy, reference, tok, cfg, optimizer=optim.AdamW(learning_rate=LR, weight_decay=0.0))
    cache_seconds = [0.0]
    inner = trainer.reference_logps

    def timed_cache(dataset):
        t0 = time.perf_counter()
        out = inner(dataset)
        cache_seconds[0] += time.perf_counter() - t0
        return out

    trainer.reference_logps = timed_cache
    t = time.perf_counter()
    trainer.train(ds)  # includes the one-off cache pass for the cached trainer
    total = time.perf_counter() - t
    return steps / total, steps / (total - cache_seconds[0])


@contextlib.contextmanager
def wired_limit_shim():
    """train_dpo calls mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"]),
    a key only Metal reports: elsewhere (CPU, CUDA) report it as 0 while train_dpo runs."""
    original = mx.device_info
    if "max_recommended_working_set_size" in original():
        yield
        return
    mx.device_info = lambda: {**original(), "max_recommended_working_set_size": 0}
    try:
        yield
    finally:
        mx.device_info = original


def run_mlx_lm_lora(dpo_trainer, model_dir, data, steps, tmp):
    """mlx_lm_lora's train_dpo on the same model, pairs, batch, optimizer and steps; its output is discarded."""
    mx.random.seed(0)
    np.random.seed(0)  # its batch order
    policy, reference, tok = models(model_dir)
    reference.freeze()
    reference.eval()
    # its items: full prompt+response ids and the prompt length (loss on the tokens after it),
    # built from our tokenization so both trainers see identical sequences and loss masks
    pairs = [{"chosen": e.prompt + e.chosen, "rejected": e.prompt + e.rejected,
              "chosen_prompt_length": len(e.prompt), "rejected_prompt_length": len(e.prompt)}
             for e in PreferenceDataset(data, tok).examples]
    longest = max(max(len(p["chosen"]), len(p["rejected"])) for p in pairs)
    tmp.mkdir(parents=True, exist_ok=True)
    args = dpo_trainer.DPOTrainingArgs(
        batch_size=BATCH, iters=steps, max_seq_length=longest, beta=0.1, loss_type="sigmoid",
        steps_per_report=steps, steps_per_eval=10 ** 9, steps_per_save=10 ** 9,
        adapter_file=str(tmp / "adapters.safetensors"))
    optimizer = optim.AdamW(learning_rate=LR, weight_decay=0.0)
    sink = io.StringIO()
    with wired_limit_shim(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        t = time.perf_counter()
        dpo_trainer.train_dpo(policy, reference, optimizer, pairs, val_dataset=None, args=args, loss_type="sigmoid")
        total = time.perf_counter() - t
    return steps / total


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="passes over the data within --steps")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    model_dir = create_tiny_model(tmp / "m", hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                                  num_kv_heads=8, intermediate_size=2 * args.hidden)
    data = make_pairs(tmp / "prefs.jsonl", 8 * max(1, args.steps // args.epochs))
    dpo_trainer = _mlx_lm_lora.trainer_module("dpo_trainer")
    best = {"cached": 0.0, "steady": 0.0, "recompute": 0.0, "mlx_lm_lora": 0.0}
    for r in range(args.repeats):
        rc, _ = run(RecomputeReferenceDPO, model_dir, data, args.steps, tmp / f"r{r}")
        ca, steady = run(DPOTrainer, model_dir, data, args.steps, tmp / f"c{r}")
        line = (f"repeat {r}: recompute {rc:.2f} steps/s, cached {ca:.2f} steps/s "
                f"({steady:.2f} without the one-off cache pass)")
        if dpo_trainer is not None:
            ml = run_mlx_lm_lora(dpo_trainer, model_dir, data, args.steps, tmp / f"l{r}")
            best["mlx_lm_lora"] = max(best["mlx_lm_lora"], ml)
            line += f", mlx_lm_lora {ml:.2f} steps/s"
        print(line, flush=True)
        best.update(cached=max(best["cached"], ca), steady=max(best["steady"], steady),
                    recompute=max(best["recompute"], rc))
    print(f"\n| DPO trainer ({args.steps} steps, {args.epochs} epochs) | steps/s | ratio |")
    print("|---|---|---|")
    print(f"| reference forward every step | {best['recompute']:.2f} | 1.00x |")
    print(f"| Lazarus, cached reference (cache pass included) | {best['cached']:.2f} | "
          f"{best['cached'] / best['recompute']:.2f}x |")
    print(f"| Lazarus, cached reference (training steps only) | {best['steady']:.2f} | "
          f"{best['steady'] / best['recompute']:.2f}x |")
    if dpo_trainer is None:
        print('| mlx_lm_lora train_dpo | skipped: not importable (`pip install -e ".[bench]"` adds it) | |')
        return
    ml = best["mlx_lm_lora"]
    print(f"| mlx_lm_lora train_dpo (reference forward every step) | {ml:.2f} | {ml / best['recompute']:.2f}x |")
    print(f"| **Lazarus cached / mlx_lm_lora** (cache pass included; training steps only) | | "
          f"**{best['cached'] / ml:.2f}x**; {best['steady'] / ml:.2f}x |")
    print(f"\nBoth trainers take {BATCH} pairs per step, so pairs/s ratios equal the steps/s ratios. Same: LoRA "
          "policy and separate frozen reference, token ids and loss masks, AdamW(wd=0) at a constant LR, no "
          "gradient clipping, an mx.compile'd step, compile time and the final save inside the timed span. "
          "Differs (mlx_lm_lora's design): four forwards per step (policy and reference, chosen and rejected "
          "apart) where Lazarus runs one over chosen+rejected rows; batches padded to their longest pair (so its "
          "compiled step retraces for each new width) where Lazarus pads to a multiple of 8; its batches are "
          "length-sorted groups drawn at random each step, Lazarus's shuffled length buckets.")


if __name__ == "__main__":
    sys.exit(main())
