"""Side by side with PyTorch: Lazarus vs TRL's SFTTrainer vs a bare PyTorch loop (same model, ids and
masks), and Lazarus's DPOTrainer vs TRL's.

One llama (default hidden 512, 8 blocks, 8 heads, MLP 1024; random weights, saved once as a
Hugging Face folder that both MLX and transformers load), the same 96 pre-tokenized
prompt/response examples with response lengths spread over 10x, loss on the response tokens,
global batch 8, one epoch including compile/warm-up, float32, as many threads as cores.
LoRA (rank 8, every linear of every block, mlx-lm's scale 20 = PEFT alpha 160) and full
fine-tuning. Each run is its own process; runs alternate (Lazarus, TRL, bare, Lazarus, ...)
and the best of ``--repeats`` is kept. Throughput = response tokens / wall seconds of the
epoch; memory = the process's peak RSS.

* Lazarus: ``SFTTrainer`` with its defaults (LR constant, no warmup; its own batch order).
* TRL: ``SFTTrainer`` with ``gradient_checkpointing=False`` and ``bf16=False``: float32, the same
  math as the others, constant LR.
* TRL defaults: the same, but gradient checkpointing and bf16 autocast left on, as TRL ships them.
  On a CPU with native bf16 dot products (AVX512-BF16, AMX) PyTorch's bf16 matmuls run at about
  twice float32's speed, which MLX's CPU backend cannot do (its bf16 is emulated), so this row
  can beat everything else; without them bf16 is slower.
* bare: a hand-written PyTorch loop (AdamW) over exactly the batches Lazarus draws.
* DPO: LoRA policy, reference = the policy with adapters off (both libraries' default with a
  PEFT/LoRA model), beta 0.1, 30 steps of 8 pairs (3 epochs of bench/dpo.py's pairs), steps/s
  of the whole ``train()`` (Lazarus's one-off reference cache pass included; TRL by default
  runs the reference forward on every step).

PyTorch, transformers, TRL and PEFT live in ``bench/.torch-venv``, created on first use (plain
``pip install torch trl peft``; several GB with CUDA libraries where no CPU wheel is at hand);
the project's own environment never depends on them.

    .venv/bin/python bench/vs_torch.py [--repeats 2] [--examples 96] [--modes lora full]
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCH_VENV = HERE / ".torch-venv"
TORCH_PY = TORCH_VENV / "bin" / "python"
WORDS = ("alpha beta gamma delta river stone cloud light north south eleven seven green blue "
         "quick slow bright dark over under about from into with").split()
LR = {"lora": 1e-4, "full": 1e-5, "dpo": 1e-4}
DPO_STEPS = 30
BATCH = 8
SYSTEMS = {"lora": ("lazarus", "trl", "trl-defaults", "bare"), "full": ("lazarus", "trl", "trl-defaults", "bare"),
           "dpo": ("lazarus", "trl", "trl-defaults")}


def ensure_torch_venv() -> None:
    if TORCH_PY.exists():
        return
    print(f"creating {TORCH_VENV} with torch, transformers, trl, peft (first use only; large download) ...",
          flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TORCH_VENV)], check=True)
    subprocess.run([str(TORCH_PY), "-m", "pip", "install", "-q", "torch", "trl", "peft", "datasets"], check=True)


def make_data(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(12, 120)
        rows.append({"prompt": f"Write {k} words about item {i}.",
                     "response": " ".join(rng.choice(WORDS) for _ in range(k))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lazarus_dpo(model_dir: str, pairs_file: str, ckdir: str) -> dict:
    from lazarus.callbacks import Checkpoint
    from lazarus.models import load_model
    from lazarus.training import DPOTrainer, DPOTrainerConfig

    policy, tok = load_model(model_dir, use_lora=True, lora_rank=8)
    cfg = DPOTrainerConfig(max_steps=DPO_STEPS, batch_size=BATCH, learning_rate=LR["dpo"], warmup_steps=0,
                           checkpoint_interval=None, checkpoint_dir=ckdir, log_interval=10 ** 6,
                           target_reward_margin=None)
    trainer = DPOTrainer(policy, None, tok, cfg, callbacks=[Checkpoint(ckdir, interval=None, save_best=False,
                                                                       save_final=False)])
    t = time.perf_counter()
    result = trainer.train(pairs_file)  # includes the one-off reference cache pass
    return {"seconds": time.perf_counter() - t, "steps": result.state.step, "stop_reason": result.stop_reason}


def lazarus_worker(mode: str, model_dir: str, data_file: str, ckdir: str) -> None:
    import lazarus  # noqa: F401  (BLAS fast path before mlx.core)
    import mlx.core as mx

    from lazarus.callbacks import Checkpoint
    from lazarus.data import SFTDataset
    from lazarus.models import load_model
    from lazarus.training import SFTConfig, SFTTrainer

    mx.random.seed(0)
    if mode == "dpo":
        res = lazarus_dpo(model_dir, data_file, ckdir)
        res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(json.dumps(res))
        return
    model, tok = load_model(model_dir, use_lora=mode == "lora", lora_rank=8)
    ds = SFTDataset(data_file, tok)
    cfg = SFTConfig(num_epochs=1, batch_size=BATCH, learning_rate=LR[mode], warmup_steps=0,
                    checkpoint_interval=None, checkpoint_dir=ckdir, log_interval=10 ** 6)
    trainer = SFTTrainer(model, tok, cfg, callbacks=[Checkpoint(ckdir, interval=None, save_best=False,
                                                                save_final=False)])
    t = time.perf_counter()
    result = trainer.train(ds)
    seconds = time.perf_counter() - t
    targets = sum(len(e.ids) - e.prompt_len for e in ds.examples)
    print(json.dumps({"seconds": seconds, "target_tokens": targets, "stop_reason": result.stop_reason,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))


def write_tokens(model_dir: Path, data_file: Path, mode: str, tmp: Path) -> Path:
    """The examples as token ids + prompt lengths, and Lazarus's batch order, for the torch runs
    (for DPO: where the preference pairs are)."""
    if mode == "dpo":
        path = tmp / "tokens_dpo.json"
        path.write_text(json.dumps({"pairs": str(data_file), "steps": DPO_STEPS, "lr": LR["dpo"], "batch": BATCH,
                                    "threads": os.cpu_count() or 1, "target_tokens": 0, "tmp": str(tmp / "trl_dpo")}))
        return path
    from lazarus.data import DataLoader, SFTDataset
    from lazarus.models import load_model

    _, tok = load_model(model_dir)
    ds = SFTDataset(data_file, tok)
    loader = DataLoader(ds, BATCH, shuffle=True, seed=0)
    doc = {"examples": [{"ids": list(map(int, e.ids)), "prompt_len": int(e.prompt_len)} for e in ds.examples],
           "batches": [list(map(int, loader.batch_indices(0, i))) for i in range(len(loader))],
           "pad_id": int(tok.pad_token_id), "lr": LR[mode], "batch": BATCH, "threads": os.cpu_count() or 1,
           "target_tokens": sum(len(e.ids) - e.prompt_len for e in ds.examples), "tmp": str(tmp / "trl_out")}
    path = tmp / f"tokens_{mode}.json"
    path.write_text(json.dumps(doc))
    return path


def run_one(system: str, mode: str, model_dir: Path, data_file: Path, tokens: Path, tmp: Path) -> dict:
    if system == "lazarus":
        cmd = [sys.executable, __file__, "--worker", mode, str(model_dir), str(data_file), str(tmp / "ck")]
    else:
        cmd = [str(TORCH_PY), str(HERE / "_torch_worker.py"), system, mode, str(model_dir), str(tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise SystemExit(f"{system} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["lora", "full", "dpo"], choices=["lora", "full", "dpo"])
    ap.add_argument("--worker", nargs=4, metavar=("MODE", "MODEL", "DATA", "CKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return lazarus_worker(*args.worker)
    ensure_torch_venv()
    import lazarus  # noqa: F401
    from lazarus.models import create_tiny_model

    tmp = Path(tempfile.mkdtemp())
    model_dir = create_tiny_model(tmp / "model", hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                                  num_kv_heads=8, intermediate_size=2 * args.hidden,
                                  extra_texts=[" ".join(WORDS)] * 200)
    sft_file = make_data(tmp / "data.jsonl", args.examples)
    sys.path.insert(0, str(HERE))
    from dpo import make_pairs

    pairs_file = make_pairs(tmp / "pairs.jsonl", BATCH * DPO_STEPS // 3)  # 3 epochs
    best: dict = {}
    for r in range(args.repeats):
        for mode in args.modes:
            data_file = pairs_file if mode == "dpo" else sft_file
            tokens = write_tokens(model_dir, data_file, mode, tmp)
            for system in SYSTEMS[mode]:
                res = run_one(system, mode, model_dir, data_file, tokens, tmp)
                if mode == "dpo":
                    if system == "lazarus" and res["steps"] != DPO_STEPS:
                        raise SystemExit(f"lazarus dpo stopped early: {res['stop_reason']}")
                    res["tok_s"] = DPO_STEPS / res["seconds"]  # steps/s for DPO
                elif res.get("stop_reason", "completed") != "completed" and "epoch" not in res["stop_reason"]:
                    raise SystemExit(f"{system} {mode} stopped early: {res['stop_reason']}")
                else:
                    res["tok_s"] = res["target_tokens"] / res["seconds"]
                unit = "steps/s" if mode == "dpo" else "tok/s"
                print(f"  repeat {r} {mode:4s} {system:8s} {res['tok_s']:7.2f} {unit}  peak RSS "
                      f"{res['peak_rss_gb']:.2f} GB", flush=True)
                key = (mode, system)
                if key not in best or res["tok_s"] > best[key]["tok_s"]:
                    best[key] = res
    sft_modes = [m for m in args.modes if m != "dpo"]
    if sft_modes:
        print("\n| SFT target tokens/s | Lazarus | TRL (float32) | TRL (its defaults: bf16, grad. checkpointing) "
              "| bare PyTorch loop | Lazarus / TRL | Lazarus / TRL defaults | Lazarus / bare |")
        print("|---|---|---|---|---|---|---|---|")
        for mode in sft_modes:
            lz, trl, trl_d, bare = (best[(mode, s)]["tok_s"] for s in SYSTEMS[mode])
            print(f"| {'LoRA r8' if mode == 'lora' else 'full'} | {lz:.0f} | {trl:.0f} | {trl_d:.0f} | {bare:.0f} | "
                  f"{lz / trl:.2f}x | {lz / trl_d:.2f}x | {lz / bare:.2f}x |")
    if "dpo" in args.modes:
        lz, trl, trl_d = (best[("dpo", s)]["tok_s"] for s in SYSTEMS["dpo"])
        print(f"\n| DPO, LoRA r8, {DPO_STEPS} steps of {BATCH} pairs | Lazarus | TRL DPOTrainer (float32) "
              "| TRL (its defaults) | Lazarus / TRL | Lazarus / TRL defaults |")
        print("|---|---|---|---|---|---|")
        print(f"| steps/s (Lazarus incl. its reference cache pass) | {lz:.2f} | {trl:.2f} | {trl_d:.2f} | "
              f"{lz / trl:.2f}x | {lz / trl_d:.2f}x |")
    print("\n| peak RSS GB | Lazarus | TRL | TRL defaults | bare |")
    print("|---|---|---|---|---|")
    for mode in args.modes:
        cells = [f"{best[(mode, s)]['peak_rss_gb']:.2f}" if (mode, s) in best else "-" for s in SYSTEMS["lora"]]
        print(f"| {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
