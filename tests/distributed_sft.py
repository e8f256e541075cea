"""Run by tests/test_distributed.py, alone or under `mlx.launch -n 2 --backend ring`.

usage: distributed_sft.py MODEL_DIR DATA OUT_DIR MAX_STEPS [--resume PATH] [--stop-at N] [--fail-rank R]
                          [--no-seed] [--perturb-per-rank] [--desync-at N] [--checkpoint-interval N]
                          [--step-sleep S] [--packing]
Writes OUT_DIR/result_rank{R}.json with the losses, a digest of the weights at the end and one at
every checkpoint. --no-seed leaves MLX's clock-seeded RNG alone; --perturb-per-rank gives each
rank different starting weights (as a clock-seeded init would); --desync-at N changes rank 1's
weights after step N (the next checkpoint must refuse to go on). --step-sleep S slows every step
down and writes OUT_DIR/pid_rank{R} after the first one (for tests that kill a rank).
"""

import argparse
import hashlib
import json
import os
import sys
import time

import lazarus  # noqa: F401
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from lazarus.callbacks import Callback, TensorBoardLogger
from lazarus.data import SFTDataset
from lazarus.models import load_model
from lazarus.training import SFTConfig, SFTTrainer


def digest(model):
    weights = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    return hashlib.sha256(b"".join(weights[k].tobytes() for k in sorted(weights))).hexdigest()


class RecordDigests(Callback):
    """The trainable weights' digest at every checkpoint (before it is written) and at the end."""

    def __init__(self, desync_at):
        self.digests, self.desync_at = {}, desync_at

    def on_step_end(self, state):
        if state.rank == 1 and state.step + 1 == self.desync_at:
            params = tree_flatten(state.model.trainable_parameters())
            state.model.update(tree_unflatten([(k, v + 1e-3) for k, v in params]))

    def on_checkpoint(self, state):
        self.digests[f"step_{state.step}"] = digest(state.model)

    def on_fit_end(self, state):
        self.digests["final"] = digest(state.model)


class StopOrFail(Callback):
    def __init__(self, stop_at, fail_rank):
        self.stop_at, self.fail_rank = stop_at, fail_rank

    def on_step_end(self, state):
        if self.fail_rank is not None and state.rank == self.fail_rank and state.step + 1 == 2:
            raise RuntimeError(f"rank {state.rank} failed on purpose")
        if self.stop_at and state.step + 1 == self.stop_at:
            state.request_stop("stop for test")


class Pace(Callback):
    def __init__(self, sleep, out):
        self.sleep, self.out = sleep, out

    def on_step_end(self, state):
        if state.step == 0:
            with open(os.path.join(self.out, f"pid_rank{state.rank}"), "w") as f:
                f.write(str(os.getpid()))
        time.sleep(self.sleep)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model"), ap.add_argument("data"), ap.add_argument("out"), ap.add_argument("max_steps", type=int)
    ap.add_argument("--resume"), ap.add_argument("--stop-at", type=int), ap.add_argument("--fail-rank", type=int)
    ap.add_argument("--no-seed", action="store_true"), ap.add_argument("--perturb-per-rank", action="store_true")
    ap.add_argument("--desync-at", type=int), ap.add_argument("--checkpoint-interval", type=int)
    ap.add_argument("--step-sleep", type=float), ap.add_argument("--packing", action="store_true")
    args = ap.parse_args()
    rank = mx.distributed.init().rank()
    # per-rank output folders, so the test can check that only rank 0 wrote anything
    out = os.path.join(args.out, f"rank{rank}")
    if not args.no_seed:
        mx.random.seed(0)
    model, tok = load_model(args.model, use_lora=True, lora_rank=4)
    if args.perturb_per_rank:
        rng = np.random.default_rng(rank)
        model.update(tree_unflatten([(k, v + mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
                                     for k, v in tree_flatten(model.trainable_parameters())]))
    ds = SFTDataset(args.data, tok)
    cfg = SFTConfig(max_steps=args.max_steps, batch_size=8, learning_rate=1e-3, warmup_steps=2, log_interval=1,
                    checkpoint_dir=os.path.join(out, "ck"),
                    checkpoint_interval=args.checkpoint_interval or args.stop_at or 1000,
                    compile=not os.environ.get("NOCOMPILE"), packing=args.packing)
    recorder = RecordDigests(args.desync_at)
    cbs = [StopOrFail(args.stop_at, args.fail_rank), TensorBoardLogger(os.path.join(out, "tb")), recorder]
    if args.step_sleep:
        cbs.append(Pace(args.step_sleep, args.out))
    result = SFTTrainer(model, tok, cfg, callbacks=cbs).train(ds, resume_from=args.resume)
    weights = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    with open(os.path.join(args.out, f"result_rank{rank}.json"), "w") as f:
        json.dump({"losses": [h["loss"] for h in result.history if "loss" in h], "gn": [h.get("grad_norm") for h in result.history], "lr": [h.get("lr") for h in result.history], "digest": digest(model),
                   "checkpoint_digests": recorder.digests,
                   "world": mx.distributed.init().size(), "stop_reason": result.stop_reason,
                   "sample": weights[sorted(weights)[0]].ravel()[:8].tolist()}, f)


if __name__ == "__main__":
    sys.exit(main())
