"""Run by tests/test_objectives.py alone or under `lazarus.launch -n 2`: a short KTO run whose KL
estimate and metrics need a collective (the global batch is split across the ranks).

usage: distributed_kto.py MODEL_DIR DATA OUT_DIR
Writes OUT_DIR/kto_rank{R}.json with the logged history and a digest of the trained weights.
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
from lazarus.training import KTOConfig, KTOTrainer


def main():
    model_dir, data, out = sys.argv[1:4]
    rank = mx.distributed.init().rank()
    model, tok = load_model(model_dir)
    cfg = KTOConfig(max_steps=3, batch_size=8, learning_rate=1e-3, warmup_steps=0, log_interval=1, fast_cpu_kernels=False,
                    checkpoint_interval=None, checkpoint_dir=os.path.join(out, f"ck{rank}"))
    result = KTOTrainer(model, None, tok, cfg).train(data)
    w = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    digest = hashlib.sha256(b"".join(w[k].tobytes() for k in sorted(w))).hexdigest()
    keep = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
    with open(os.path.join(out, f"kto_rank{rank}.json"), "w") as f:
        json.dump({"digest": digest, "world": result.state.world_size,
                   "history": [{k: h[k] for k in keep if k in h} for h in result.history]}, f)


if __name__ == "__main__":
    sys.exit(main())
