"""The Linux CPU BLAS fast path: speed-up and unchanged results.

Runs the same float32 matmuls and the same tiny-model training steps in two fresh processes,
one with MLX's bundled reference BLAS (LAZARUS_BLAS=none) and one with lazarus' default (an
optimised OpenBLAS/MKL loaded before mlx.core), checks the results are allclose, and prints
the speed-up. A third process imports ``mlx.core`` *before* ``lazarus`` (as many scripts do):
with the start-up hook that ``make`` installs (``lazarus_blas_hook``) it must keep the fast path
(target: >= 0.9x the speed of importing lazarus first).

    .venv/bin/python bench/blas.py
"""

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import lazarus, mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim, numpy as np
from lazarus import _blas
from lazarus.models import create_tiny_model, load_model
out = {"blas": _blas.loaded or "mlx built-in (reference BLAS)"}
mx.random.seed(0)
a = mx.random.normal((512, 512)); b = mx.random.normal((512, 512))
mx.eval(a @ b)
t = time.perf_counter()
for _ in range(5):
    c = a @ b; mx.eval(c)
out["matmul_gflops"] = 5 * 2 * 512 ** 3 / (time.perf_counter() - t) / 1e9
np.save(sys.argv[1] + "/mm.npy", np.array(c))
d = sys.argv[1] + "/model"
create_tiny_model(d, hidden_size=128, num_layers=2, seed=0)
model, tok = load_model(d)
opt = optim.Adam(1e-3)
x = mx.array(np.random.default_rng(0).integers(0, 300, (4, 64)).astype(np.int32))
loss_fn = lambda m: nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()
vg = nn.value_and_grad(model, loss_fn)
losses = []
t = None
for i in range(6):
    if i == 1:
        t = time.perf_counter()
    l, g = vg(model); opt.update(model, g); mx.eval(l, model.parameters(), opt.state)
    losses.append(l.item())
out["step_seconds"] = (time.perf_counter() - t) / 5
out["losses"] = losses
print(json.dumps(out))
"""


def run(env_blas: str | None, tmp: str, mlx_first: bool = False) -> dict:
    env = dict(os.environ)
    env.pop("LAZARUS_BLAS", None)
    if env_blas is not None:
        env["LAZARUS_BLAS"] = env_blas
    env["LAZARUS_QUIET_BLAS"] = "1"
    code = ("import mlx.core\n" if mlx_first else "") + CHILD
    out = subprocess.run([sys.executable, "-c", code, tmp], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    import numpy as np

    with tempfile.TemporaryDirectory() as slow_dir, tempfile.TemporaryDirectory() as fast_dir:
        slow = run("none", slow_dir)
        fast = run(None, fast_dir)
        mlx_first = run(None, fast_dir, mlx_first=True)
        same_mm = np.allclose(np.load(f"{slow_dir}/mm.npy"), np.load(f"{fast_dir}/mm.npy"), rtol=1e-4, atol=1e-3)
        same_loss = np.allclose(slow["losses"], fast["losses"], rtol=1e-4)
    print(f"reference: {slow['blas']}\nfast path: {fast['blas']}\n")
    print("| measure | reference BLAS | fast path | speed-up |")
    print("|---|---|---|---|")
    print(f"| float32 matmul 512x512 GFLOP/s | {slow['matmul_gflops']:.1f} | {fast['matmul_gflops']:.1f} | "
          f"{fast['matmul_gflops'] / slow['matmul_gflops']:.1f}x |")
    print(f"| training step (hidden 128, 4x64 tokens) s | {slow['step_seconds']:.4f} | {fast['step_seconds']:.4f} | "
          f"{slow['step_seconds'] / fast['step_seconds']:.1f}x |")
    print(f"| training step, `import mlx.core` before `lazarus` s | | {mlx_first['step_seconds']:.4f} | "
          f"{fast['step_seconds'] / mlx_first['step_seconds']:.2f}x of lazarus-first (target >= 0.9; "
          f"BLAS: {mlx_first['blas']}) |")
    print(f"\nresults unchanged: matmul allclose={same_mm}, 6 training losses allclose={same_loss}")
    return 0 if same_mm and same_loss else 1


if __name__ == "__main__":
    sys.exit(main())
