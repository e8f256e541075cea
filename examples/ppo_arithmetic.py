"""PPO on small-number addition with the tiny offline model.

1. Write the tiny model and SFT it on the shipped ``sft_train.jsonl`` until it answers part
   of the questions.
2. PPO (value head on the policy's hidden states, GAE, clipped policy and value losses) on
   ``prompts_train.jsonl`` with an exact-answer reward.
3. Print the reward on the training prompts (sampled, temperature 1) and held-out accuracy on
   ``prompts_eval.jsonl`` before and after PPO.

    python examples/ppo_arithmetic.py            # under a minute on a laptop CPU
    python examples/ppo_arithmetic.py --quick    # a few seconds, checks that everything runs

Measured (Linux CPU, seed 0): reward on the training prompts 0.703 -> 0.752; held-out accuracy
greedy 43.3% -> 43.3%, sampled 32.5% -> 37.9%.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lazarus  # noqa: F401  (sets up the fast CPU path before mlx is imported)

from lazarus.data import PromptDataset
from lazarus.models import create_tiny_model, load_model
from lazarus.training.generation import answer_accuracy
from lazarus.training import PPOConfig, PPOTrainer, SFTConfig, SFTTrainer, exact_match

DATA = Path(lazarus.__file__).parent / "data" / "examples"



def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    ap.add_argument("--output", help="working folder (default: a temporary one)")
    ap.add_argument("--sft-epochs", type=int, default=None, help="SFT epochs (default 120; quick 2)")
    ap.add_argument("--ppo-steps", type=int, default=None, help="PPO optimizer steps (default 600; quick 4)")
    ap.add_argument("--lr", type=float, default=5e-5, help="PPO learning rate (default 5e-5)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sft_epochs = args.sft_epochs or (2 if args.quick else 120)
    ppo_steps = args.ppo_steps or (4 if args.quick else 600)
    samples = 2 if args.quick else 8

    tmp = None
    if args.output:
        out = Path(args.output)
    else:
        tmp = tempfile.TemporaryDirectory()
        out = Path(tmp.name)
    t0 = time.perf_counter()
    try:
        create_tiny_model(out / "model", hidden_size=64, num_layers=2, intermediate_size=128, seed=args.seed)
        model, tok = load_model(out / "model")
        train_prompts = PromptDataset(DATA / "prompts_train.jsonl", tok)
        eval_prompts = PromptDataset(DATA / "prompts_eval.jsonl", tok)

        sft = SFTConfig(num_epochs=sft_epochs, batch_size=8, learning_rate=3e-3, warmup_steps=50,
                        lr_schedule="cosine", checkpoint_interval=None, checkpoint_dir=str(out / "sft"),
                        log_interval=100, seed=args.seed)
        SFTTrainer(model, tok, sft).train(DATA / "sft_train.jsonl")

        def report(when: str) -> dict:
            r = {"train_reward": answer_accuracy(model, tok, train_prompts, samples, args.seed),
                 "heldout_greedy": answer_accuracy(model, tok, eval_prompts),
                 "heldout_sampled": answer_accuracy(model, tok, eval_prompts, samples, args.seed)}
            print(f"{when}: reward on training prompts (sampled) {r['train_reward']:.3f}; held-out accuracy "
                  f"greedy {r['heldout_greedy']:.1%}, sampled {r['heldout_sampled']:.1%}")
            return r

        before = report(f"after SFT ({sft_epochs} epochs)")
        ppo = PPOConfig(batch_size=32, group_size=1, max_completion_length=6, learning_rate=args.lr,
                        warmup_steps=min(50, ppo_steps // 4), ppo_epochs=2, beta=0.01, max_steps=ppo_steps,
                        log_interval=max(1, ppo_steps // 8), checkpoint_interval=None, checkpoint_dir=str(out / "ppo"), seed=args.seed)
        trainer = PPOTrainer(model, tok, ppo, reward_fn=exact_match("answer"))
        result = trainer.train(train_prompts)
        for h in result.history:
            print(f"  PPO step {h['step']:4d}  reward {h['reward']:.3f}  value_loss {h['value_loss']:.4f}  "
                  f"kl {h['kl']:.3f}  clip_ratio {h['clip_ratio']:.3f}")
        after = report(f"after PPO ({ppo_steps} steps)")
        print(f"done in {time.perf_counter() - t0:.0f}s")
        return {"before": before, "after": after, "history": result.history}
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
