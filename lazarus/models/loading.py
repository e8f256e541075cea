"""``load_model``: any architecture mlx-lm supports, from a local folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lazarus.models.lora import LoRASettings, apply_lora, mark_lora


class ModelLoadError(ValueError):
    """The model folder is missing, incomplete, or cannot be fetched."""


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
        return _load(path, use_lora, lora_rank, lora_scale, lora_alpha, lora_dropout, lora_layers, lora_keys,
                     adapter_path)


def _load(path, use_lora, lora_rank, lora_scale, lora_alpha, lora_dropout, lora_layers, lora_keys, adapter_path):
    from mlx_lm.utils import load as mlx_load

    p = Path(path)
    name = str(path)
    if not p.exists():
        if os.environ.get("HF_HUB_OFFLINE") or name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise ModelLoadError(f"model folder not found: {name}. Pass a local Hugging Face/MLX model "
                                 "folder (or run `lazarus init-model DIR` for the tiny offline model)")
        try:
            model, tokenizer = mlx_load(name, tokenizer_config=dict(_NO_REMOTE_CODE), trust_remote_code=False)
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
