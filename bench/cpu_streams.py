"""CPU streams: SFT with each batch split across 2 concurrent CPU streams vs 1 stream.

Same model and data as bench/sft_vs_mlx_lm.py (hidden 512, 8 blocks, LoRA rank 8, response
lengths spread over 10x). Runs `--epochs` epochs and reports the first epoch (where every new
batch shape is traced and compiled, which costs more with two streams) and the later epochs
(steady state: every shape already compiled) separately. Runs alternate; best of `--repeats`.

    .venv/bin/python bench/cpu_streams.py [--examples 96 --epochs 3 --repeats 2]
    .venv/bin/python bench/cpu_streams.py --memory   # one epoch each: cpu_streams 1/2 x grad_checkpoint off/on
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import sft_vs_mlx_lm as sft  # noqa: E402  (imports lazarus first: BLAS fast path)

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402

from lazarus.callbacks import Callback, Checkpoint  # noqa: E402
from lazarus.data import SFTDataset  # noqa: E402
from lazarus.models import create_tiny_model, load_model  # noqa: E402
from lazarus.training import SFTConfig, SFTTrainer  # noqa: E402


class EpochTimer(Callback):
    def __init__(self):
        self.starts, self.ends, self.tokens = [], [], []

    def on_epoch_start(self, state):
        self.starts.append(time.perf_counter())
        self._tokens0 = state.tokens_seen

    def on_epoch_end(self, state):
        self.ends.append(time.perf_counter())
        self.tokens.append(state.tokens_seen - self._tokens0)


def run(model_dir, data, streams, epochs, ckdir):
    mx.random.seed(0)
    model, tok = load_model(model_dir, use_lora=True, lora_rank=8)
    cfg = SFTConfig(num_epochs=epochs, batch_size=8, learning_rate=1e-4, warmup_steps=0, max_grad_norm=None,
                    checkpoint_interval=None, checkpoint_dir=str(ckdir), log_interval=10 ** 6, cpu_streams=streams)
    timer = EpochTimer()
    trainer = SFTTrainer(model, tok, cfg, callbacks=[Checkpoint(ckdir, interval=None, save_best=False), timer])
    trainer.make_optimizer = lambda: optim.Adam(learning_rate=1e-4)
    trainer.train(SFTDataset(data, tok))
    first = timer.tokens[0] / (timer.ends[0] - timer.starts[0])
    later = sum(timer.tokens[1:]) / sum(e - s for s, e in zip(timer.starts[1:], timer.ends[1:]))
    return first, later


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="peak memory of cpu_streams 1/2 with and without grad_checkpoint")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    model_dir = create_tiny_model(tmp / "model", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                                  intermediate_size=1024, extra_texts=[" ".join(sft.WORDS)] * 200)
    data = sft.make_data(tmp / "data.jsonl", args.examples, variable=True)
    if args.memory:
        print("| one epoch, variable data | target tok/s | peak memory GB |\n|---|---|---|")
        for streams in (1, 2):
            for gc in (False, True):
                dt, targets, peak, _ = sft.run_lazarus(model_dir, data, 8, 1e-4, tmp / f"m{streams}{gc}",
                                                       grad_checkpoint=gc, cpu_streams=streams)
                print(f"| cpu_streams {streams}, grad_checkpoint {str(gc).lower()} | {targets / dt:.0f} | {peak:.3f} |",
                      flush=True)
        return
    best = {1: (0.0, 0.0), 2: (0.0, 0.0)}
    for r in range(args.repeats):
        for streams in (1, 2):
            first, later = run(model_dir, data, streams, args.epochs, tmp / f"ck{r}{streams}")
            print(f"  repeat {r}, cpu_streams {streams}: epoch 1 {first:.0f} tok/s, later epochs {later:.0f} tok/s",
                  flush=True)
            best[streams] = (max(best[streams][0], first), max(best[streams][1], later))
    print("\n| target tokens/s (best of %d) | cpu_streams: 1 | cpu_streams: 2 | ratio |" % args.repeats)
    print("|---|---|---|---|")
    for i, name in enumerate(("epoch 1 (compiling every shape)", f"epochs 2-{args.epochs} (steady state)")):
        print(f"| {name} | {best[1][i]:.0f} | {best[2][i]:.0f} | {best[2][i] / best[1][i]:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
