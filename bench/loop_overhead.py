"""Cost of the Loop and the full default callback stack over a bare compiled step.

Same tiny model, same pre-collated batches, same optimizer: (a) a hand-written
``mx.compile``d step (value_and_grad + AdamW update, one mx.eval per step); (b) the Loop with
LRSchedule, GradientClipping, TerminateOnNaN, EarlyStopping, Checkpoint (no writes in the
timed window) and a quiet ProgressBar. Prints the ratio; target: (b)/(a) <= 1.03.

    .venv/bin/python bench/loop_overhead.py [--steps 200] [--repeats 3]
"""

import argparse
import tempfile
import time
from functools import partial

import lazarus  # noqa: F401  (BLAS fast path first)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from lazarus import Loop
from lazarus.callbacks import (Checkpoint, EarlyStopping, GradientClipping, LRSchedule, ProgressBar,
                               TerminateOnNaN)
from lazarus.data import SFTDataset
from lazarus.models import create_tiny_model, load_model
from lazarus.models.tiny import EXAMPLES
from lazarus.training.sft import SFTTrainer


class Fixed:
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def get_batch(self, epoch, i):
        return self.batches[i]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp()
    create_tiny_model(f"{tmp}/m")
    _, tok = load_model(f"{tmp}/m")
    ds = SFTDataset(EXAMPLES / "sft_train.jsonl", tok)
    idx = list(range(len(ds)))
    # equal-shape batches so neither side recompiles inside the timed window
    batches = [ds.collate(idx[i:i + 8], pad_multiple=32) for i in range(0, 64, 8)]
    loss_fn = SFTTrainer.compute_loss.__get__(object.__new__(SFTTrainer))

    def bare(model, same_math=False):
        opt = optim.AdamW(learning_rate=LRSchedule(10, "cosine", total_steps=args.steps + 5, base_lr=1e-4).lr_at
                          if same_math else 1e-4)
        opt.init(model.trainable_parameters())
        state = [model.state, opt.state, mx.random.state]
        vg = nn.value_and_grad(model, loss_fn)

        @partial(mx.compile, inputs=state, outputs=state)
        def step(b):
            (loss, _), grads = vg(model, b)
            if same_math:
                grads, norm = optim.clip_grad_norm(grads, 1.0)
                opt.update(model, grads)
                return loss, norm
            opt.update(model, grads)
            return loss

        arrays = [{k: v for k, v in b.items() if isinstance(v, mx.array)} for b in batches]
        for i in range(5):
            mx.eval(step(arrays[i % len(arrays)]), state)
        t = time.perf_counter()
        for i in range(args.steps):
            mx.eval(step(arrays[i % len(arrays)]), state)
        return time.perf_counter() - t

    def with_loop(model):
        cbs = [LRSchedule(10, "cosine"), GradientClipping(1.0), TerminateOnNaN(), EarlyStopping(monitor="loss", patience=10**6),
               Checkpoint(f"{tmp}/ck", interval=None, save_best=False, save_final=False), ProgressBar()]
        loop = Loop(model, optim.AdamW(learning_rate=1e-4), loss_fn, Fixed(batches), callbacks=cbs,
                    max_steps=args.steps + 5, num_epochs=None, log_interval=10, handle_signals=False)
        times = {}

        class Clock(lazarus.callbacks.Callback):
            def on_step_end(self, state):
                if state.step + 1 == 5:
                    times["t0"] = time.perf_counter()

            def on_fit_end(self, state):
                times["t1"] = time.perf_counter()

        loop.callbacks.append(Clock())
        loop.fit()
        return times["t1"] - times["t0"]

    rows = []
    for r in range(args.repeats):
        m1, _ = load_model(f"{tmp}/m", use_lora=True)
        a = bare(m1)
        m3, _ = load_model(f"{tmp}/m", use_lora=True)
        c = bare(m3, same_math=True)
        m2, _ = load_model(f"{tmp}/m", use_lora=True)
        b = with_loop(m2)
        rows.append((a, c, b))
        print(f"repeat {r}: bare {args.steps / a:.1f} steps/s, bare+clip+schedule {args.steps / c:.1f} steps/s, "
              f"loop+callbacks {args.steps / b:.1f} steps/s", flush=True)
    best_a, best_c, best_b = (min(r[i] for r in rows) for i in range(3))
    print("\n| measure | bare compiled step | bare + clip + LR schedule | Loop + default callbacks |")
    print("|---|---|---|---|")
    print(f"| steps/s (best of {args.repeats}) | {args.steps / best_a:.1f} | {args.steps / best_c:.1f} | "
          f"{args.steps / best_b:.1f} |")
    print(f"| time ratio vs bare | 1.000 | {best_c / best_a:.3f} | {best_b / best_a:.3f} |")
    print(f"| time ratio vs bare + same math | | 1.000 | {best_b / best_c:.3f} |")
    print(f"target: full stack <= 1.03 x bare -> {'PASS' if best_b / best_a <= 1.03 else 'MISS'}")


if __name__ == "__main__":
    main()
