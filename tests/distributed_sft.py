"""Run by tests/test_distributed.py, alone or under `mlx.launch -n 2 --backend ring`.

usage: distributed_sft.py MODEL_DIR DATA OUT_DIR MAX_STEPS [--resume PATH] [--stop-at N] [--fail-rank R]
Writes OUT_DIR/result_rank{R}.json with the losses and a digest of the weights.
"""

import argparse
import hashlib
import json
import os
import sys

import lazarus  # noqa: F401
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from lazarus.callbacks import Callback, TensorBoardLogger
from lazarus.data import SFTDataset
from lazarus.models import load_model
from lazarus.training import SFTConfig, SFTTrainer


class StopOrFail(Callback):
    def __init__(self, stop_at, fail_rank):
        self.stop_at, self.fail_rank = stop_at, fail_rank

    def on_step_end(self, state):
        if self.fail_rank is not None and state.rank == self.fail_rank and state.step + 1 == 2:
            raise RuntimeError(f"rank {state.rank} failed on purpose")
        if self.stop_at and state.step + 1 == self.stop_at:
            state.request_stop("stop for test")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model"), ap.add_argument("data"), ap.add_argument("out"), ap.add_argument("max_steps", type=int)
    ap.add_argument("--resume"), ap.add_argument("--stop-at", type=int), ap.add_argument("--fail-rank", type=int)
    args = ap.parse_args()
    rank = mx.distributed.init().rank()
    # per-rank output folders, so the test can check that only rank 0 wrote anything
    out = os.path.join(args.out, f"rank{rank}")
    mx.random.seed(0)
    model, tok = load_model(args.model, use_lora=True, lora_rank=4)
    ds = SFTDataset(args.data, tok)
    cfg = SFTConfig(max_steps=args.max_steps, batch_size=8, learning_rate=1e-3, warmup_steps=2, log_interval=1,
                    checkpoint_dir=os.path.join(out, "ck"), checkpoint_interval=args.stop_at or 1000, compile=not os.environ.get("NOCOMPILE"))
    cbs = [StopOrFail(args.stop_at, args.fail_rank), TensorBoardLogger(os.path.join(out, "tb"))]
    result = SFTTrainer(model, tok, cfg, callbacks=cbs).train(ds, resume_from=args.resume)
    weights = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    digest = hashlib.sha256(b"".join(weights[k].tobytes() for k in sorted(weights))).hexdigest()
    with open(os.path.join(args.out, f"result_rank{rank}.json"), "w") as f:
        json.dump({"losses": [h["loss"] for h in result.history if "loss" in h], "gn": [h.get("grad_norm") for h in result.history], "lr": [h.get("lr") for h in result.history], "digest": digest,
                   "world": mx.distributed.init().size(), "stop_reason": result.stop_reason,
                   "sample": weights[sorted(weights)[0]].ravel()[:8].tolist()}, f)


if __name__ == "__main__":
    sys.exit(main())
