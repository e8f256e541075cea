"""The ``lazarus`` command line.

    lazarus train {sft,dpo,grpo,ppo} --model DIR --data FILE [--eval-data FILE] [--config FILE.yaml]
                  [--output DIR] [--max-steps N] [--lora] [--resume PATH] [--set KEY=VALUE ...]
    lazarus init-model DIR
    lazarus demo [--output DIR] [--quick]
    lazarus generate --model DIR [--adapter-path DIR] [--checkpoint FILE] --prompt TEXT [--max-tokens N] [--temp T]

A YAML config holds the trainer's config fields (``learning_rate: 1e-5``, ``dpo: {beta: 0.1}``) and
the run keys listed in :data:`RUN_KEYS` (``model``, ``data``, ``lora``, ``tensorboard`` ...).
Command-line flags override the YAML. ``LAZARUS_DEBUG=1`` shows tracebacks.

Exit status (:data:`EXIT_CODES`): 0 the run finished what it was asked (its steps or epochs, or
an early-stopping target); 2 a user error, one line on stderr (bad config, data, model, checkpoint,
a run folder already in use, an unwritable or full disk); 130/143 interrupted by SIGINT/SIGTERM
after a checkpoint was written (the resume command is printed); 3 stopped by TerminateOnNaN (the
last finite checkpoint is kept); 1 a bug.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import io
import json
import os
import shutil
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any

PARADIGMS = {
    # name: (trainer class, config class, one-line description, expected data)
    "sft": ("SFTTrainer", "SFTConfig", "supervised fine-tuning", '{"prompt", "response"} or {"messages"}'),
    "dpo": ("DPOTrainer", "DPOTrainerConfig", "direct preference optimisation", '{"prompt", "chosen", "rejected"}'),
    "grpo": ("GRPOTrainer", "GRPOConfig", "group relative policy optimisation (online RL)",
             '{"prompt", <other columns passed to the reward>}'),
    "ppo": ("PPOTrainer", "PPOConfig", "proximal policy optimisation (online RL)",
            '{"prompt", <other columns passed to the reward>}'),
}
RL = ("grpo", "ppo")

#: YAML keys that are not trainer config fields: (description, default shown in --help, paradigms)
RUN_KEYS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "model": ("Model folder (Hugging Face / MLX layout; `lazarus init-model DIR` makes a tiny one)", "required",
              tuple(PARADIGMS)),
    "data": ("Training data, JSON Lines", "required", tuple(PARADIGMS)),
    "eval_data": ("Evaluation data, JSON Lines (same format as data)", "None", tuple(PARADIGMS)),
    "output": ("Run folder: checkpoints/ (unless checkpoint_dir is set), config.yaml, history.json; one that "
               "holds another run is refused (--resume continues it, --overwrite clears it)",
               "runs/<paradigm>", tuple(PARADIGMS)),
    "lora": ("Train LoRA adapters: true, or {rank: 8, scale: 20.0 | alpha: 16, dropout: 0.0, layers: -1, "
             "keys: [...]}", "false", tuple(PARADIGMS)),
    "adapter_path": ("Start from adapters saved earlier (a folder with adapter_config.json)", "None",
                     tuple(PARADIGMS)),
    "reference_model": ("Frozen reference model folder (default: the policy before training, or the LoRA base)",
                        "None", ("dpo", "grpo", "ppo")),
    "reward": ("Reward function(s): 'module:function' or 'path/to/file.py:function', or a list of them",
               "required", RL),
    "reward_weights": ("Weights of the reward functions (a list, same length as reward)", "1.0 each", RL),
    "system_prompt": ("System message put before every prompt (through the chat template)", "None",
                      tuple(PARADIGMS)),
    "tensorboard": ("TensorBoard log folder (true: <output>/tb)", "None", tuple(PARADIGMS)),
    "wandb": ("Weights & Biases: true, a project name, or wandb.init arguments {project: ..., name: ...}; "
              "logs in <output>/wandb; WANDB_MODE=offline works without an account", "None", tuple(PARADIGMS)),
    "early_stopping": ("EarlyStopping arguments {monitor: eval/loss, patience: 3, min_delta: 0.0, "
                       "stopping_threshold: ...}", "None", tuple(PARADIGMS)),
    "progress_bar": ("true: always a bar; false: no progress output; auto: a bar on a terminal, else a plain "
                     "line every log_interval steps", "auto", tuple(PARADIGMS)),
    "resume": ("Resume exactly from a checkpoint (e.g. <output>/checkpoints/step_500.safetensors)", "None",
               tuple(PARADIGMS)),
}
LORA_KEYS = {"rank": "lora_rank", "scale": "lora_scale", "alpha": "lora_alpha", "dropout": "lora_dropout",
             "layers": "lora_layers", "keys": "lora_keys"}


EXIT_CODES = {"finished": 0, "bug": 1, "user error": 2, "nan": 3, "SIGINT": 130, "SIGTERM": 143}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# =============================================================================== help text
def _type_name(annotation) -> str:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return str(annotation).replace("typing.", "")


def config_fields(config_class, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(dotted name, type, default, description)`` of every field, nested models expanded."""
    from pydantic import BaseModel

    rows = []
    for name, f in config_class.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(config_fields(ann, f"{prefix}{name}."))
            continue
        default = f.default_factory() if f.default_factory is not None else f.default
        rows.append((f"{prefix}{name}", _type_name(ann), default, f.description or ""))
    return rows


def _fmt_default(v) -> str:
    return "None" if v is None else json.dumps(v) if isinstance(v, str) else repr(v)


def config_help(paradigm: str, config_class) -> str:
    lines = ["run keys (YAML; the flags above override them):"]
    for key, (desc, default, which) in RUN_KEYS.items():
        if paradigm in which:
            lines.append(f"  {key:<26} {desc} [default: {default}]")
    lines.append("")
    lines.append(f"{config_class.__name__} fields (YAML keys, or --set KEY=VALUE; nested as 'dpo: {{beta: 0.2}}' "
                 "or --set dpo.beta=0.2):")
    for name, typ, default, desc in config_fields(config_class):
        lines.append(f"  {name:<26} {desc} ({typ}) [default: {_fmt_default(default)}]")
    return "\n".join(lines)


# =============================================================================== config handling
def load_paradigm(paradigm: str):
    """(trainer class, config class) or a CLIError saying why it is not available."""
    trainer_name, config_name = PARADIGMS[paradigm][:2]
    try:
        mod = importlib.import_module("lazarus.training")
        trainer_cls, config_cls = getattr(mod, trainer_name, None), getattr(mod, config_name, None)
        if trainer_cls is None or config_cls is None:
            mod = importlib.import_module(f"lazarus.training.{paradigm}")
            trainer_cls, config_cls = getattr(mod, trainer_name), getattr(mod, config_name)
    except (ImportError, AttributeError) as e:
        raise CLIError(f"{paradigm.upper()} training is not available in this installation ({e})") from None
    return trainer_cls, config_cls


def load_yaml(path: str | os.PathLike) -> dict:
    import yaml

    p = Path(path)
    if not p.exists():
        raise CLIError(f"config file not found: {p}")
    if p.is_dir():
        raise CLIError(f"config file {p} is a directory")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CLIError(f"{p}:{where}: invalid YAML ({problem})") from None
    except UnicodeDecodeError as e:
        raise CLIError(f"{p}: not UTF-8 text ({e})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise CLIError(f"{p}: the YAML config must be a mapping of keys to values, got {type(doc).__name__}")
    return {str(k): v for k, v in doc.items()}


def parse_set(items: list[str]) -> dict:
    """``--set a=1 --set dpo.beta=0.2`` -> nested dict (values parsed as YAML scalars)."""
    import yaml

    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CLIError(f"--set {key}: '{part}' is not a nested section")
        node[parts[-1]] = value
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def format_validation_error(e, paradigm: str, config_class) -> str:
    valid = [name for name, *_ in config_fields(config_class)] + list(RUN_KEYS)
    top = list(config_class.model_fields) + list(RUN_KEYS)
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, valid + top, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            parts.append(f"unknown key '{loc}'{hint}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            parts.append(f"{loc}: {err['msg']}{shown}")
    return (f"invalid {paradigm} config: " + "; ".join(parts)
            + f" - see `lazarus train {paradigm} --help` for every key")


def split_config(paradigm: str, merged: dict, config_class) -> tuple[dict, dict]:
    """(run keys, trainer config keys). Run keys of other paradigms are errors here."""
    run, cfg = {}, {}
    for k, v in merged.items():
        if k in RUN_KEYS:
            if paradigm not in RUN_KEYS[k][2]:
                raise CLIError(f"'{k}' is not used by `lazarus train {paradigm}`")
            run[k] = v
        else:
            cfg[k] = v
    return run, cfg


def build_config(paradigm: str, config_class, cfg: dict):
    from pydantic import ValidationError

    try:
        return config_class(**cfg)
    except ValidationError as e:
        raise CLIError(format_validation_error(e, paradigm, config_class)) from None
    except (TypeError, ValueError) as e:  # a model_validator may raise these directly
        raise CLIError(f"invalid {paradigm} config: {e}") from None


def lora_kwargs(value) -> dict:
    """``lora:`` value -> ``load_model`` keyword arguments (``{}`` means no LoRA)."""
    if value in (None, False):
        return {}
    if value is True:
        return {"use_lora": True}
    if not isinstance(value, dict):
        raise CLIError(f"lora must be true/false or a mapping like {{rank: 8}}, got {value!r}")
    out = {"use_lora": True}
    for k, v in value.items():
        if k not in LORA_KEYS:
            close = difflib.get_close_matches(str(k), list(LORA_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CLIError(f"unknown key 'lora.{k}'{hint}; valid: {', '.join(LORA_KEYS)}")
        ok = {"rank": lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 1,
              "layers": lambda x: isinstance(x, int) and not isinstance(x, bool) and (x >= 1 or x == -1),
              "scale": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0,
              "alpha": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0,
              "dropout": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1,
              "keys": lambda x: isinstance(x, list) and x and all(isinstance(i, str) for i in x)}[k]
        if not ok(v):
            need = {"rank": "an integer >= 1", "layers": "an integer >= 1, or -1 for all blocks",
                    "scale": "a number > 0", "alpha": "a number > 0", "dropout": "a number in [0, 1)",
                    "keys": "a non-empty list of module names"}[k]
            raise CLIError(f"lora.{k} must be {need}, got {v!r}")
        out[LORA_KEYS[k]] = v
    return out


def load_reward(spec: str):
    """``module:function`` or ``path/to/file.py:function`` -> the function."""
    if not isinstance(spec, str) or ":" not in spec:
        raise CLIError(f"reward must be 'module:function' or 'path/to/file.py:function', got {spec!r}")
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise CLIError(f"reward must be 'module:function' or 'path/to/file.py:function', got {spec!r}")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = Path(target)
        if not path.exists():
            raise CLIError(f"reward file not found: {path}")
        mod_name = f"lazarus_reward_{abs(hash(str(path.resolve())))}"
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        if spec_obj is None or spec_obj.loader is None:
            raise CLIError(f"cannot import reward file {path}")
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[mod_name] = module
        try:
            spec_obj.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - user code
            raise CLIError(f"importing reward file {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise CLIError(f"cannot import reward module '{target}': {e}") from None
        except Exception as e:  # noqa: BLE001 - user code
            raise CLIError(f"importing reward module '{target}' failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise CLIError(f"reward '{spec}': {target} has no attribute '{name}'")
    if not callable(fn):
        raise CLIError(f"reward '{spec}' is not callable")
    return fn


def _path_value(run: dict, key: str) -> str | None:
    v = run.get(key)
    if v is None:
        return None
    if not isinstance(v, (str, os.PathLike)):
        raise CLIError(f"'{key}' must be a path, got {v!r}")
    return str(v)


def build_callbacks(run: dict, output: Path) -> list:
    from lazarus.callbacks import EarlyStopping, ProgressBar, TensorBoardLogger, WandbLogger

    cbs = []
    tb = run.get("tensorboard")
    if tb:
        cbs.append(TensorBoardLogger(output / "tb" if tb is True else str(tb)))
    wb = run.get("wandb")
    if wb:
        if wb is True:
            kwargs = {}
        elif isinstance(wb, str):
            kwargs = {"project": wb}
        elif isinstance(wb, dict):
            kwargs = dict(wb)
            _check_kwargs("wandb", kwargs, _wandb_init_params())
        else:
            raise CLIError(f"wandb must be true, a project name or a mapping, got {wb!r}")
        kwargs.setdefault("dir", str(output))  # wandb's default is ./wandb, outside the run folder
        cbs.append(WandbLogger(**kwargs))
    es = run.get("early_stopping")
    if es:
        if es is True:
            es = {}
        if not isinstance(es, dict):
            raise CLIError(f"early_stopping must be a mapping like {{monitor: eval/loss, patience: 3}}, got {es!r}")
        import inspect

        _check_kwargs("early_stopping", es, [p for p in inspect.signature(EarlyStopping).parameters])
        try:
            cbs.append(EarlyStopping(**es))
        except (TypeError, ValueError) as e:
            raise CLIError(f"early_stopping: {e}") from None
    pb = run.get("progress_bar", "auto")
    if pb not in ("auto", True, False, None):
        raise CLIError(f"progress_bar must be true, false or auto, got {pb!r}")
    if pb is True:
        cbs.append(ProgressBar(force=True))
    elif pb is False:
        cbs.append(ProgressBar(file=io.StringIO()))  # not a terminal: stays quiet
    return cbs


def _wandb_init_params() -> list[str] | None:
    import inspect

    try:
        import wandb

        return [p for p in inspect.signature(wandb.init).parameters if p not in ("args", "kwargs")]
    except Exception:  # noqa: BLE001 - wandb missing or unusual: let wandb.init judge
        return None


def _check_kwargs(section: str, kwargs: dict, valid: list[str] | None) -> None:
    if valid is None:
        return
    for k in kwargs:
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CLIError(f"unknown key '{section}.{k}'{hint}")


# =============================================================================== train
def resolve_train_config(args) -> tuple[str, dict, Any, Any, Any]:
    """Merge YAML, --set and flags; returns (paradigm, run keys, config, trainer class, config class)."""
    paradigm = args.paradigm
    trainer_cls, config_cls = load_paradigm(paradigm)
    merged = load_yaml(args.config) if args.config else {}
    merged = _deep_merge(merged, parse_set(args.set))
    flags = {"model": args.model, "data": args.data, "eval_data": args.eval_data, "output": args.output,
             "max_steps": args.max_steps, "resume": args.resume}
    for k, v in flags.items():
        if v is not None:
            merged[k] = v
    if args.lora and not isinstance(merged.get("lora"), dict):
        merged["lora"] = True
    if getattr(args, "tensorboard", None):
        merged["tensorboard"] = args.tensorboard
    run, cfg = split_config(paradigm, merged, config_cls)
    output = Path(_path_value(run, "output") or Path("runs") / paradigm)
    run["output"] = str(output)
    if "checkpoint_dir" not in cfg:
        cfg["checkpoint_dir"] = str(output / "checkpoints")
        run["_derived"] = ["checkpoint_dir"]  # follows --output; not pinned in the saved config.yaml
    config = build_config(paradigm, config_cls, cfg)
    for key in ("model", "data"):
        if not run.get(key):
            raise CLIError(f"no {key} given: pass --{key} or put '{key}:' in the YAML config")
    if paradigm in RL and not run.get("reward"):
        raise CLIError(f"`lazarus train {paradigm}` needs a reward function: put 'reward: module:function' "
                       "(or 'path/to/file.py:function') in the YAML config, or --set reward=...")
    return paradigm, run, config, trainer_cls, config_cls


def _write_run_files(output: Path, run: dict, config) -> None:
    import yaml

    from lazarus.checkpointing import atomic_write_text

    # `resume` belongs to one invocation: rerunning the saved config starts afresh unless --resume is given
    doc = {k: v for k, v in run.items() if v is not None and not k.startswith("_") and k != "resume"}
    derived = run.get("_derived", [])
    doc.update({k: v for k, v in config.model_dump().items() if k not in derived})
    atomic_write_text(output / "config.yaml", yaml.safe_dump(doc, sort_keys=False))


def _run_files_callback(output: Path, run: dict, config):
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


RUN_MARKER = ".lazarus-run"  # marks a folder as a Lazarus run folder: the only kind --overwrite clears


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


def _rank() -> int:
    import mlx.core as mx

    return mx.distributed.init().rank() if mx.distributed.is_available() else 0


def cmd_train(args) -> int:
    paradigm, run, config, trainer_cls, _ = resolve_train_config(args)
    from lazarus.models import load_model

    output = Path(run["output"])
    rewards = None
    if paradigm in RL:
        specs = run["reward"] if isinstance(run["reward"], list) else [run["reward"]]
        rewards = [load_reward(s) for s in specs]
    lk = lora_kwargs(run.get("lora"))
    for key in ("data", "eval_data", "resume"):
        _path_value(run, key)
    callbacks = build_callbacks(run, output)
    main_process = _rank() == 0
    lock = prepare_output(output, config, run, args.overwrite) if main_process else None
    try:
        adapter_path = _path_value(run, "adapter_path")
        model, tok = load_model(_path_value(run, "model"), adapter_path=adapter_path, seed=config.seed, **lk)
        train_ds, eval_ds = _datasets(paradigm, run, config, tok, model)
        callbacks.append(_run_files_callback(output, run, config))

        if paradigm == "sft":
            trainer = trainer_cls(model, tok, config, callbacks=callbacks)
        elif paradigm == "dpo":
            ref = _load_reference(run, load_model)
            trainer = trainer_cls(model, ref, tok, config, callbacks=callbacks)
        else:
            kwargs = {"reference_model": _load_reference(run, load_model)} if run.get("reference_model") else {}
            weights = run.get("reward_weights")
            if weights is not None:
                kwargs["reward_weights"] = weights if isinstance(weights, list) else [weights]
            trainer = trainer_cls(model, tok, config, reward_fn=rewards, callbacks=callbacks, **kwargs)

        resume = _path_value(run, "resume")
        result = trainer.train(train_ds, eval_dataset=eval_ds, resume_from=resume,
                               allow_data_change=args.allow_data_change)
        if main_process:
            from lazarus.checkpointing import atomic_write_text

            atomic_write_text(output / "history.json", json.dumps(result.history, indent=1))
            _print_summary(paradigm, run, result, trainer, lk)
    finally:
        if lock is not None:
            lock.release()
    return _exit_code(paradigm, run, result, main_process)


def _exit_code(paradigm: str, run: dict, result, main_process: bool) -> int:
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
            again = (f"; resume with: {_resume_command(paradigm, run, last)}" if last
                     else "; no checkpoint was written")
            print(f"lazarus: interrupted by {sig} after step {st.step}{again}", file=sys.stderr)
            return EXIT_CODES[sig]
    return 0


def _resume_command(paradigm: str, run: dict, checkpoint) -> str:
    return f"lazarus train {paradigm} --config {Path(run['output']) / 'config.yaml'} --resume {checkpoint}"


def _load_reference(run, load_model):
    ref = _path_value(run, "reference_model")
    if ref is None:
        return None
    model, _ = load_model(ref)
    return model


def _datasets(paradigm: str, run: dict, config, tok, model=None):
    from lazarus.data import PreferenceDataset, PromptDataset, SFTDataset
    from lazarus.models.loading import context_length

    # No max_length means the model's context: one oversized line must never reach the model
    common = {"max_length": config.max_length or (context_length(model) if model is not None else None),
              "system_prompt": run.get("system_prompt")}

    def make(path):
        if path is None:
            return None
        if paradigm == "sft":
            return SFTDataset(path, tok, mask_prompt=config.mask_prompt, **common)
        if paradigm == "dpo":
            return PreferenceDataset(path, tok, **common)
        return PromptDataset(path, tok, **common)

    return make(_path_value(run, "data")), make(_path_value(run, "eval_data"))


def _print_summary(paradigm, run, result, trainer, lk) -> None:
    """What happened, and where everything went (checkpoints, logs) with the commands to use it."""
    from lazarus.callbacks import TensorBoardLogger, WandbLogger
    from lazarus.checkpointing import list_checkpoints

    st = result.state
    train_rows = [h for h in result.history if "loss" in h]
    eval_rows = [h for h in result.history if any(k.startswith("eval/") for k in h)]
    print(f"lazarus train {paradigm}: {result.stop_reason} after {st.step} steps")
    if train_rows:
        last = train_rows[-1]
        keys = [k for k in ("loss", "reward", "rewards/margins", "rewards/accuracies", "kl") if k in last]
        print("  last train metrics: " + ", ".join(f"{k}={last[k]:.4g}" for k in keys))
    if eval_rows:
        last = eval_rows[-1]
        print("  last eval metrics:  " + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "step"))
    ckdir = result.checkpoint_dir
    names = list_checkpoints(ckdir) if ckdir else []
    if names:
        print(f"  checkpoints: {ckdir} ({', '.join(names)})")
        if lk.get("use_lora") and (Path(ckdir) / "adapters.safetensors").exists():
            print(f"  adapters: mlx_lm.generate --model {run['model']} --adapter-path {ckdir} --prompt '...'")
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
        print(f"  resume: {_resume_command(paradigm, run, last)}")


# =============================================================================== other commands
def cmd_init_model(args) -> int:
    from lazarus.models import create_tiny_model

    d = Path(args.dir)
    if d.exists() and not d.is_dir():
        raise CLIError(f"{d} exists and is not a directory")
    if d.is_dir() and (d / "config.json").exists() and not args.force:
        raise CLIError(f"{d} already holds a model (config.json); pass --force to overwrite it")
    kwargs = {k: getattr(args, k) for k in ("hidden_size", "num_layers", "seed") if getattr(args, k) is not None}
    create_tiny_model(d, **kwargs)
    print(f"wrote the tiny offline model to {d}")
    return 0


def cmd_demo(args) -> int:
    from lazarus.demo import run_demo

    run_demo(output=args.output, quick=args.quick, progress=args.progress)
    return 0


def chat_prompt_ids(tok, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of ``prompt`` as a user turn, through the chat template when there is one."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if getattr(tok, "chat_template", None):
        return list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    return list(tok.encode(prompt))


def load_for_generation(model_dir, adapter_path=None, checkpoint=None):
    """Load a model (plus optional adapters and a Lazarus checkpoint of trainable weights)."""
    from lazarus.models import load_model

    model, tok = load_model(model_dir, adapter_path=adapter_path)
    if checkpoint is not None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        from lazarus import checkpointing as ckpt

        weights, _ = ckpt.read_weights(checkpoint)
        params = dict(tree_flatten(model.parameters()))
        unknown = sorted(set(weights) - set(params))
        if unknown:
            hint = " (a LoRA checkpoint needs --adapter-path of its checkpoint folder)" if any(
                "lora_" in k for k in unknown) else ""
            raise ckpt.CheckpointError(f"checkpoint {checkpoint} does not match this model: "
                                       f"{len(unknown)} unknown tensors, e.g. {unknown[0]}{hint}")
        bad = [k for k in weights if tuple(weights[k].shape) != tuple(params[k].shape)]
        if bad:
            raise ckpt.CheckpointError(f"checkpoint {checkpoint} does not match this model: shape of {bad[0]} "
                                       f"is {tuple(weights[bad[0]].shape)}, model has {tuple(params[bad[0]].shape)}")
        model.load_weights(list(weights.items()), strict=False)
        mx.eval(model.parameters())
    model.eval()
    return model, tok


def cmd_generate(args) -> int:
    import mlx.core as mx
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    if args.max_tokens < 1:
        raise CLIError("--max-tokens must be >= 1")
    if args.temp < 0:
        raise CLIError("--temp must be >= 0")
    model, tok = load_for_generation(args.model, args.adapter_path, args.checkpoint)
    if args.seed is not None:
        mx.random.seed(args.seed)
    ids = chat_prompt_ids(tok, args.prompt, args.system)
    text = generate(model, tok, prompt=ids, max_tokens=args.max_tokens, sampler=make_sampler(temp=args.temp),
                    verbose=False)
    print(text)
    return 0


# =============================================================================== parser
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2), like every other user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=120)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lazarus", formatter_class=_Formatter,
        description="Lazarus: MLX-native post-training (SFT, DPO, GRPO, PPO).",
        epilog="examples:\n"
               "  lazarus demo                                   # the whole pipeline on the embedded tiny model\n"
               "  lazarus init-model tiny/                       # write the tiny offline model\n"
               "  lazarus train sft --model tiny/ --data train.jsonl --max-steps 200\n"
               "  lazarus train dpo --config examples/dpo.yaml --lora\n"
               "  lazarus generate --model tiny/ --prompt 'What is 2+3?'\n"
               "  lazarus train sft --help                       # every config field with its default")
    p.add_argument("--version", action="version", version=f"lazarus {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train with SFT, DPO, GRPO or PPO", formatter_class=_Formatter,
                           description="Train a model. `lazarus train PARADIGM --help` lists every config key.")
    tsub = train.add_subparsers(dest="paradigm", metavar="PARADIGM")
    for name, (trainer_name, config_name, desc, fmt) in PARADIGMS.items():
        try:
            _, config_cls = load_paradigm(name)
            epilog = config_help(name, config_cls)
        except Exception as e:  # noqa: BLE001 - a broken optional trainer must not break the whole CLI
            epilog = str(e)
        tp = tsub.add_parser(name, help=desc, formatter_class=_Formatter, epilog=epilog,
                             description=f"{trainer_name}: {desc}. Data lines: {fmt}.")
        tp.add_argument("--model", metavar="DIR", help="model folder (YAML: model)")
        tp.add_argument("--data", metavar="FILE", help="training data, JSON Lines (YAML: data)")
        tp.add_argument("--eval-data", metavar="FILE", help="evaluation data, JSON Lines (YAML: eval_data)")
        tp.add_argument("--config", "-c", metavar="FILE.yaml", help="YAML config: config fields and run keys")
        tp.add_argument("--output", "-o", metavar="DIR", help=f"run folder (YAML: output) [default: runs/{name}]")
        tp.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps (YAML: max_steps)")
        tp.add_argument("--lora", action="store_true", help="train LoRA adapters (YAML: lora: true)")
        tp.add_argument("--resume", metavar="PATH", help="resume from a checkpoint file (YAML: resume)")
        tp.add_argument("--overwrite", action="store_true",
                        help="clear the run folder first when it holds an earlier run (default: refuse)")
        tp.add_argument("--allow-data-change", action="store_true",
                        help="with --resume: accept training data that differs from the checkpoint's")
        tp.add_argument("--tensorboard", metavar="DIR", help="log to TensorBoard in DIR (YAML: tensorboard)")
        tp.add_argument("--set", "-s", action="append", metavar="KEY=VALUE", default=[],
                        help="set any config key, e.g. --set learning_rate=3e-4 --set dpo.beta=0.2 (repeatable)")
        tp.set_defaults(func=cmd_train)

    im = sub.add_parser("init-model", help="write the tiny offline model (a loadable mlx-lm llama + tokenizer)",
                        formatter_class=_Formatter)
    im.add_argument("dir", metavar="DIR")
    im.add_argument("--hidden-size", type=int, help="hidden size [default: 128]")
    im.add_argument("--num-layers", type=int, help="transformer blocks [default: 4]")
    im.add_argument("--seed", type=int, help="weight init seed [default: 0]")
    im.add_argument("--force", action="store_true", help="overwrite a model already in DIR")
    im.set_defaults(func=cmd_init_model)

    demo = sub.add_parser("demo", help="build the tiny model, fine-tune it with SFT then DPO, show before/after",
                          formatter_class=_Formatter)
    demo.add_argument("--output", "-o", default="demo_output", metavar="DIR", help="[default: demo_output]")
    demo.add_argument("--quick", action="store_true", help="a few steps only (for tests); numbers mean little")
    demo.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="always show progress bars [default: when stdout is a terminal]")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress bars")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate a reply with a (fine-tuned) model", formatter_class=_Formatter)
    gen.add_argument("--model", required=True, metavar="DIR", help="base model folder")
    gen.add_argument("--adapter-path", metavar="DIR", help="LoRA adapters folder (a run's checkpoint_dir)")
    gen.add_argument("--checkpoint", metavar="FILE",
                     help="a Lazarus checkpoint (e.g. checkpoints/best.safetensors) to load into the model")
    gen.add_argument("--prompt", required=True, help="the user message (the chat template is applied)")
    gen.add_argument("--system", help="optional system message")
    gen.add_argument("--max-tokens", type=int, default=256, metavar="N", help="[default: 256]")
    gen.add_argument("--temp", type=float, default=0.0, metavar="T", help="sampling temperature, 0 = greedy "
                                                                        "[default: 0.0]")
    gen.add_argument("--seed", type=int, help="sampling seed")
    gen.set_defaults(func=cmd_generate)
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lazarus")
    except Exception:  # noqa: BLE001
        return "unknown"


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        if args.command == "train":
            print("lazarus: error: choose what to train: lazarus train {sft,dpo,grpo,ppo} ... "
                  "(see lazarus train --help)", file=sys.stderr)
        else:
            parser.print_help(sys.stderr)
        return 2
    # transformers warns about long token sequences that the datasets truncate anyway
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        if os.environ.get("LAZARUS_DEBUG"):
            return args.func(args)
        try:
            return args.func(args)
        except KeyboardInterrupt as e:  # a second signal during training, or Ctrl-C before it
            sig = "SIGTERM" if str(e) == "SIGTERM" else "SIGINT"
            print(f"lazarus: interrupted by {sig}", file=sys.stderr)
            return EXIT_CODES[sig]
        except Exception as e:  # noqa: BLE001 - the CLI's promise: one line, no traceback
            code, msg = classify_error(e)
            print(f"lazarus: error: {_one_line(msg)}", file=sys.stderr)
            return code
    finally:
        warnings.showwarning = shown


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, like errors."""
    print(f"lazarus: warning: {_one_line(message)}", file=sys.stderr if file is None else file)


def classify_error(e: BaseException) -> tuple[int, str]:
    """Exit status and message: 2 for user errors (bad input, files, config), 1 otherwise."""
    from pydantic import ValidationError

    from lazarus.checkpointing import CheckpointError, NonFiniteError
    from lazarus.data import DataError
    from lazarus.models import ModelLoadError

    if isinstance(e, NonFiniteError):
        return EXIT_CODES["nan"], f"stopped: {e}"
    if isinstance(e, CLIError):
        return 2, str(e)
    if isinstance(e, DataError):
        return 2, f"bad data: {e}"
    if isinstance(e, ModelLoadError):
        return 2, f"cannot load model: {e}"
    if isinstance(e, CheckpointError):
        return 2, f"checkpoint: {e}"
    if isinstance(e, ValidationError):
        return 2, f"invalid value: {'; '.join(_err_text(x) for x in e.errors())}"
    if isinstance(e, FileNotFoundError):
        return 2, f"file not found: {e.filename or e}"
    if isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return 2, f"{type(e).__name__}: {e.filename or e}"
    if isinstance(e, ValueError):  # the library raises these for invalid input (e.g. RewardError)
        return 2, f"{e}"
    if isinstance(e, OSError):
        return 2, f"{type(e).__name__}: {e}"
    return 1, f"internal error {type(e).__name__}: {e} (rerun with LAZARUS_DEBUG=1 for the traceback)"


def _err_text(err: dict) -> str:
    loc = ".".join(str(x) for x in err.get("loc", ()))
    return f"{loc}: {err.get('msg')}" if loc else str(err.get("msg"))


if __name__ == "__main__":
    sys.exit(main())
