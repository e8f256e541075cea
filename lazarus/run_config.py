"""``lazarus train``'s configuration: the YAML config, ``--set`` and the flags merged into run keys
(:data:`RUN_KEYS`: model, data, lora, loggers ...) and the paradigm's validated trainer config;
the ``--help`` text listing every key; the run keys turned into LoRA settings, reward functions
and callbacks. Errors are :class:`CLIError` lines naming the key.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import io
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from lazarus.cli_common import CLIError


class Applies:
    """The paradigms a run key applies to, read from the training registry when asked (so a
    paradigm registered later counts too): every one, or those registered with flag ``needs``."""

    def __init__(self, needs: str | None = None):
        self.needs = needs

    def __iter__(self):
        from lazarus.training import registry

        return iter([p.name for p in registry.paradigms() if self.needs is None or getattr(p, self.needs)])

    def __contains__(self, name) -> bool:
        return name in list(self)

    def __repr__(self) -> str:
        return repr(tuple(self))


EVERY, WITH_REFERENCE, WITH_REWARD = Applies(), Applies("reference_model"), Applies("reward")

#: YAML keys that are not trainer config fields: (description, default shown in --help, paradigms)
RUN_KEYS: dict[str, tuple[str, str, Applies]] = {
    "model": ("Model folder (Hugging Face / MLX layout; `lazarus init-model DIR` makes a tiny one), or an earlier "
              "run folder: a full fine-tune's model/, a LoRA run's base with its adapters fused in", "required",
              EVERY),
    "data": ("Training data: .jsonl, .json array, .parquet, or a folder with train.jsonl (and valid.jsonl, "
             "the eval set unless eval_data is given)", "required", EVERY),
    "eval_data": ("Evaluation data (same formats as data)", "None", EVERY),
    "output": ("Run folder: checkpoints/ (unless checkpoint_dir is set), config.yaml, history.json, and model/ "
               "(a full fine-tune's model folder, written when training ends); one that holds another run is "
               "refused (--resume continues it, --overwrite clears it)",
               "runs/<paradigm>", EVERY),
    "lora": ("Train LoRA adapters: true, or {rank: 8, scale: 20.0 | alpha: 16, dropout: 0.0, layers: -1, "
             "keys: [...]}", "false", EVERY),
    "adapter_path": ("Start from adapters saved earlier (a folder with adapter_config.json)", "None", EVERY),
    "reference_model": ("Frozen reference model folder or run folder (default: the policy before training, or the "
                        "LoRA base)",
                        "None", WITH_REFERENCE),
    "reward": ("Reward function(s): 'module:function' or 'path/to/file.py:function', or a list of them "
               "(reward or reward_model is required)", "None", WITH_REWARD),
    "reward_model": ("Reward model folder (`lazarus train reward`'s run folder or its checkpoints/reward_model), "
                     "scored beside or instead of reward; its weight is the last of reward_weights", "None",
                     WITH_REWARD),
    "reward_weights": ("Weights of the reward functions, then of the reward model (a list)", "1.0 each",
                       WITH_REWARD),
    "system_prompt": ("System message put before every prompt (through the chat template)", "None", EVERY),
    "tensorboard": ("TensorBoard log folder (true: <output>/tb)", "None", EVERY),
    "wandb": ("Weights & Biases: true, a project name, or wandb.init arguments {project: ..., name: ...}; "
              "logs in <output>/wandb; WANDB_MODE=offline works without an account", "None", EVERY),
    "early_stopping": ("EarlyStopping arguments {monitor: eval/loss, patience: 3, min_delta: 0.0, "
                       "stopping_threshold: ...}", "None", EVERY),
    "progress_bar": ("true: always a bar; false: no progress output; auto: a bar on a terminal, else a plain "
                     "line every log_interval steps", "auto", EVERY),
    "resume": ("Resume exactly from a checkpoint (e.g. <output>/checkpoints/step_500.safetensors)", "None", EVERY),
}
LORA_KEYS = {"rank": "lora_rank", "scale": "lora_scale", "alpha": "lora_alpha", "dropout": "lora_dropout",
             "layers": "lora_layers", "keys": "lora_keys"}


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
    """(trainer class, config class) registered as ``paradigm`` (:mod:`lazarus.training.registry`)."""
    from lazarus.training import registry

    try:
        found = registry.get(paradigm)
    except KeyError as e:
        raise CLIError(e.args[0]) from None
    return found.trainer_class, found.config_class


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


def reward_kwargs(run: dict) -> dict:
    """The ``reward`` (and ``reward_weights``) run keys as the trainer's ``reward_fn=`` (and
    ``reward_weights=``) keywords; the reward functions are imported here."""
    specs = run.get("reward") or []
    specs = specs if isinstance(specs, list) else [specs]
    kwargs = {"reward_fn": [load_reward(s) for s in specs] or None}
    if run.get("reward_model"):
        kwargs["reward_model"] = path_value(run, "reward_model")
    weights = run.get("reward_weights")
    if weights is not None:
        kwargs["reward_weights"] = weights if isinstance(weights, list) else [weights]
    return kwargs


def path_value(run: dict, key: str) -> str | None:
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
    output = Path(path_value(run, "output") or Path("runs") / paradigm)
    run["output"] = str(output)
    if "checkpoint_dir" not in cfg:
        cfg["checkpoint_dir"] = str(output / "checkpoints")
        run["_derived"] = ["checkpoint_dir"]  # follows --output; not pinned in the saved config.yaml
    config = build_config(paradigm, config_cls, cfg)
    for key in ("model", "data"):
        if not run.get(key):
            raise CLIError(f"no {key} given: pass --{key} or put '{key}:' in the YAML config")
    if paradigm in WITH_REWARD and not (run.get("reward") or run.get("reward_model")):
        raise CLIError(f"`lazarus train {paradigm}` needs a reward function: put 'reward: module:function' "
                       "(or 'path/to/file.py:function') in the YAML config, or --set reward=... (or a "
                       "reward_model: FOLDER)")
    return paradigm, run, config, trainer_cls, config_cls
