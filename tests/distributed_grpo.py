"""Run by tests/test_distributed.py under `lazarus.launch -n 2`: a short GRPO run.

usage: distributed_grpo.py MODEL_DIR PROMPTS OUT_DIR
"""

import hashlib
import json
import os
import sys

import lazarus  # noqa: F401
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from lazarus.data import PromptDataset
from lazarus.models import load_model
from lazarus.training.grpo import GRPOConfig, GRPOTrainer


def main():
    model_dir, prompts, out = sys.argv[1:4]
    rank = mx.distributed.init().rank()
    mx.random.seed(0)
    model, tok = load_model(model_dir, use_lora=True, lora_rank=4)
    seen = []

    def reward(prompts, completions, answer, **_):
        seen.extend(prompts)
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    cfg = GRPOConfig(max_steps=3, batch_size=4, group_size=2, max_completion_length=6, learning_rate=1e-3,
                     log_interval=1, checkpoint_interval=None, checkpoint_dir=os.path.join(out, f"ck{rank}"))
    result = GRPOTrainer(model, tok, cfg, reward_fn=reward).train(PromptDataset(prompts, tok))
    w = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    digest = hashlib.sha256(b"".join(w[k].tobytes() for k in sorted(w))).hexdigest()
    with open(os.path.join(out, f"grpo_rank{rank}.json"), "w") as f:
        json.dump({"digest": digest, "prompts": seen, "losses": [h["loss"] for h in result.history],
                   "rewards": [h["reward"] for h in result.history],  # means over both ranks: equal on both
                   "steps": result.state.step}, f)


if __name__ == "__main__":
    sys.exit(main())
