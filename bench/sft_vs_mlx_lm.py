"""SFT throughput: Lazarus SFTTrainer vs mlx_lm.tuner.trainer.train, same process, same everything.

Same llama (default hidden 512, 8 blocks), same LoRA (rank 8 on every linear of every block),
same tokenized examples, same global batch, optimizer (Adam, constant LR) and number of
examples (one epoch). Two datasets: response lengths spread over 10x, and all equal.
Throughput = real target tokens (response tokens incl. EOS, no padding) per second of
wall-clock for the whole epoch, compile time included for both. Runs alternate
(mlx-lm, Lazarus, mlx-lm, Lazarus ...) and the best of `--repeats` is kept for each.

Also prints peak memory, and model FLOP utilisation: 6 * params * tokens_processed / time
against the float32 matmul peak measured in the same process.

    .venv/bin/python bench/sft_vs_mlx_lm.py [--hidden 512 --layers 8 --examples 128 --repeats 2]
"""

import argparse
import contextlib
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import lazarus  # noqa: F401  (BLAS fast path before mlx.core)
import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from lazarus.callbacks import Checkpoint
from lazarus.data import SFTDataset
from lazarus.models import create_tiny_model, load_model
from lazarus.training import SFTConfig, SFTTrainer

WORDS = ("alpha beta gamma delta river stone cloud light north south eleven seven green blue "
         "quick slow bright dark over under about from into with").split()


def make_data(path: Path, n: int, variable: bool, seed: int = 0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(12, 120) if variable else 60
        rows.append({"prompt": f"Write {k} words about item {i}.",
                     "response": " ".join(rng.choice(WORDS) for _ in range(k))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def matmul_peak_gflops() -> float:
    a = mx.random.normal((1024, 1024))
    b = mx.random.normal((1024, 1024))
    mx.eval(a, b, a @ b)
    t = time.perf_counter()
    for _ in range(10):
        mx.eval(a @ b)
    return 10 * 2 * 1024 ** 3 / (time.perf_counter() - t) / 1e9


def run_lazarus(model_dir, data_file, batch, lr, ckdir, grad_checkpoint=False, fast_cpu_kernels=True, cpu_streams=None,
                packing=False, epochs=1):
    mx.random.seed(0)
    model, tok = load_model(model_dir, use_lora=True, lora_rank=8)
    ds = SFTDataset(data_file, tok)
    cfg = SFTConfig(num_epochs=epochs, batch_size=batch, learning_rate=lr, warmup_steps=0, max_grad_norm=None,
                    checkpoint_interval=None, checkpoint_dir=str(ckdir), log_interval=10 ** 6,
                    grad_checkpoint=grad_checkpoint, fast_cpu_kernels=fast_cpu_kernels, cpu_streams=cpu_streams,
                    packing=packing)
    trainer = SFTTrainer(model, tok, cfg, callbacks=[Checkpoint(ckdir, interval=None, save_best=False)])
    trainer.make_optimizer = lambda: optim.Adam(learning_rate=lr)
    mx.reset_peak_memory()
    t = time.perf_counter()
    result = trainer.train(ds)
    dt = time.perf_counter() - t
    targets = epochs * sum(len(e.ids) - e.prompt_len for e in ds.examples)
    processed = epochs * sum(len(e.ids) - 1 for e in ds.examples)  # every real input position (no padding)
    return dt, targets, mx.get_peak_memory() / 1e9, processed


def run_mlx_lm(model_dir, data_file, batch, lr, ckdir):
    from mlx_lm.tuner.trainer import TrainingArgs, train

    mx.random.seed(0)
    model, tok = load_model(model_dir, use_lora=True, lora_rank=8)
    ds = SFTDataset(data_file, tok)  # identical token ids; mlx-lm gets (ids, prompt_len) pairs
    items = [(e.ids, e.prompt_len) for e in ds.examples]
    iters = len(items) // batch
    Path(ckdir).mkdir(parents=True, exist_ok=True)
    args = TrainingArgs(batch_size=batch, iters=iters, steps_per_report=10 ** 6, steps_per_eval=10 ** 6,
                        steps_per_save=10 ** 6, adapter_file=str(Path(ckdir) / "adapters.safetensors"),
                        max_seq_length=4096)
    mx.reset_peak_memory()
    model.train()
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train(model, optim.Adam(learning_rate=lr), items, None, args=args)
    dt = time.perf_counter() - t
    used = iters * batch  # mlx-lm drops the last partial batch
    targets = sum(len(e.ids) - e.prompt_len for e in ds.examples) * used / len(items)
    return dt, targets, mx.get_peak_memory() / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--grad-checkpoint", action="store_true", help="also measure grad_checkpoint: true")
    ap.add_argument("--ablate", action="store_true", help="also run Lazarus with fast_cpu_kernels: false, and with cpu_streams: 1 (variable data)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    model_dir = create_tiny_model(tmp / "model", hidden_size=args.hidden, num_layers=args.layers,
                                  num_heads=8, num_kv_heads=8, intermediate_size=2 * args.hidden,
                                  extra_texts=[" ".join(WORDS)] * 200)  # whole words become single tokens
    model, _ = load_model(model_dir)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    del model
    peak = matmul_peak_gflops()
    print(f"model: hidden {args.hidden}, {args.layers} blocks, {n_params / 1e6:.1f}M params; "
          f"float32 matmul peak here: {peak:.0f} GFLOP/s", flush=True)
    rows = []
    for variable in (True, False):
        data = make_data(tmp / f"data_{variable}.jsonl", args.examples, variable)
        best = {"mlx": None, "laz": None, "slow": None, "one": None}
        for r in range(args.repeats):
            runs = {"mlx": run_mlx_lm(model_dir, data, args.batch, 1e-4, tmp / f"mlx{r}"),
                    "laz": run_lazarus(model_dir, data, args.batch, 1e-4, tmp / f"laz{r}{variable}")}
            if args.ablate and variable:  # the same Lazarus run without each CPU feature
                runs["slow"] = run_lazarus(model_dir, data, args.batch, 1e-4, tmp / f"slow{r}{variable}",
                                           fast_cpu_kernels=False)
                runs["one"] = run_lazarus(model_dir, data, args.batch, 1e-4, tmp / f"one{r}{variable}",
                                          cpu_streams=1)
            print(f"  {'variable' if variable else 'equal'} repeat {r}: "
                  + ", ".join(f"{k} {v[1] / v[0]:.0f} tok/s" for k, v in runs.items()), flush=True)
            for k, v in runs.items():
                if best[k] is None or v[1] / v[0] > best[k][1] / best[k][0]:
                    best[k] = v
        m, lz = best["mlx"], best["laz"]
        rows.append(("variable (10x spread)" if variable else "equal length", m, lz))
        if args.ablate and variable:
            rows.append(("variable, fast_cpu_kernels: false", m, best["slow"]))
            rows.append(("variable, cpu_streams: 1", m, best["one"]))
        if variable and args.grad_checkpoint:
            gc = run_lazarus(model_dir, data, args.batch, 1e-4, tmp / "gc", grad_checkpoint=True)
            rows.append(("variable, grad_checkpoint", lz, gc))
    print("\n| data | mlx-lm tok/s | Lazarus tok/s | ratio | peak mem mlx-lm GB | peak mem Lazarus GB |")
    print("|---|---|---|---|---|---|")
    for name, m, lz in rows:
        print(f"| {name} | {m[1] / m[0]:.0f} | {lz[1] / lz[0]:.0f} | {(lz[1] / lz[0]) / (m[1] / m[0]):.2f}x | "
              f"{m[2]:.3f} | {lz[2]:.3f} |")
    # MFU of Lazarus on the variable-length run
    _, m, lz = rows[0]
    tok_s, proc_s = lz[1] / lz[0], lz[3] / lz[0]
    print(f"\nLazarus model FLOP utilisation, 6*params*tokens/s over the matmul peak ({peak:.0f} GFLOP/s): "
          f"all real input tokens {6 * n_params * proc_s / 1e9:.1f} GFLOP/s = {100 * 6 * n_params * proc_s / 1e9 / peak:.0f}%; "
          f"target tokens only {100 * 6 * n_params * tok_s / 1e9 / peak:.0f}%")


if __name__ == "__main__":
    sys.exit(main())
