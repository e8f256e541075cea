"""A new objective in a few dozen lines: a SLiC-style hinge calibration loss as a Trainer subclass.

SLiC (Zhao et al., 2023, "SLiC-HF") needs no reference model: it asks the chosen response's
sequence log-probability to beat the rejected one's by a margin ``delta`` (a hinge), and keeps
the model close to good text with a cross-entropy term on the chosen response:

    loss = max(0, delta - logp(chosen) + logp(rejected)) + nll_weight * NLL(chosen)

Everything else (batching, compilation, LR schedule, clipping, checkpoints, resume, logging,
early stopping) comes from the Trainer and the Loop; the subclass only writes
``compute_loss(model, batch) -> (loss, metrics)``. The library's own preference objectives (DPO,
ORPO, SimPO, KTO: ``lazarus.training``) are written the same way; see docs/objectives.md.

    python examples/custom_objective.py            # ~25 s on 2 CPU cores
    python examples/custom_objective.py --quick    # a few steps (what the tests run)
"""

import argparse
from pathlib import Path

import mlx.core as mx
from pydantic import Field

import lazarus
from lazarus.data import PreferenceDataset
from lazarus.models import create_tiny_model, load_model
from lazarus.training import Trainer, TrainerConfig
from lazarus.training.base import token_logps

DATA = Path(lazarus.__file__).parent / "data" / "examples"


class SLiCConfig(TrainerConfig):
    delta: float = Field(1.0, ge=0, description="Margin the chosen log-prob must beat the rejected one by")
    nll_weight: float = Field(0.1, ge=0, description="Weight of the chosen responses' cross-entropy")
    learning_rate: float = Field(1e-4, gt=0, description="Learning rate")


class SLiCTrainer(Trainer):
    config_class = SLiCConfig
    dataset_class = PreferenceDataset  # train("prefs.jsonl") builds one; batches hold chosen rows, then rejected

    def compute_loss(self, model, batch):
        mask = batch["mask"]  # 1 on response tokens
        logps = (token_logps(model, batch["inputs"], batch["targets"]) * mask).sum(-1)  # per response
        n = logps.shape[0] // 2
        chosen, rejected = logps[:n], logps[n:]
        hinge = mx.maximum(0.0, self.config.delta - (chosen - rejected)).mean()
        nll = -chosen.sum() / mx.maximum(mask[:n].sum(), 1.0)  # mean over the chosen tokens
        margin = chosen - rejected
        return hinge + self.config.nll_weight * nll, {
            "rewards/margins": margin.mean(), "rewards/accuracies": (margin > 0).astype(mx.float32).mean(),
            "hinge_loss": hinge, "nll_loss": nll}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/example_slic")
    parser.add_argument("--quick", action="store_true", help="a few steps only")
    args = parser.parse_args()
    out = Path(args.output)
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        create_tiny_model(model_dir)
    model, tok = load_model(model_dir)

    steps = 8 if args.quick else 300
    config = SLiCConfig(delta=1.0, nll_weight=0.1, max_steps=steps, batch_size=16, learning_rate=1e-3,
                        warmup_steps=0, log_interval=max(steps // 10, 1), checkpoint_interval=None,
                        checkpoint_dir=str(out / "checkpoints"))
    result = SLiCTrainer(model, tok, config).train(DATA / "preferences.jsonl")
    for h in result.history:
        print(f"step {h['step']:>4}: loss {h['loss']:.4f}  margin {h['rewards/margins']:.3f}  "
              f"accuracy {h['rewards/accuracies']:.2f}")
    print(f"stopped: {result.stop_reason}; checkpoints in {result.checkpoint_dir}")


if __name__ == "__main__":
    main()
