"""DPO with the Python API: a short SFT warm start, then preference optimisation against a
frozen reference copy of the SFT model.

    python examples/dpo.py             # ~1 minute on 2 CPU cores
    python examples/dpo.py --quick     # a few steps (what the tests run)
    python examples/dpo.py --lora      # DPO trains LoRA adapters; the reference is the same model
                                       # with its adapters disabled (no second copy of the weights)
"""

import argparse
from pathlib import Path

import lazarus
from lazarus.callbacks import EarlyStopping, TensorBoardLogger
from lazarus.data import PreferenceDataset, SFTDataset
from lazarus.models import LoRASettings, apply_lora, create_tiny_model, load_model
from lazarus.training import DPOConfig, DPOTrainer, DPOTrainerConfig, SFTConfig, SFTTrainer

DATA = Path(lazarus.__file__).parent / "data" / "examples"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/example_dpo")
    parser.add_argument("--quick", action="store_true", help="a few steps only")
    parser.add_argument("--lora", action="store_true", help="DPO on LoRA adapters")
    args = parser.parse_args()
    out = Path(args.output)
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        create_tiny_model(model_dir)

    # 1. SFT warm start (DPO works on a model that already answers in the right format)
    model, tok = load_model(model_dir)
    sft_steps = 10 if args.quick else 600
    sft = SFTTrainer(model, tok, SFTConfig(max_steps=sft_steps, batch_size=16, learning_rate=2e-3, weight_decay=1.0,
                                           warmup_steps=sft_steps // 10, lr_schedule="cosine",
                                           log_interval=max(sft_steps // 10, 1), checkpoint_interval=None,
                                           checkpoint_dir=str(out / "sft")))
    sft_ckpt = Path(sft.train(SFTDataset(DATA / "sft_train.jsonl", tok)).checkpoint_dir) / "final.safetensors"

    # 2. policy and frozen reference, both starting from the SFT weights
    if args.lora:
        policy, tok = load_model(model_dir)
        policy.load_weights(str(sft_ckpt))               # the SFT weights become the frozen base ...
        apply_lora(policy, LoRASettings(rank=8, base_model=str(model_dir)))  # ... under new adapters
        reference = None                                  # = policy with adapters disabled
    else:
        policy, tok = load_model(model_dir)
        reference, _ = load_model(model_dir)
        policy.load_weights(str(sft_ckpt))
        reference.load_weights(str(sft_ckpt))

    prefs = PreferenceDataset(DATA / "preferences.jsonl", tok)  # {"prompt", "chosen", "rejected"}
    steps = 6 if args.quick else 150
    config = DPOTrainerConfig(dpo=DPOConfig(beta=0.1), learning_rate=2e-4 if args.lora else 5e-5, max_steps=steps,
                              batch_size=16, warmup_steps=0, log_interval=max(steps // 10, 1),
                              checkpoint_interval=None, checkpoint_dir=str(out / "dpo"))
    trainer = DPOTrainer(policy, reference, tok, config,
                         callbacks=[EarlyStopping(target_reward_margin=2.0), TensorBoardLogger(out / "tb")])
    result = trainer.train(prefs)

    for h in result.history:
        if "rewards/margins" in h:
            print(f"step {h['step']:>4}: loss {h['loss']:.4f}  margin {h['rewards/margins']:.3f}  "
                  f"accuracy {h['rewards/accuracies']:.2f}")
    print(f"stopped: {result.stop_reason}; checkpoints in {result.checkpoint_dir}")


if __name__ == "__main__":
    main()
