"""DPO: cached reference log-probs vs a reference forward pass every step.

Same LoRA policy, same data, same steps (by default 3 epochs over the data: the cache
is computed once, the baseline pays a reference forward on every step of every epoch). "recompute" is a DPOTrainer whose compute_loss runs
the frozen reference model (stop_gradient) on every batch, as trainers without a cache do.
Target: cached >= 1.4x steps/s. If `mlx_lm_lora` is importable its DPO trainer is noted too
(it is not installed by default: it pins its own mlx-lm).

    .venv/bin/python bench/dpo.py [--hidden 256 --layers 4 --steps 30 --epochs 3 --repeats 2]
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import lazarus  # noqa: F401
import mlx.core as mx

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


def run(cls, model_dir, data, steps, tmp):
    mx.random.seed(0)
    policy, tok = load_model(model_dir, use_lora=True)
    reference, _ = load_model(model_dir)
    ds = PreferenceDataset(data, tok)
    cfg = DPOTrainerConfig(max_steps=steps, batch_size=8, learning_rate=1e-4, warmup_steps=0, log_interval=10 ** 6,
                           checkpoint_interval=None, checkpoint_dir=str(tmp), target_reward_margin=None)
    trainer = cls(policy, reference, tok, cfg)
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
    rng = random.Random(0)
    words = "good bad river stone cloud light north south green blue".split()
    rows = [{"prompt": f"Describe item {i}.", "chosen": " ".join(rng.choice(words) for _ in range(rng.randint(8, 40))),
             "rejected": " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))} for i in range(8 * max(1, args.steps // args.epochs))]
    data = tmp / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = {"cached": 0.0, "steady": 0.0, "recompute": 0.0}
    for r in range(args.repeats):
        rc, _ = run(RecomputeReferenceDPO, model_dir, data, args.steps, tmp / f"r{r}")
        ca, steady = run(DPOTrainer, model_dir, data, args.steps, tmp / f"c{r}")
        print(f"repeat {r}: recompute {rc:.2f} steps/s, cached {ca:.2f} steps/s "
              f"({steady:.2f} without the one-off cache pass)", flush=True)
        best = {"cached": max(best["cached"], ca), "steady": max(best["steady"], steady),
                "recompute": max(best["recompute"], rc)}
    print(f"\n| DPO trainer ({args.steps} steps, {args.epochs} epochs) | steps/s | ratio |")
    print("|---|---|---|")
    print(f"| reference forward every step | {best['recompute']:.2f} | 1.00x |")
    print(f"| Lazarus, cached reference (cache pass included) | {best['cached']:.2f} | "
          f"{best['cached'] / best['recompute']:.2f}x |")
    print(f"| Lazarus, cached reference (training steps only) | {best['steady']:.2f} | "
          f"{best['steady'] / best['recompute']:.2f}x |")
    try:
        import mlx_lm_lora  # noqa: F401
        print("mlx_lm_lora is installed: compare with its `mlx_lm_lora.train --train-mode dpo` on the same data.")
    except ImportError:
        print("mlx_lm_lora: not installed in this environment (it pins its own mlx-lm); not compared.")


if __name__ == "__main__":
    sys.exit(main())
