"""A run's folder (``--output``): claiming it (the checkpoint folder's lock; a folder holding another
run is refused unless ``--resume`` continues it or ``--overwrite`` clears it), the files a run
writes there (``config.yaml``, ``history.json``, and for a full fine-tune the model folder
``model/``), and the end of a run: the summary pointing into the folder and the exit status.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from lazarus.cli_common import EXIT_CODES, CLIError
from lazarus.models.loading import RUN_MARKER  # marks a run folder: the only kind --overwrite clears

MODEL_DIR = "model"  # <output>/model: a full fine-tune's result as a model folder


def prepare_output(output: Path, config, run: dict, overwrite: bool):
    """Make sure this run never mixes with, or deletes, another one; returns the held lock.

    A run folder holding files is refused unless ``--resume`` continues a checkpoint of that
    folder, or ``--overwrite`` clears it (only a Lazarus run folder: one with the marker file or
    checkpoints). The checkpoint folder's lock is taken first: it refuses a folder another run
    is writing, and proves the folder writable before any model is loaded."""
    from lazarus import checkpointing as ckpt

    ckdir = Path(config.checkpoint_dir)
    lock = ckpt.FolderLock(ckdir).acquire()
    try:
        external = [] if _inside(ckdir, output) else _visible_files(ckdir)
        used = sorted({f.split(os.sep)[0] + ("/" if os.sep in f else "") for f in _visible_files(output)})
        used += [f"{ckdir}/"] if external else []
        resume = run.get("resume")
        own = resume and (_inside(Path(resume), output) or _inside(Path(resume), ckdir))
        if used and not own:
            if resume and not overwrite:
                raise CLIError(f"{output} already holds another run; to continue {resume} choose an empty --output "
                               f"(or pass --overwrite to replace what is in {output})")
            if not overwrite:
                names = ckpt.list_checkpoints(ckdir)
                steps = [n for n in names if n.startswith("step_")]
                hint = f"--resume {ckdir / (steps[-1] if steps else names[-1])} to continue it, " if names else ""
                raise CLIError(f"{output} already holds a run ({', '.join(used)}); pass {hint}--overwrite to replace "
                               "it, or choose another --output")
            if not ((output / RUN_MARKER).exists() or ckpt.list_checkpoints(ckdir)):
                raise CLIError(f"{output} is not empty and is not a Lazarus run folder: --overwrite only clears run "
                               "folders; choose another --output")
            if output.is_dir():
                _clear_run_folder(output, ckdir)
            if ckdir.is_dir() and not _inside(ckdir, output):  # elsewhere: only what a run writes there
                for name in ckpt.list_checkpoints(ckdir):
                    ckpt.remove_checkpoint(ckdir / name)
                for name in ("adapters.safetensors", "adapter_config.json"):
                    (ckdir / name).unlink(missing_ok=True)
        output.mkdir(parents=True, exist_ok=True)
        (output / RUN_MARKER).touch()
        ckpt.clean_folder(output)  # temporary files of a killed config.yaml/history.json write
        return lock
    except BaseException:
        lock.release()
        raise


def _write_run_files(output: Path, run: dict, config) -> None:
    import yaml

    from lazarus.checkpointing import atomic_write_text

    # `resume` belongs to one invocation: rerunning the saved config starts afresh unless --resume is given
    doc = {k: v for k, v in run.items() if v is not None and not k.startswith("_") and k != "resume"}
    derived = run.get("_derived", [])
    doc.update({k: v for k, v in config.model_dump().items() if k not in derived})
    atomic_write_text(output / "config.yaml", yaml.safe_dump(doc, sort_keys=False))


def run_files_callback(output: Path, run: dict, config):
    """Writes config.yaml at fit start: after a resume was checked against its checkpoint (a
    refused resume must not rewrite it), so the file always states what actually ran."""
    from lazarus.callbacks import Callback

    class RunFiles(Callback):
        order = 95

        def on_fit_start(self, state):
            if state.is_main_process:
                _write_run_files(output, run, config)

    return RunFiles()


def _visible_files(d: Path) -> list[str]:
    """Files under ``d`` (relative paths) except hidden ones (the lock, temporary files)."""
    if not d.is_dir():
        return []
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts))


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _clear_run_folder(folder: Path, keep: Path) -> None:
    """Delete everything in ``folder`` except the lock file of the checkpoint folder ``keep``."""
    from lazarus.checkpointing import LOCK_NAME

    for p in folder.iterdir():
        if p.is_symlink() or not p.is_dir():
            if not (p.name == LOCK_NAME and p.parent.resolve() == keep.resolve()):
                p.unlink()
        elif _inside(keep, p):  # the checkpoint folder is p or lies within it: keep its lock
            _clear_run_folder(p, keep)
        else:
            shutil.rmtree(p)


def write_history(output: Path, result) -> None:
    from lazarus.checkpointing import atomic_write_text

    atomic_write_text(output / "history.json", json.dumps(result.history, indent=1))


def _finished(result) -> bool:
    """Training ended as planned or by early stopping: not by a signal, not by TerminateOnNaN."""
    reason = result.stop_reason or ""
    return not (result.state.extras.get("terminated_on_nan") or reason.startswith("interrupted by"))


def write_model_folder(output: Path, result, trainer, lk: dict) -> Path | None:
    """A full fine-tune that finished writes ``<output>/model`` (its final weights as a model folder,
    the base's dtype; 4-bit layers stay 4-bit unless the run set ``dequantize: true``); a LoRA run's
    result is its adapters (``lazarus export`` fuses them). Rank 0 only."""
    if lk.get("use_lora") or not _finished(result) or getattr(trainer, "reward_model_dir", None) is not None:
        return None  # a reward model run writes its reward model (model + head) instead
    return trainer.save_model(output / MODEL_DIR, dequantize=getattr(trainer.config, "dequantize", None) is True)


def print_summary(paradigm, run, result, trainer, lk, model_dir: Path | None = None) -> None:
    """What happened, and where everything went (checkpoints, logs) with the commands to use it."""
    from lazarus.callbacks import TensorBoardLogger, WandbLogger
    from lazarus.checkpointing import list_checkpoints

    st = result.state
    train_rows = [h for h in result.history if "loss" in h]
    eval_rows = [h for h in result.history if any(k.startswith("eval/") for k in h)]
    print(f"lazarus train {paradigm}: {result.stop_reason} after {st.step} steps")
    if train_rows:
        last = train_rows[-1]
        keys = [k for k in ("loss", "reward", "rewards/margins", "rewards/accuracies", "kl", "accuracy", "margin")
                if k in last]
        print("  last train metrics: " + ", ".join(f"{k}={last[k]:.4g}" for k in keys))
    if eval_rows:
        last = eval_rows[-1]
        print("  last eval metrics:  " + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "step"))
    ckdir = result.checkpoint_dir
    names = list_checkpoints(ckdir) if ckdir else []
    if names:
        print(f"  checkpoints: {ckdir} ({', '.join(names)})")
        if lk.get("use_lora") and (Path(ckdir) / "adapters.safetensors").exists():
            _print_adapter_commands(run, trainer, ckdir)
    reward_dir = getattr(trainer, "reward_model_dir", None)
    if reward_dir is not None:
        print(f"  reward model: {reward_dir} (reward_model: {reward_dir} in a grpo/ppo config, or "
              f"lazarus.models.load_reward_model)")
    if model_dir is not None:
        print(f"  model: {model_dir} (a model folder: lazarus generate --model {model_dir}, mlx_lm.generate, or "
              f"--model {run['output']} for the next run)")
    for cb in trainer.callbacks:
        if isinstance(cb, TensorBoardLogger):
            print(f"  tensorboard: {cb.log_dir} (view: tensorboard --logdir {cb.log_dir})")
        elif isinstance(cb, WandbLogger) and (cb.url or cb.run_dir):
            if cb.url:
                print(f"  wandb: {cb.url}")
            else:
                offline = Path(cb.run_dir).parent
                print(f"  wandb: {offline} (offline; upload: wandb sync {offline})")
    print(f"  run files: {run['output']}/config.yaml, {run['output']}/history.json")
    last = st.extras.get("last_checkpoint")
    if (result.stop_reason or "").startswith("interrupted by") and last:
        print(f"  resume: {resume_command(paradigm, run, last)}")


def _print_adapter_commands(run: dict, trainer, ckdir) -> None:
    from lazarus.models import lora_settings

    settings = lora_settings(trainer.model)
    base = settings.base_model if settings is not None and settings.base_model else run["model"]
    if (Path(base) / "config.json").exists():  # a base built from a LoRA run exists only in memory
        print(f"  adapters: mlx_lm.generate --model {base} --adapter-path {ckdir} --prompt '...'")
    print(f"  export: lazarus export --adapter {run['output']} --output {run['output']}-model  (base + adapters fused "
          f"into a model folder; or --model {run['output']} for the next run)")


def exit_code(paradigm: str, run: dict, result, main_process: bool) -> int:
    """0 only when the run did what it was asked; a signal or a divergence says so (see EXIT_CODES)."""
    st = result.state
    reason = result.stop_reason or ""
    if st.extras.get("terminated_on_nan"):
        if main_process:
            print(f"lazarus: stopped: {reason}. Lower learning_rate (or raise warmup_steps) and start again",
                  file=sys.stderr)
        return EXIT_CODES["nan"]
    for sig in ("SIGINT", "SIGTERM"):
        if reason == f"interrupted by {sig}":
            last = st.extras.get("last_checkpoint")
            if not main_process:
                # rank 0 writes the checkpoint after the last collective; a non-zero exit here would make
                # mlx.launch signal rank 0 again while it writes (rank 0's status tells the truth)
                return 0
            again = (f"; resume with: {resume_command(paradigm, run, last)}" if last
                     else "; no checkpoint was written")
            print(f"lazarus: interrupted by {sig} after step {st.step}{again}", file=sys.stderr)
            return EXIT_CODES[sig]
    return 0


def resume_command(paradigm: str, run: dict, checkpoint) -> str:
    return f"lazarus train {paradigm} --config {Path(run['output']) / 'config.yaml'} --resume {checkpoint}"
