"""Published dtypes on the CPU backend: LoRA training speed of a 4-bit model (float16 scales, the
mlx-community layout) and of a bf16 model against the same weights in float32, with defaults.

The model is an mlx-lm llama (hidden 256, 4 blocks, ~2.6M parameters) with random weights, saved
as float32, as bf16, and quantized to 4 bits with float16 scales/biases like `mlx_lm.convert -q`.
Each run trains LoRA rank 8 on the same equal-length token batches; the timed window excludes the
first steps (compilation). Runs alternate; best of `--repeats`. Targets (issue: real checkpoints):
4-bit default >= 0.8x float32. `dequantize: false` (4-bit matmuls with float32 scales) and
`dtype: float16` (what a GPU would run) show what the defaults avoid.

    .venv/bin/python bench/quantized.py [--steps 8 --repeats 2]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import lazarus  # noqa: F401  (BLAS fast path first)
import mlx.core as mx
import mlx_lm.utils as U

from lazarus.callbacks import Callback
from lazarus.models import create_tiny_model, load_model
from lazarus.training import SFTConfig, SFTTrainer


class Timer(Callback):
    def __init__(self, skip):
        self.skip, self.t0, self.t1 = skip, None, None

    def on_step_end(self, state):
        if state.step + 1 == self.skip:
            self.t0 = time.perf_counter()

    def on_fit_end(self, state):
        self.t1 = time.perf_counter()


def published(src: Path, dst: Path, dtype, bits=None) -> Path:
    model, tok = U.load(str(src))
    config = json.loads((src / "config.json").read_text())
    model.set_dtype(dtype)
    if bits:
        model, config = U.quantize_model(model, config, 64, bits)
    U.save(dst, src, model, tok, config)
    return dst


def data(path: Path, n: int) -> Path:
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": " ".join(["the answer is"] * 12)}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def seconds_per_step(model_dir, data_path, steps, skip, **cfg):
    model, tok = load_model(model_dir, use_lora=True, lora_rank=8)
    timer = Timer(skip)
    config = SFTConfig(max_steps=steps + skip, batch_size=8, learning_rate=1e-4, warmup_steps=0,
                       checkpoint_interval=None, checkpoint_dir=tempfile.mkdtemp(), log_interval=10 ** 6, **cfg)
    trainer = SFTTrainer(model, tok, config, callbacks=[timer])
    trainer.train(str(data_path))
    return (timer.t1 - timer.t0) / steps, trainer.precision.describe()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-slow", action="store_true", help="leave out dtype: float16 (tens of seconds per step)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    src = create_tiny_model(tmp / "f32", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                            intermediate_size=512)
    models = {"float32": src, "bf16": published(src, tmp / "bf16", mx.bfloat16),
              "4-bit": published(src, tmp / "q4", mx.float16, bits=4)}
    train = data(tmp / "train.jsonl", 16 * 8)
    runs = {"float32 (baseline)": ("float32", {}), "bf16, defaults": ("bf16", {}),
            "4-bit fp16 scales, defaults": ("4-bit", {}), "4-bit, dequantize: false": ("4-bit", {"dequantize": False})}
    best, what = {}, {}
    for r in range(args.repeats):
        for name, (m, cfg) in runs.items():
            t, desc = seconds_per_step(models[m], train, args.steps, 2, **cfg)
            best[name] = min(best.get(name, t), t)
            what[name] = desc
            print(f"repeat {r}: {name}: {t * 1000:.0f} ms/step ({desc})", flush=True)
    if not args.skip_slow:
        t, desc = seconds_per_step(models["4-bit"], train, 1, 1, dequantize=False, dtype="float16")
        best["4-bit, dequantize: false, dtype: float16"], what["4-bit, dequantize: false, dtype: float16"] = t, desc
    base = best["float32 (baseline)"]
    print("\n| model, settings | precision | ms/step | speed vs float32 |")
    print("|---|---|---|---|")
    for name, t in best.items():
        print(f"| {name} | {what[name]} | {t * 1000:.0f} | {base / t:.2f}x |")
    ratio = base / best["4-bit fp16 scales, defaults"]
    print(f"target: 4-bit defaults >= 0.8x float32 -> {ratio:.2f}x {'PASS' if ratio >= 0.8 else 'MISS'}")


if __name__ == "__main__":
    main()
