"""CI guard: no default-on optimisation may be slower than its off switch on this machine.

Each default-on optimisation is paired with its off switch and both are timed in this one
process on a small model, alternating (default, off, default, off, ...), best of ``--repeats``:

* ``fast_cpu_kernels``: the default (``auto``: measured per machine, see lazarus/autotune.py) vs ``false``
* ``cpu_streams``: the default (auto: 2 with >= 2 cores) vs ``1``
* ``compile``: ``true`` vs ``false``
* the DPO reference cache vs a reference forward pass on every step (bench/dpo.py's baseline)
* the BLAS fast path (``lazarus`` loads OpenBLAS before MLX) vs ``LAZARUS_BLAS=none``, as float32
  matmuls in two subprocesses (MLX's BLAS is bound once per process)

It prints a table of default/off time ratios and exits 1 when any default is more than
``--margin`` (25%) slower than off. A ratio check with a wide margin, not a timed unit test:
`.ci/run` runs it after the test suite.

    .venv/bin/python bench/guard.py [--repeats 3] [--margin 1.25]
"""

import argparse
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lazarus  # noqa: F401  (BLAS fast path before mlx.core)
import mlx.core as mx
import mlx.optimizers as optim

from lazarus.callbacks import Checkpoint, ProgressBar
from lazarus.data import PreferenceDataset, SFTDataset
from lazarus.models import create_tiny_model, load_model
from lazarus.training import DPOTrainer, DPOTrainerConfig, SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).parent))
from dpo import RecomputeReferenceDPO, make_pairs  # noqa: E402

WORDS = "alpha beta gamma delta river stone cloud light north south green blue quick slow".split()


def sft_data(path: Path, n: int = 96) -> Path:
    rng = random.Random(0)
    rows = [{"prompt": f"Write {k} words about item {i}.", "response": " ".join(rng.choice(WORDS) for _ in range(k))}
            for i, k in enumerate(rng.randint(8, 80) for _ in range(n))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def quiet() -> ProgressBar:
    return ProgressBar(file=io.StringIO())  # the table is the output, not 60 progress lines


def sft_run(model_dir, data, tmp, **overrides):
    def run():
        mx.random.seed(0)
        model, tok = load_model(model_dir, use_lora=True, lora_rank=8)
        cfg = SFTConfig(num_epochs=2, batch_size=8, learning_rate=1e-4, warmup_steps=0, log_interval=10 ** 6,
                        checkpoint_interval=None, checkpoint_dir=str(tmp), **overrides)
        trainer = SFTTrainer(model, tok, cfg, callbacks=[Checkpoint(tmp, interval=None, save_best=False,
                                                                    save_final=False), quiet()])
        trainer.make_optimizer = lambda: optim.Adam(learning_rate=1e-4)
        trainer.train(SFTDataset(data, tok))
    return run


def dpo_run(cls, model_dir, data, tmp):
    def run():
        mx.random.seed(0)
        policy, tok = load_model(model_dir, use_lora=True, lora_rank=8)
        reference, _ = load_model(model_dir)
        cfg = DPOTrainerConfig(num_epochs=3, batch_size=8, learning_rate=1e-4, warmup_steps=0, log_interval=10 ** 6,
                               checkpoint_interval=None, checkpoint_dir=str(tmp), target_reward_margin=None)
        trainer = cls(policy, reference, tok, cfg, callbacks=[Checkpoint(tmp, interval=None, save_best=False,
                                                                         save_final=False), quiet()])
        trainer.train(PreferenceDataset(data, tok))
    return run


MATMUL = ("import time, lazarus, mlx.core as mx\n"
          "a = mx.random.normal((384, 384)); mx.eval(a @ a)\n"
          "t = time.perf_counter()\n"
          "for _ in range(20): mx.eval(a @ a)\n"
          "print(time.perf_counter() - t)")


def blas_run(env_blas):
    def run():
        env = {**__import__("os").environ, "LAZARUS_QUIET_BLAS": "1"}
        if env_blas is not None:
            env["LAZARUS_BLAS"] = env_blas
        out = subprocess.run([sys.executable, "-c", MATMUL], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    return run


def best_alternating(default, off, repeats):
    """Best seconds of each, alternating; a run that returns a float reports its own timing."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((default, off)):
            t = time.perf_counter()
            own = fn()
            best[i] = min(best[i], own if isinstance(own, float) else time.perf_counter() - t)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--margin", type=float, default=1.25, help="fail when default / off exceeds this")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    model_dir = create_tiny_model(tmp / "model", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                                  intermediate_size=512, extra_texts=[" ".join(WORDS)] * 50)
    sft = sft_data(tmp / "sft.jsonl")
    prefs = make_pairs(tmp / "prefs.jsonl", 32)
    pairs = [
        ("fast_cpu_kernels: auto vs false", sft_run(model_dir, sft, tmp / "a"),
         sft_run(model_dir, sft, tmp / "b", fast_cpu_kernels=False)),
        ("cpu_streams: auto vs 1", sft_run(model_dir, sft, tmp / "c"), sft_run(model_dir, sft, tmp / "d", cpu_streams=1)),
        ("compile: true vs false", sft_run(model_dir, sft, tmp / "e"), sft_run(model_dir, sft, tmp / "f", compile=False)),
        ("DPO reference cache vs recompute", dpo_run(DPOTrainer, model_dir, prefs, tmp / "g"),
         dpo_run(RecomputeReferenceDPO, model_dir, prefs, tmp / "h")),
        ("BLAS fast path vs LAZARUS_BLAS=none", blas_run(None), blas_run("none")),
    ]
    print(f"| default-on optimisation | default s | off s | default / off (fail > {args.margin}) |")
    print("|---|---|---|---|")
    failed = []
    for name, default, off in pairs:
        t_default, t_off = best_alternating(default, off, args.repeats)
        ratio = t_default / t_off
        if ratio > args.margin:
            failed.append(name)
        print(f"| {name} | {t_default:.3f} | {t_off:.3f} | {ratio:.2f}{'  FAIL' if ratio > args.margin else ''} |",
              flush=True)
    if failed:
        print(f"guard: the default is slower than off for: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("guard: every default-on optimisation is at least as fast as its off switch (within the margin)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
