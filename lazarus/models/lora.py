"""LoRA through mlx-lm's own modules, saved in mlx-lm's adapter format."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from lazarus.checkpointing import atomic_save_safetensors, atomic_write_text


@dataclass(frozen=True)
class LoRASettings:
    """What ``adapter_config.json`` records. ``keys=None`` means every linear layer inside
    the transformer blocks (attention and MLP projections), mlx-lm's default."""

    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: int = -1  # -1: all blocks
    keys: tuple[str, ...] | None = None
    base_model: str | None = None

    def adapter_config(self, num_blocks: int) -> dict:
        params = {"rank": self.rank, "scale": self.scale, "dropout": self.dropout}
        if self.keys:
            params["keys"] = list(self.keys)
        return {"fine_tune_type": "lora", "num_layers": num_blocks if self.num_layers < 0 else self.num_layers,
                "lora_parameters": params, "model": self.base_model}


#: Instance attribute holding a model's :class:`LoRASettings`; written by :func:`mark_lora` only.
_SETTINGS_ATTR = "_lazarus_lora"


def mark_lora(model: nn.Module, settings: LoRASettings) -> None:
    """Record that ``model`` carries LoRA adapters made with ``settings`` (what
    :func:`save_adapters` writes to ``adapter_config.json``); read back with :func:`lora_settings`.
    The one place the record is written: :func:`apply_lora` and ``load_model(adapter_path=...)``
    both call it.

    Why ``object.__setattr__`` and not ``model.x = settings``: an mlx ``nn.Module`` is a dict of
    its children and parameters, and ``Module.__setattr__`` stores arrays, dicts, lists and
    tuples *as entries of that dict*, where ``parameters()``, ``update()``, ``tree_flatten`` and
    checkpoints see them. The record goes to the instance's ``__dict__`` instead, outside the
    parameter tree whatever the settings type becomes, and travels with the model object."""
    object.__setattr__(model, _SETTINGS_ATTR, settings)


def lora_settings(model: nn.Module) -> LoRASettings | None:
    """The settings :func:`mark_lora` recorded for ``model``; None for a model without LoRA."""
    return getattr(model, _SETTINGS_ATTR, None)


def apply_lora(model: nn.Module, settings: LoRASettings) -> nn.Module:
    """Freeze the base and insert LoRA layers (mlx-lm's ``LoRALinear``) in place."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if settings.rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {settings.rank}")
    num_blocks = len(model.layers)
    n = num_blocks if settings.num_layers < 0 else settings.num_layers
    if n > num_blocks:
        raise ValueError(f"lora num_layers={n} but the model has only {num_blocks} blocks")
    model.freeze()
    cfg = {"rank": settings.rank, "scale": settings.scale, "dropout": settings.dropout}
    if settings.keys:
        cfg["keys"] = list(settings.keys)
    linear_to_lora_layers(model, n, cfg)
    mark_lora(model, settings)
    return model


def save_adapters(model: nn.Module, directory: str | Path, dtype: mx.Dtype | None = None) -> Path:
    """Write ``adapters.safetensors`` + ``adapter_config.json`` that ``mlx_lm.generate
    --adapter-path`` and ``mlx_lm.fuse`` accept (floating weights cast to ``dtype`` when given)."""
    settings = lora_settings(model)
    if settings is None:
        raise ValueError("model has no LoRA adapters (load it with use_lora=True)")
    directory = Path(directory)
    weights = dict(tree_flatten(model.trainable_parameters()))
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    mx.eval(weights)
    atomic_save_safetensors(directory / "adapters.safetensors", weights)
    atomic_write_text(directory / "adapter_config.json",
                      json.dumps(settings.adapter_config(len(model.layers)), indent=2))
    return directory


def _lora_modules(model: nn.Module):
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    kinds = (LoRALinear, LoRASwitchLinear, LoRAEmbedding)
    return [m for _, m in model.named_modules() if isinstance(m, kinds)]


@contextmanager
def adapters_disabled(model: nn.Module):
    """Temporarily run the base model: every LoRA layer's scale is set to 0.

    Used for the frozen reference of DPO/GRPO/PPO when the policy is a LoRA model, so no
    second copy of the weights is needed."""
    modules = _lora_modules(model)
    saved = [m.scale for m in modules]
    try:
        for m in modules:
            m.scale = 0.0
        yield model
    finally:
        for m, s in zip(modules, saved):
            m.scale = s
