"""SFT packing vs length bucketing: target tokens per second and padding, same process.

The data, model and LoRA of ``bench/sft_vs_mlx_lm.py`` (responses of 12-120 words: a 10x spread;
llama hidden 512, 8 blocks; LoRA rank 8 on every linear), Adam at a constant LR, Lazarus defaults
(``fast_cpu_kernels: auto``, ``cpu_streams`` auto), compile time included. Runs alternate
(bucketed, packed, packed with fewer rows, ...) and the best of ``--repeats`` is kept for each.

- bucketed: ``packing: false``, ``batch_size`` examples per step, batches sorted by length in
  chunks and padded to a multiple of 8 (the default);
- packed: ``packing: true``, ``batch_size`` rows per step (TRL's meaning: more examples per step);
- packed, half the rows: ``batch_size / 2`` rows, about the bucketed batch's tokens per step.

Throughput = real target tokens (response tokens incl. the end token) per second of wall-clock
over ``--epochs`` epochs, and per CPU-second of this process (steadier than wall-clock when other
work shares the cores). Padding = the loaders' ``padding_fraction`` (what training logs).

    .venv/bin/python bench/packing.py [--examples 128 --epochs 1 --repeats 2]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lazarus  # noqa: E402,F401  (BLAS fast path before mlx.core)
from sft_vs_mlx_lm import WORDS, make_data, run_lazarus  # noqa: E402

from lazarus.data import DataLoader, SFTDataset  # noqa: E402
from lazarus.data.packing import PackedDataLoader  # noqa: E402
from lazarus.models import create_tiny_model, load_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="examples (bucketed) or rows (packed) per step")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    model_dir = create_tiny_model(tmp / "model", hidden_size=args.hidden, num_layers=args.layers,
                                  num_heads=8, num_kv_heads=8, intermediate_size=2 * args.hidden,
                                  extra_texts=[" ".join(WORDS)] * 200)
    data = make_data(tmp / "data.jsonl", args.examples, variable=True)
    _, tok = load_model(model_dir)
    ds = SFTDataset(data, tok)
    packed_loader = PackedDataLoader(ds, args.batch)
    padding = {"bucketed": DataLoader(ds, args.batch).padding_fraction(0),
               "packed": packed_loader.padding_fraction(0),
               "packed, half the rows": PackedDataLoader(ds, args.batch // 2).padding_fraction(0)}
    print(f"{len(ds)} examples of {min(ds.lengths())}-{max(ds.lengths())} tokens; packed: {packed_loader.describe()}",
          flush=True)
    runs = {"bucketed": dict(batch=args.batch, packing=False), "packed": dict(batch=args.batch, packing=True),
            "packed, half the rows": dict(batch=args.batch // 2, packing=True)}
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}  # per CPU-second of this process: steadier when other work shares the cores
    for r in range(args.repeats):
        line = []
        for name, kw in runs.items():
            cpu = time.process_time()
            dt, targets, _, _ = run_lazarus(model_dir, data, kw["batch"], 1e-4, tmp / f"{name}{r}",
                                            fast_cpu_kernels="auto", packing=kw["packing"], epochs=args.epochs)
            cpu = time.process_time() - cpu
            best[name] = max(best.get(name, 0.0), targets / dt)
            best_cpu[name] = max(best_cpu.get(name, 0.0), targets / cpu)
            line.append(f"{name} {targets / dt:.0f} ({targets / cpu:.0f} per CPU-s)")
        print(f"  repeat {r}: " + ", ".join(line) + " tok/s", flush=True)
    print(f"\n| {args.examples} examples, {args.epochs} epoch(s), batch {args.batch} | target tok/s | vs bucketed "
          "| target tok per CPU-s | vs bucketed | padding |\n|---|---|---|---|---|---|")
    for name in runs:
        print(f"| {name} | {best[name]:.0f} | {best[name] / best['bucketed']:.2f}x | {best_cpu[name]:.0f} | "
              f"{best_cpu[name] / best_cpu['bucketed']:.2f}x | {100 * padding[name]:.1f}% |")


if __name__ == "__main__":
    sys.exit(main())
