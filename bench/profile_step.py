"""Where one training step's time goes, MLX vs PyTorch, on bench/vs_torch.py's model and CPU.

One full fine-tuning step (or LoRA with ``--lora``) at a fixed batch shape (default 8 x 96
tokens, the median width of vs_torch.py's batches), steady state (compiled / warmed up), best of
``--repeats``, split into parts that are timed alone in the same process:

* **GEMMs**: every matrix multiply the step runs (forward, input gradient and, where the weight
  trains, weight gradient of each linear layer, plus the attention score/value products),
  timed alone at exactly the step's shapes with the framework's own matmul;
* **optimizer**: the AdamW update over the trainable weights (fused/compiled as in the step);
* **clipping**: the global gradient norm and rescale (Lazarus's default ``max_grad_norm: 1``;
  the bare PyTorch loop has none, TRL has it);
* **the rest**: the step minus the above: element-wise work (norms, SwiGLU, rotary embeddings,
  softmax, residuals, the loss) and framework overhead, forward and backward.

MLX runs in this process (Lazarus's fast CPU kernels as its autotune chose, one CPU stream);
PyTorch in ``bench/.torch-venv`` (see vs_torch.py), 2 threads.

    .venv/bin/python bench/profile_step.py [--tokens 96 --lora --repeats 5]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lazarus  # noqa: E402,F401  (BLAS fast path before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from _timing import best_of_each  # noqa: E402

from lazarus.callbacks.gradient_clipping import GradientClipping  # noqa: E402
from lazarus.models import create_tiny_model, load_model  # noqa: E402
from lazarus.models.fast_cpu import fast_cpu_kernels  # noqa: E402


def gemm_shapes(cfg: dict, batch: int, tokens: int, lora: bool) -> list[tuple[int, int, int, int, int]]:
    """``(times, heads, m, k, n)``: every matmul of one training step of the block stack + LM head,
    ``times`` products of ``heads`` stacked ``(m, k) @ (k, n)`` (attention runs per batch row and head)."""
    h, f, layers, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    t, d, v = batch * tokens, h // heads, cfg["vocab_size"]
    shapes = []
    for k, n in [(h, h)] * 4 + [(h, f), (h, f), (f, h)] + [(h, v)]:  # q k v o, gate up down, LM head
        times = 1 if n == v else layers
        shapes += [(times, 1, t, k, n), (times, 1, t, n, k)]  # forward, input gradient
        if not lora:
            shapes.append((times, 1, k, t, n))  # weight gradient
    bh = batch * heads  # attention: q k^T and p v forward; four products of the same sizes backward
    shapes += [(layers, bh, tokens, d, tokens), (layers, bh, tokens, tokens, d), (layers, bh, tokens, tokens, d),
               (layers, bh, tokens, d, tokens), (layers, bh, tokens, tokens, d), (layers, bh, d, tokens, tokens)]
    return shapes


def best_of(fn, repeats: int) -> float:
    return best_of_each({"fn": fn}, repeats)["fn"]


def mlx_gemms(shapes, repeats: int) -> float:
    total = 0.0
    for times, heads, m, k, n in shapes:
        a, b = mx.random.normal((heads, m, k)), mx.random.normal((heads, k, n))
        mx.eval(a, b)
        total += times * best_of(lambda: mx.eval(a @ b), repeats)
    return total


def mlx_side(model_dir: Path, batch: int, tokens: int, lora: bool, repeats: int) -> dict:
    model, _ = load_model(model_dir, use_lora=lora, lora_rank=8)
    cfg = json.loads((model_dir / "config.json").read_text())
    x = mx.random.randint(0, cfg["vocab_size"], (batch, tokens))
    mask = mx.ones((batch, tokens))

    def loss_fn(model, x, y, m):
        ce = nn.losses.cross_entropy(model(x), y) * m
        return ce.sum() / m.sum()

    vg = nn.value_and_grad(model, loss_fn)
    opt = optim.AdamW(learning_rate=1e-5)
    opt.init(model.trainable_parameters())
    clip = GradientClipping(1.0)
    state = [model.state, opt.state]

    def step(x, y, m, clipped):
        loss, grads = vg(model, x, y, m)
        if clipped:
            grads, _ = clip.transform_grads(grads)
        opt.update(model, grads)
        return loss

    steps = {c: mx.compile(lambda x, y, m, c=c: step(x, y, m, c), inputs=state, outputs=state) for c in (False, True)}
    grads = vg(model, x, x, mask)[1]
    mx.eval(grads)
    update = mx.compile(lambda g: opt.update(model, g), inputs=state, outputs=state)
    with fast_cpu_kernels(model, "auto"):
        res = best_of_each({"step": lambda: mx.eval(steps[False](x, x, mask), model.state, opt.state),
                            "step, clipped": lambda: mx.eval(steps[True](x, x, mask), model.state, opt.state),
                            "optimizer": lambda: mx.eval(update(grads), model.state, opt.state)}, repeats)
    res["gemms"] = mlx_gemms(gemm_shapes(cfg, batch, tokens, lora), repeats)
    res["params"] = sum(v.size for _, v in tree_flatten(model.parameters()))
    return res


def torch_side(model_dir: Path, batch: int, tokens: int, lora: bool, repeats: int) -> dict:
    code = HERE / "_torch_worker.py"
    shapes = gemm_shapes(json.loads((model_dir / "config.json").read_text()), batch, tokens, lora)
    spec = json.dumps({"batch": batch, "tokens": tokens, "lora": lora, "repeats": repeats, "shapes": shapes})
    out = subprocess.run([str(HERE / ".torch-venv" / "bin" / "python"), str(code), "profile", "-", str(model_dir), spec],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"torch side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args(argv)
    from vs_torch import WORDS, ensure_torch_venv

    ensure_torch_venv()
    model_dir = create_tiny_model(Path(tempfile.mkdtemp()) / "model", hidden_size=args.hidden, num_layers=args.layers,
                                  num_heads=8, num_kv_heads=8, intermediate_size=2 * args.hidden,
                                  extra_texts=[" ".join(WORDS)] * 200)
    mlx_res = mlx_side(model_dir, args.batch, args.tokens, args.lora, args.repeats)
    torch_res = torch_side(model_dir, args.batch, args.tokens, args.lora, args.repeats)
    kind = "LoRA r8" if args.lora else "full fine-tuning"
    print(f"\n{kind}, {mlx_res['params'] / 1e6:.1f}M parameters, batch {args.batch} x {args.tokens} tokens, "
          f"steady state, best of {args.repeats}, variants taking turns (ms)\n")
    print("| part of one step | MLX (Lazarus's kernels) | PyTorch | MLX / PyTorch |\n|---|---|---|---|")
    rows = []
    for name, res in (("mlx", mlx_res), ("torch", torch_res)):
        rest = res["step"] - res["gemms"] - res["optimizer"]
        rows.append({"GEMMs (timed alone, same shapes)": res["gemms"], "optimizer (AdamW)": res["optimizer"],
                     "element-wise + overhead (the rest)": rest, "whole step, no clipping": res["step"],
                     "clipping (global norm + rescale)": res["step, clipped"] - res["step"],
                     "whole step, clipped (Lazarus's default)": res["step, clipped"]})
    for key in rows[0]:
        m, t = rows[0][key], rows[1][key]
        ratio = f"{m / t:.2f}" if t > 0.002 else "-"
        print(f"| {key} | {1000 * m:.0f} | {1000 * t:.0f} | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())
