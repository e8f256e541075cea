"""``load_model``: any architecture mlx-lm supports, from a local folder or a Lazarus run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx

from lazarus.models.lora import LoRASettings, apply_lora, mark_lora


class ModelLoadError(ValueError):
    """The model folder is missing, incomplete, or cannot be fetched."""


#: Marks a folder as a Lazarus run folder (``lazarus train --output``); see :func:`resolve_model_dir`.
RUN_MARKER = ".lazarus-run"
#: Instance attribute holding the folder a model was loaded from; written by :func:`_mark_source` only
#: (outside the parameter tree, like :func:`lazarus.models.lora.mark_lora`'s record).
_SOURCE_ATTR = "_lazarus_source"
_MAX_CHAIN = 32  # runs built on runs: a run folder naming itself must not recurse forever


def source_dir(model) -> Path | None:
    """The model folder ``model`` was loaded from (its ``config.json`` and tokenizer files): for a
    model loaded from a run folder, the folder of the model the chain started from. None for a
    model :func:`load_model` did not load."""
    return getattr(model, _SOURCE_ATTR, None)


def _mark_source(model, folder: Path) -> None:
    object.__setattr__(model, _SOURCE_ATTR, folder)


def is_run_folder(path: str | os.PathLike) -> bool:
    """A folder ``lazarus train`` wrote (its marker, or ``config.yaml``) rather than a model folder."""
    p = Path(path)
    return p.is_dir() and not (p / "config.json").exists() and (
        (p / RUN_MARKER).exists() or (p / "config.yaml").exists())


def _run_config(run: Path) -> dict:
    import yaml

    try:
        doc = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{run}/config.yaml is not a readable run config ({type(e).__name__})") from None
    return doc if isinstance(doc, dict) else {}


def adapter_source(path: str | os.PathLike) -> tuple[Path, str | None]:
    """``(adapter folder, base model)`` of a LoRA run folder or of an adapter (checkpoint) folder;
    the base is what ``adapter_config.json`` records, else the run's ``config.yaml`` ``model``."""
    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"adapter folder not found: {p}")
    run = _run_config(p) if is_run_folder(p) else {}
    folder = Path(run.get("checkpoint_dir") or p / "checkpoints") if is_run_folder(p) else p
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.exists() or not (folder / "adapters.safetensors").exists():
        raise ModelLoadError(f"{p} holds no LoRA adapters (no adapters.safetensors + adapter_config.json in "
                             f"{folder}); was it trained with --lora?")
    try:
        base = json.loads(cfg_file.read_text()).get("model")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ModelLoadError(f"{cfg_file}: invalid JSON ({e})") from None
    base = base or run.get("model")
    return folder, str(base) if base else None


def resolve_model_dir(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """What ``load_model(path)`` loads: ``(path, None)`` for a model folder; for a run folder of a
    full fine-tune ``(<run>/model, None)``; for a LoRA run ``(base, adapter folder)``: its base
    with its adapters fused in (the base may itself be a run folder)."""
    p = Path(path)
    if not is_run_folder(p):
        return p, None
    if (p / "model" / "config.json").exists():
        return p / "model", None
    try:
        adapters, base = adapter_source(p)
    except ModelLoadError:
        raise ModelLoadError(f"{p} is a run folder without a model: a full fine-tune writes {p}/model when "
                             "training ends (not when interrupted or stopped on NaN); resume the run "
                             "to finish it") from None
    if base is None:
        raise ModelLoadError(f"{p}: its adapters do not name their base model; pass the base model folder")
    if not Path(base).exists():
        raise ModelLoadError(f"{p} was trained on {base}, which is not found from here; pass that model folder")
    return Path(base), adapters


#: A model folder is data, never code: tokenizers and architectures that need Python files from
#: the folder are refused (transformers would otherwise ask "run custom code? [y/N]" in a terminal).
_NO_REMOTE_CODE = {"trust_remote_code": False}


def context_length(model) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings`` or the
    architecture's equivalent in its mlx-lm args), or None when it does not say."""
    args = getattr(model, "args", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length",
                "n_ctx"):
        value = getattr(args, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return None


def _load_error(where: str, e: Exception) -> ModelLoadError:
    text = str(e)
    if "trust_remote_code" in text or "custom code" in text or "custom module" in text:
        return ModelLoadError(f"{where} needs to run Python code from the model folder (a custom tokenizer or "
                              "architecture); Lazarus never runs code from model folders")
    return ModelLoadError(f"cannot load model from {where}: {type(e).__name__}: {text.splitlines()[0] if text else ''}")


def load_model(path: str | os.PathLike, use_lora: bool = False, *, lora_rank: int = 8,
               lora_scale: float | None = None, lora_alpha: float | None = None, lora_dropout: float = 0.0,
               lora_layers: int = -1, lora_keys: list[str] | None = None,
               adapter_path: str | os.PathLike | None = None, seed: int = 0):
    """Load ``(model, tokenizer)`` from a local Hugging Face / MLX model folder via mlx-lm.

    With ``use_lora=True`` the base is frozen and mlx-lm LoRA layers are added to
    ``lora_layers`` blocks (-1 = all), on ``lora_keys`` (default: every linear layer in the
    blocks, i.e. attention and MLP projections). ``lora_scale`` is mlx-lm's multiplier
    (default 20.0); ``lora_alpha`` is accepted instead and converted to ``alpha / rank``.
    ``adapter_path`` loads adapters saved by Lazarus or by ``mlx_lm.lora`` (and keeps them
    trainable when ``use_lora`` is also set).

    Random initialisation (LoRA's ``lora_a``; ``lora_b`` starts at zero) draws from a generator
    seeded with ``seed``, not from MLX's clock-seeded global one, so the same call gives the same
    weights in every process and every run; the global RNG state is left as it was.
    """
    from lazarus.rng import seeded_rng

    with seeded_rng(seed):
        model, tokenizer, name = _load_base(path)
        return _load(model, tokenizer, name, use_lora, lora_rank, lora_scale, lora_alpha, lora_dropout,
                     lora_layers, lora_keys, adapter_path)


def _load_base(path, depth: int = 0):
    """``(model, tokenizer, name)``: a model folder as mlx-lm loads it; a run folder as
    :func:`resolve_model_dir` says (a LoRA run's adapters fused in place). ``name`` is what a LoRA
    made on top records as its base: the model folder, or the LoRA run folder."""
    folder, adapters = resolve_model_dir(path)
    if adapters is None:
        name = str(folder) if folder != Path(path) else str(path)
        return (*_load_folder(folder, name), name)
    if depth >= _MAX_CHAIN:
        raise ModelLoadError(f"{path}: more than {_MAX_CHAIN} runs chained (does a run name itself as its base?)")
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters

    model, tokenizer, _ = _load_base(folder, depth + 1)
    try:
        load_adapters(model, str(adapters))
    except Exception as e:  # noqa: BLE001 - mismatched or damaged adapters fail in many ways
        raise _load_error(str(adapters), e) from None
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    mx.eval(model.parameters())
    return model, tokenizer, str(path)


def _load_folder(p: Path, name: str):
    from mlx_lm.utils import hf_repo_to_path, load as mlx_load

    if not p.exists():
        if os.environ.get("HF_HUB_OFFLINE") or name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise ModelLoadError(f"model folder not found: {name}. Pass a local Hugging Face/MLX model "
                                 "folder (or run `lazarus init-model DIR` for the tiny offline model)")
        try:
            model, tokenizer = mlx_load(name, tokenizer_config=dict(_NO_REMOTE_CODE), trust_remote_code=False)
            _mark_source(model, hf_repo_to_path(name))
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            raise ModelLoadError(f"{name!r} is not a local folder and could not be fetched from the "
                                 f"Hugging Face hub ({type(e).__name__}: {e}). Download it and pass the "
                                 "folder instead") from None
    else:
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p} is not a model folder: config.json is missing")
        if not list(p.glob("*.safetensors")):
            raise ModelLoadError(f"{p} has no *.safetensors weights")
        try:
            model, tokenizer = mlx_load(str(p), tokenizer_config=dict(_NO_REMOTE_CODE), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - a truncated or malformed file fails in many ways (e.g. RuntimeError)
            raise _load_error(str(p), e) from None
        _mark_source(model, p)
    _stop_at_end_of_turn(tokenizer)
    return model, tokenizer


def _stop_at_end_of_turn(tokenizer) -> None:
    """Make mlx-lm's ``generate`` stop at the chat template's end-of-turn token too (Gemma-style
    models name only ``<eos>`` in their configs, yet end every turn with ``<end_of_turn>``)."""
    from lazarus.data.chat import end_of_turn_id

    end = end_of_turn_id(tokenizer)
    if end is not None and end not in tokenizer.eos_token_ids:
        tokenizer.add_eos_token(str(end))


def _load(model, tokenizer, name, use_lora, lora_rank, lora_scale, lora_alpha, lora_dropout, lora_layers,
          lora_keys, adapter_path):
    if lora_alpha is not None and lora_scale is None:
        lora_scale = lora_alpha / lora_rank
    if adapter_path is not None:
        _load_adapters(model, Path(adapter_path), name, trainable=use_lora)
    elif use_lora:
        apply_lora(model, LoRASettings(rank=lora_rank, scale=20.0 if lora_scale is None else lora_scale,
                                       dropout=lora_dropout, num_layers=lora_layers,
                                       keys=tuple(lora_keys) if lora_keys else None, base_model=name))
    model.eval()
    return model, tokenizer


def _load_adapters(model, adapter_dir: Path, base: str, trainable: bool) -> None:
    from mlx_lm.tuner.utils import load_adapters

    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"{adapter_dir}: adapter_config.json not found")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file}: invalid JSON ({e})") from e
    model.freeze()
    load_adapters(model, str(adapter_dir))
    lp = cfg.get("lora_parameters") or {}
    settings = LoRASettings(rank=lp.get("rank", 8), scale=lp.get("scale", 20.0), dropout=lp.get("dropout", 0.0),
                            num_layers=cfg.get("num_layers", -1),
                            keys=tuple(lp["keys"]) if lp.get("keys") else None, base_model=base)
    mark_lora(model, settings)
    model.freeze()
    if trainable:
        model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
