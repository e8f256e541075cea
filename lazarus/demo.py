"""``lazarus demo``: the whole post-training pipeline on the embedded tiny model, offline, on CPU.

The task is arithmetic ("What is 7+5?" -> "12"), and the data is imperfect the way real SFT data
is: most training answers were written by a labeler who hedges ("12, I think"). Each stage fixes
what it can, measured on 30 held-out questions (sums never seen in training):

1. build the tiny model (random weights, ``create_tiny_model`` defaults) into ``<output>/model``;
2. supervised fine-tuning on ``<output>/data/sft.jsonl`` (the shipped ``sft_train.jsonl``, 80% of
   the answers hedged): the model learns to add, and to hedge;
3. DPO on ``<output>/data/preferences.jsonl`` (the plain answer preferred over the hedged one, on
   the training questions), from the SFT model, which is also its frozen reference, with RPO's
   NLL term (``rpo_alpha``) so the preferred answers' likelihood cannot fall: the hedge goes;
4. a before/after table: exact-match accuracy of greedy answers, the share whose sum is right
   whatever the wording, the share that hedges, the eval loss (mean NLL of the plain held-out
   answers) and how often the right sum is likelier than a near miss.

Checkpoints go to ``<output>/sft/checkpoints`` and ``<output>/dpo/checkpoints``, TensorBoard
logs to ``<output>/runs``; ``<output>/results.json`` holds the numbers.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lazarus.models.tiny import EXAMPLES


@dataclass(frozen=True)
class DemoPlan:
    sft_steps: int
    sft_lr: float
    sft_weight_decay: float
    dpo_steps: int
    dpo_lr: float
    dpo_beta: float
    rpo_alpha: float = 1.0
    hedged_fraction: float = 0.8  # of the SFT answers
    batch_size: int = 16
    warmup_steps: int = 200
    eval_interval: int = 250
    log_interval: int = 25
    n_eval: int | None = None  # held-out questions scored (None: all 30)


# Tuned on 2 CPU cores. SFT: the strong weight decay pushes the model from memorising the 139 training
# sums towards adding; with 80% hedged answers it hedges on most held-out questions (measured: 27%
# exact, most of the rest right but hedged). DPO without the NLL term also lowered the digits' likelihood
# (17/30 exact); with rpo_alpha 1.0 and lr 2e-5 it removed the hedge and kept the sums (27/30).
FULL = DemoPlan(sft_steps=800, sft_lr=2e-3, sft_weight_decay=1.0, dpo_steps=100, dpo_lr=2e-5, dpo_beta=0.1)
QUICK = DemoPlan(sft_steps=30, sft_lr=2e-3, sft_weight_decay=1.0, dpo_steps=6, dpo_lr=2e-5, dpo_beta=0.1,
                 warmup_steps=5, eval_interval=15, log_interval=5, n_eval=8)
HEDGE = ", I think"


def write_demo_data(directory: Path, hedged_fraction: float) -> tuple[Path, Path]:
    """The demo's training data, written next to its outputs: the shipped SFT questions with most
    answers hedged (a fixed, seeded choice), and preference pairs plain > hedged on the same questions."""
    import random

    rng = random.Random(0)
    rows = _read("sft_train.jsonl")
    directory.mkdir(parents=True, exist_ok=True)
    sft = [{"prompt": r["prompt"], "response": r["response"] + HEDGE if rng.random() < hedged_fraction
            else r["response"]} for r in rows]
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": r["response"] + HEDGE} for r in rows]
    for name, data in (("sft.jsonl", sft), ("preferences.jsonl", pairs)):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    return directory / "sft.jsonl", directory / "preferences.jsonl"


def _read(name: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLES / name).read_text().splitlines() if line.strip()]


def greedy_answers(model, tokenizer, prompts: list[str], max_tokens: int = 12) -> list[str]:
    """Greedy (temperature 0) replies through mlx-lm's ``generate``, chat template applied."""
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    from lazarus.data import chat_prompt_ids

    sampler = make_sampler(temp=0.0)
    return [generate(model, tokenizer, prompt=chat_prompt_ids(tokenizer, p), max_tokens=max_tokens,
                     sampler=sampler, verbose=False) for p in prompts]


def accuracy(model, tokenizer, rows: list[dict]) -> tuple[int, int, list[str]]:
    """(correct, total, answers) of exact-match greedy answers to ``rows`` ({"prompt","response"})."""
    answers = greedy_answers(model, tokenizer, [r["prompt"] for r in rows])
    correct = sum(a.strip() == r["response"].strip() for a, r in zip(answers, rows))
    return correct, len(rows), answers


def _eval_loss(model, tokenizer, path) -> float:
    from lazarus.data import SFTDataset
    from lazarus.training import SFTConfig, SFTTrainer

    ds = SFTDataset(path, tokenizer)
    trainer = SFTTrainer(model, tokenizer, SFTConfig(batch_size=len(ds), checkpoint_interval=None,
                                                     checkpoint_dir=str(Path(path).parent)))
    return trainer.evaluate(ds)["loss"]


def heldout_pairs(rows: list[dict]) -> list[dict]:
    """Held-out preference pairs: the right sum against near misses (-2, -1, +1, +2)."""
    pairs = []
    for r in rows:
        right = int(r["response"])
        pairs.extend({"prompt": r["prompt"], "chosen": str(right), "rejected": str(right + off)}
                     for off in (-2, -1, 1, 2) if right + off >= 0)
    return pairs


def preference_accuracy(model, tokenizer, path) -> float:
    """Share of pairs whose chosen reply gets a higher log-probability than the rejected one."""
    import mlx.core as mx
    import numpy as np

    from lazarus.data import PreferenceDataset
    from lazarus.training.dpo import sequence_logps

    ds = PreferenceDataset(path, tokenizer)
    batch = ds.collate(list(range(len(ds))))
    logps = np.array(sequence_logps(model, {k: v for k, v in batch.items() if isinstance(v, mx.array)}))
    n = len(ds)
    return float((logps[:n] > logps[n:]).mean())


def _right_sum(answer: str, want: str) -> bool:
    digits = ""
    for ch in answer.strip():
        if not ch.isdigit():
            break
        digits += ch
    return digits == want.strip()


def _measure(label, model, tokenizer, rows, eval_path, pairs_path) -> dict:
    model.eval()
    c, n, answers = accuracy(model, tokenizer, rows)
    return {"model": label, "correct": c, "total": n, "accuracy": c / n,
            "right_sum": sum(_right_sum(a, r["response"]) for a, r in zip(answers, rows)) / n,
            "hedged": sum(a.strip().startswith(tuple("0123456789")) and ", I" in a for a in answers) / n,
            "eval_loss": _eval_loss(model, tokenizer, eval_path),
            "preference_accuracy": preference_accuracy(model, tokenizer, pairs_path), "answers": answers}


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def format_table(rows: list[dict]) -> str:
    head = (f"  {'model':<20} {'held-out accuracy':>18} {'right sum':>10} {'hedged':>7} {'eval loss':>10} "
            f"{'prefers right sum':>18}")
    lines = [head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        acc = f"{100 * r['accuracy']:.1f}% ({r['correct']}/{r['total']})"
        lines.append(f"  {r['model']:<20} {acc:>18} {100 * r['right_sum']:>9.1f}% {100 * r['hedged']:>6.1f}% "
                     f"{r['eval_loss']:>10.3f} {100 * r['preference_accuracy']:>17.1f}%")
    return "\n".join(lines)


def run_demo(output: str | Path = "demo_output", quick: bool = False, progress: bool | None = None) -> dict:
    """Run the demo; returns (and writes to ``<output>/results.json``) the before/after numbers."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from lazarus import _blas
    from lazarus.callbacks import ProgressBar, TensorBoardLogger
    from lazarus.data import PreferenceDataset, SFTDataset
    from lazarus.models import create_tiny_model, load_model
    from lazarus.training import DPOConfig, DPOTrainer, DPOTrainerConfig, SFTConfig, SFTTrainer

    plan = QUICK if quick else FULL
    out = Path(output)
    if progress is None:
        progress = sys.stdout.isatty()

    def bar():
        return ProgressBar(force=True, file=sys.stdout) if progress else ProgressBar(file=io.StringIO())

    t_start = time.perf_counter()
    for sub in ("model", "sft", "dpo", "runs", "data"):  # only what an earlier demo run wrote
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)

    _say("Lazarus demo: SFT then DPO on the embedded tiny model (arithmetic: 'What is 7+5?' -> '12'; "
         f"{100 * plan.hedged_fraction:.0f}% of the SFT answers hedge: '12{HEDGE}')"
         + ("  [quick mode: a few steps only]" if quick else ""))
    if _blas.loaded is None:
        _say("  note: no optimised BLAS found, CPU training will be slow (" + _blas.INSTALL_HINT + ")")
    mx.random.seed(0)
    model_dir = create_tiny_model(out / "model")
    model, tok = load_model(model_dir)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    held_out = _read("sft_eval.jsonl")[: plan.n_eval]
    eval_path = EXAMPLES / "sft_eval.jsonl"
    pairs_path = out / "heldout_preferences.jsonl"
    pairs_path.write_text("".join(json.dumps(p) + "\n" for p in heldout_pairs(held_out)))
    sft_data, dpo_data = write_demo_data(out / "data", plan.hedged_fraction)
    _say(f"[1/4] built the tiny model ({n_params / 1e6:.2f}M parameters, random weights) in {model_dir}")

    results = [_measure("base (random init)", model, tok, held_out, eval_path, pairs_path)]

    # ---- SFT ---------------------------------------------------------------------------
    _say(f"[2/4] SFT: {plan.sft_steps} steps, batch {plan.batch_size}, lr {plan.sft_lr:g}, full fine-tuning "
         f"on {sft_data}")
    sft_dir = out / "sft" / "checkpoints"
    sft_cfg = SFTConfig(max_steps=plan.sft_steps, batch_size=plan.batch_size, learning_rate=plan.sft_lr,
                        weight_decay=plan.sft_weight_decay, warmup_steps=plan.warmup_steps, lr_schedule="cosine",
                        log_interval=plan.log_interval, eval_interval=plan.eval_interval,
                        checkpoint_interval=max(plan.sft_steps // 2, 1), checkpoint_dir=str(sft_dir), seed=0)
    sft = SFTTrainer(model, tok, sft_cfg, callbacks=[TensorBoardLogger(out / "runs" / "sft"),
                                                      bar()])
    t0 = time.perf_counter()
    sft_result = sft.train(SFTDataset(sft_data, tok), eval_dataset=SFTDataset(eval_path, tok))
    sft_seconds = time.perf_counter() - t0
    results.append(_measure("after SFT", model, tok, held_out, eval_path, pairs_path))
    _say(f"      done in {sft_seconds:.0f}s ({sft_result.stop_reason}); held-out accuracy "
         f"{100 * results[-1]['accuracy']:.1f}%, right sum {100 * results[-1]['right_sum']:.1f}%, hedged "
         f"{100 * results[-1]['hedged']:.1f}%")

    # ---- DPO ---------------------------------------------------------------------------
    _say(f"[3/4] DPO: {plan.dpo_steps} steps, beta {plan.dpo_beta}, rpo_alpha {plan.rpo_alpha}, lr {plan.dpo_lr:g} "
         f"on {dpo_data} (plain answer > hedged; reference: the SFT model)")
    dpo_dir = out / "dpo" / "checkpoints"
    dpo_cfg = DPOTrainerConfig(dpo=DPOConfig(beta=plan.dpo_beta, rpo_alpha=plan.rpo_alpha), max_steps=plan.dpo_steps,
                               batch_size=plan.batch_size, learning_rate=plan.dpo_lr, warmup_steps=0,
                               log_interval=plan.log_interval, checkpoint_interval=None,
                               checkpoint_dir=str(dpo_dir), target_reward_margin=None, seed=0)
    dpo = DPOTrainer(model, None, tok, dpo_cfg, callbacks=[TensorBoardLogger(out / "runs" / "dpo"),
                                                           bar()])
    t0 = time.perf_counter()
    dpo_result = dpo.train(PreferenceDataset(dpo_data, tok))
    dpo_seconds = time.perf_counter() - t0
    results.append(_measure("after SFT + DPO", model, tok, held_out, eval_path, pairs_path))
    last = [h for h in dpo_result.history if "rewards/margins" in h][-1]
    _say(f"      done in {dpo_seconds:.0f}s; train reward margin {last['rewards/margins']:.2f}, "
         f"preference accuracy {100 * last['rewards/accuracies']:.0f}%")

    # ---- report --------------------------------------------------------------------------
    total = time.perf_counter() - t_start
    _say(f"[4/4] results on {len(held_out)} held-out questions (sums never seen in training):")
    _say(format_table(results))
    _say("  (accuracy: exact greedy answers; right sum: the answer starts with the right number, hedged or not; "
         "hedged: answers that add 'I think'; eval loss: mean NLL of the plain held-out answers; prefers right sum: "
         "share of held-out pairs where the right sum is likelier than a near miss)")
    base, after_sft, after_dpo = results
    d_sft = 100 * (after_sft["accuracy"] - base["accuracy"])
    d_dpo = 100 * (after_dpo["accuracy"] - after_sft["accuracy"])
    _say(f"  SFT taught the sums (right sum {100 * after_sft['right_sum']:.0f}%) and the hedge; held-out accuracy "
         f"{d_sft:+.1f} points. DPO removed the hedge ({100 * after_sft['hedged']:.0f}% -> "
         f"{100 * after_dpo['hedged']:.0f}% hedged): {d_dpo:+.1f} points")
    examples = [f"{r['prompt']} -> {a!r}" for r, a in zip(held_out[:3], results[-1]["answers"][:3])]
    _say("  e.g. " + "; ".join(examples))
    _say("")
    _say(f"checkpoints:  {sft_dir}/  and  {dpo_dir}/  (final.safetensors, best.safetensors ...)")
    _say(f"tensorboard:  tensorboard --logdir {out / 'runs'}")
    _say(f"try it:       lazarus generate --model {model_dir} --checkpoint {dpo_dir / 'final.safetensors'} "
         f"--prompt 'What is 7+5?'")
    _say(f"total time:   {total:.0f}s (SFT {sft_seconds:.0f}s, DPO {dpo_seconds:.0f}s)")
    summary = {"quick": quick, "seconds": total, "sft_seconds": sft_seconds, "dpo_seconds": dpo_seconds,
               "results": results, "model_dir": str(model_dir), "sft_checkpoints": str(sft_dir),
               "dpo_checkpoints": str(dpo_dir), "tensorboard": str(out / "runs"),
               "plan": plan.__dict__}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    return summary


def add_arguments(parser) -> None:
    """The flags of ``lazarus demo`` (and of ``python -m lazarus.demo``)."""
    parser.add_argument("--output", "-o", default="demo_output", metavar="DIR", help="[default: demo_output]")
    parser.add_argument("--quick", action="store_true", help="a few steps only (for tests); numbers mean little")
    parser.add_argument("--progress", dest="progress", action="store_true", default=None,
                        help="always show progress bars [default: when stdout is a terminal]")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress bars")


def command(args) -> int:
    """``lazarus demo`` with the flags of :func:`add_arguments`."""
    run_demo(output=args.output, quick=args.quick, progress=args.progress)
    return 0


def main(argv=None) -> int:
    """``python -m lazarus.demo [flags]``: the same as ``lazarus demo [flags]``."""
    from lazarus.cli_common import CommandParser, HelpFormatter, run_command

    parser = CommandParser(prog="lazarus")  # parsed as `lazarus demo ...`: the same help and usage errors
    add_arguments(parser.add_subparsers().add_parser("demo", formatter_class=HelpFormatter))
    return run_command(command, parser.parse_args(["demo", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
