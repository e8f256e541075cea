"""A new objective in a few dozen lines: SimPO (Meng et al., 2024) as a Trainer subclass.

SimPO needs no reference model: its implicit reward is the policy's *length-normalised*
log-probability of a response, and the loss asks the chosen reward to beat the rejected one
by a target margin ``gamma``:

    loss = -log sigmoid( beta * (avg_logp(chosen) - avg_logp(rejected)) - gamma )

Everything else (batching, compilation, LR schedule, clipping, checkpoints, resume, logging,
early stopping) comes from the Trainer and the Loop; the subclass only writes
``compute_loss(model, batch) -> (loss, metrics)``.

    python examples/custom_objective.py            # ~30 s on 2 CPU cores
    python examples/custom_objective.py --quick    # a few steps (what the tests run)
"""

import argparse
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from pydantic import Field

import lazarus
from lazarus.data import PreferenceDataset
from lazarus.models import create_tiny_model, load_model
from lazarus.training import Trainer, TrainerConfig
from lazarus.training.base import token_logps

DATA = Path(lazarus.__file__).parent / "data" / "examples"


class SimPOConfig(TrainerConfig):
    beta: float = Field(2.0, gt=0, description="Scale of the length-normalised reward")
    gamma: float = Field(0.5, ge=0, description="Target reward margin")
    learning_rate: float = Field(1e-4, gt=0, description="Learning rate")


class SimPOTrainer(Trainer):
    config_class = SimPOConfig
    dataset_class = PreferenceDataset  # train("prefs.jsonl") builds one; batches hold chosen rows, then rejected

    def compute_loss(self, model, batch):
        logps = token_logps(model, batch["inputs"], batch["targets"]) * batch["mask"]
        avg = logps.sum(-1) / mx.maximum(batch["mask"].sum(-1), 1.0)  # mean log-prob per response token
        n = avg.shape[0] // 2
        chosen, rejected = avg[:n], avg[n:]
        c = self.config
        margin = c.beta * (chosen - rejected)
        loss = -nn.log_sigmoid(margin - c.gamma).mean()
        return loss, {"rewards/margins": margin.mean(), "rewards/accuracies": (margin > 0).astype(mx.float32).mean(),
                      "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/example_simpo")
    parser.add_argument("--quick", action="store_true", help="a few steps only")
    args = parser.parse_args()
    out = Path(args.output)
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        create_tiny_model(model_dir)
    model, tok = load_model(model_dir)

    steps = 8 if args.quick else 300
    config = SimPOConfig(beta=2.0, gamma=0.5, max_steps=steps, batch_size=16, learning_rate=1e-3, warmup_steps=0,
                         log_interval=max(steps // 10, 1), checkpoint_interval=None,
                         checkpoint_dir=str(out / "checkpoints"))
    result = SimPOTrainer(model, tok, config).train(DATA / "preferences.jsonl")
    for h in result.history:
        print(f"step {h['step']:>4}: loss {h['loss']:.4f}  margin {h['rewards/margins']:.3f}  "
              f"accuracy {h['rewards/accuracies']:.2f}")
    print(f"stopped: {result.stop_reason}; checkpoints in {result.checkpoint_dir}")


if __name__ == "__main__":
    main()
