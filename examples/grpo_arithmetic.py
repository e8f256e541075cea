"""GRPO on small-number addition with the tiny offline model.

1. Write the tiny model (random weights, shipped tokenizer) and SFT it on the shipped
   ``sft_train.jsonl`` ("What is 7+3?" -> "10") until it answers part of the questions.
2. GRPO on ``prompts_train.jsonl`` with an exact-answer reward.
3. Print held-out accuracy on ``prompts_eval.jsonl`` (pairs never seen in training) before and
   after GRPO: greedy, and sampled (temperature 1, several samples per question).

    python examples/grpo_arithmetic.py            # under a minute on a laptop CPU
    python examples/grpo_arithmetic.py --quick    # a few seconds, checks that everything runs

Measured (Linux CPU, seed 0): after SFT held-out accuracy greedy 43.3%, sampled 32.5%; after
600 GRPO steps greedy 46.7%, sampled 40.0% (mean training reward 0.67 -> 0.77). GRPO mostly
sharpens what SFT taught: the sampled accuracy rises towards the greedy one. How well the tiny
model's SFT generalises to unseen pairs varies a lot with the seed (and platform); when SFT
has not generalised, GRPO on the training prompts cannot add much on held-out questions.
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
from lazarus.training import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer, exact_match

DATA = Path(lazarus.__file__).parent / "data" / "examples"



def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    ap.add_argument("--output", help="working folder (default: a temporary one)")
    ap.add_argument("--sft-epochs", type=int, default=None, help="SFT epochs (default 120; quick 2)")
    ap.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps (default 600; quick 3)")
    ap.add_argument("--sft-examples", type=int, default=None, help="SFT on only the first N training pairs "
                    "(GRPO still sees every training prompt, with the answers only as rewards)")
    ap.add_argument("--lr", type=float, default=1e-4, help="GRPO learning rate (default 1e-4)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sft_epochs = args.sft_epochs or (2 if args.quick else 120)
    grpo_steps = args.grpo_steps or (3 if args.quick else 600)
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
        eval_prompts = PromptDataset(DATA / "prompts_eval.jsonl", tok)

        sft = SFTConfig(num_epochs=sft_epochs, batch_size=8, learning_rate=3e-3, warmup_steps=50,
                        lr_schedule="cosine", checkpoint_interval=None, checkpoint_dir=str(out / "sft"),
                        log_interval=100, seed=args.seed)
        lines = (DATA / "sft_train.jsonl").read_text().splitlines()[: args.sft_examples]
        (out / "sft_subset.jsonl").write_text("\n".join(lines) + "\n")
        sft_result = SFTTrainer(model, tok, sft).train(out / "sft_subset.jsonl")
        before = {"greedy": answer_accuracy(model, tok, eval_prompts),
                  "sampled": answer_accuracy(model, tok, eval_prompts, samples, args.seed)}
        print(f"after SFT ({sft_epochs} epochs, loss {sft_result.history[-1]['loss']:.3f}): held-out accuracy "
              f"greedy {before['greedy']:.1%}, sampled {before['sampled']:.1%}")

        grpo = GRPOConfig(group_size=8, batch_size=8, max_completion_length=6, learning_rate=args.lr,
                          max_steps=grpo_steps, log_interval=max(1, grpo_steps // 8), checkpoint_interval=None,
                          checkpoint_dir=str(out / "grpo"), seed=args.seed)
        trainer = GRPOTrainer(model, tok, grpo, reward_fn=exact_match("answer"))
        result = trainer.train(DATA / "prompts_train.jsonl")
        for h in result.history:
            print(f"  GRPO step {h['step']:4d}  reward {h['reward']:.3f}  "
                  f"zero-std groups {h['frac_reward_zero_std']:.2f}  rollout time {h['timing/rollout_share']:.0%}")
        after = {"greedy": answer_accuracy(model, tok, eval_prompts),
                 "sampled": answer_accuracy(model, tok, eval_prompts, samples, args.seed)}
        print(f"after GRPO ({grpo_steps} steps): held-out accuracy greedy {after['greedy']:.1%}, "
              f"sampled {after['sampled']:.1%}")
        print(f"done in {time.perf_counter() - t0:.0f}s")
        return {"before": before, "after": after, "history": result.history}
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
