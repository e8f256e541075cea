"""Run by tests/test_objectives.py alone or under `lazarus.launch -n 2`: short runs of the newer
objectives (the global batch is split across the ranks; KTO's KL estimate needs a collective).

usage: distributed_objectives.py MODEL_DIR OUT_DIR NAME=DATA [NAME=DATA ...]   (NAME: dpo, kto, orpo, simpo, reward)
Writes OUT_DIR/{NAME}_rank{R}.json with the logged history and a digest of the trained weights.
"""

import hashlib
import json
import os
import sys

import lazarus  # noqa: F401
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from lazarus.models import load_model
from lazarus.training import (DPOTrainer, DPOTrainerConfig, KTOConfig, KTOTrainer, ORPOConfig, ORPOTrainer, RewardConfig, RewardTrainer,
                              SimPOConfig, SimPOTrainer)

TRAINERS = {"dpo": (DPOTrainer, DPOTrainerConfig), "kto": (KTOTrainer, KTOConfig), "orpo": (ORPOTrainer, ORPOConfig), "simpo": (SimPOTrainer, SimPOConfig),
            "reward": (RewardTrainer, RewardConfig)}
KEEP = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
        "nll_loss", "log_odds_ratio", "accuracy", "margin", "mean_reward")


def main():
    model_dir, out = sys.argv[1:3]
    rank = mx.distributed.init().rank()
    for spec in sys.argv[3:]:
        name, data = spec.split("=", 1)
        trainer_class, config_class = TRAINERS[name]
        model, tok = load_model(model_dir)
        cfg = config_class(max_steps=3, batch_size=8, learning_rate=1e-3, warmup_steps=0, log_interval=1,
                           fast_cpu_kernels=False, checkpoint_interval=None,
                           checkpoint_dir=os.path.join(out, f"{name}_ck{rank}"))
        trainer = trainer_class(model=model, tokenizer=tok, config=cfg)
        result = trainer.train(data)
        # DPO and KTO: the reference cache (each rank computes a share; all must end with all of it)
        ref_cache = trainer.ref_cache["train"].tolist() if hasattr(trainer, "ref_cache") else None
        w = {k: np.array(v) for k, v in tree_flatten(result.state.model.trainable_parameters())}
        digest = hashlib.sha256(b"".join(w[k].tobytes() for k in sorted(w))).hexdigest()
        with open(os.path.join(out, f"{name}_rank{rank}.json"), "w") as f:
            json.dump({"digest": digest, "world": result.state.world_size, "ref_cache": ref_cache,
                       "history": [{k: h[k] for k in KEEP if k in h} for h in result.history]}, f)


if __name__ == "__main__":
    sys.exit(main())
