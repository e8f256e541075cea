"""Supervised fine-tuning with the Python API, on the tiny offline model.

    python examples/sft.py                 # about a minute on 2 CPU cores
    python examples/sft.py --quick         # a few steps (what the tests run)
    python examples/sft.py --lora          # train LoRA adapters instead of all weights

Builds the tiny model into OUTPUT/model, trains it to add ("What is 7+5?" -> "12") and answers
a few held-out questions with the final checkpoint.
"""

import argparse
import json
from pathlib import Path

import lazarus
from lazarus.callbacks import TensorBoardLogger
from lazarus.data import SFTDataset
from lazarus.models import create_tiny_model, load_model
from lazarus.training import SFTConfig, SFTTrainer

DATA = Path(lazarus.__file__).parent / "data" / "examples"


def answer(model, tokenizer, question: str) -> str:
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return generate(model, tokenizer, prompt=prompt, max_tokens=6, sampler=make_sampler(temp=0.0))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/example_sft")
    parser.add_argument("--quick", action="store_true", help="a few steps only")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (rank 8) instead of all weights")
    args = parser.parse_args()
    out = Path(args.output)

    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        create_tiny_model(model_dir)
    model, tokenizer = load_model(model_dir, use_lora=args.lora)

    train = SFTDataset(DATA / "sft_train.jsonl", tokenizer)  # {"prompt": ..., "response": ...} per line
    held_out = SFTDataset(DATA / "sft_eval.jsonl", tokenizer)

    steps = 20 if args.quick else 1200
    config = SFTConfig(
        max_steps=steps,
        batch_size=16,
        learning_rate=2e-3,          # a tiny random-init model wants a large rate; 1e-5 suits real models
        weight_decay=1.0,            # pushes the model from memorising sums towards adding
        warmup_steps=steps // 10,
        lr_schedule="cosine",
        log_interval=max(steps // 20, 1),
        eval_interval=max(steps // 4, 1),
        checkpoint_interval=max(steps // 2, 1),
        checkpoint_dir=str(out / "checkpoints"),
    )
    trainer = SFTTrainer(model, tokenizer, config, callbacks=[TensorBoardLogger(out / "tb")])
    result = trainer.train(train, eval_dataset=held_out)

    evals = [h for h in result.history if "eval/loss" in h]
    print(f"stopped: {result.stop_reason}")
    print("eval loss by step: " + ", ".join(f"{h['step']}: {h['eval/loss']:.3f}" for h in evals))
    trainer.load_checkpoint(Path(result.checkpoint_dir) / "final.safetensors")
    rows = [json.loads(line) for line in (DATA / "sft_eval.jsonl").read_text().splitlines()[:5]]
    for r in rows:
        print(f"  {r['prompt']} -> {answer(model, tokenizer, r['prompt'])!r} (expected {r['response']!r})")
    print(f"checkpoints in {result.checkpoint_dir}; tensorboard --logdir {out / 'tb'}")
    if args.lora:
        print(f"adapters: mlx_lm.generate --model {model_dir} --adapter-path {result.checkpoint_dir} --prompt '...'")


if __name__ == "__main__":
    main()
