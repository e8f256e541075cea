"""The dtype policy: which dtype computes, which is saved, and what happens to 4-bit layers.

Published checkpoints are bfloat16 or float16, or 4-bit with float16 scales. MLX's CPU backend
emulates half precision: a bfloat16 matmul ran ~3.6x slower than float32 on the machines we
measured, and a 4-bit matmul with float16 scales ~50x slower than with float32 scales. So:

* ``dtype: auto`` computes in float32 on the CPU backend (floating weights and quantization
  scales/biases are upcast) and in the model's own dtype on a GPU; ``float32``, ``bfloat16`` and
  ``float16`` force one.
* ``dequantize: auto`` replaces frozen quantized layers by ordinary ones in the compute dtype on
  the CPU backend when the dequantized weights fit comfortably in memory (half of what is
  available); ``true`` always does, ``false`` never. A GPU keeps 4-bit layers (its quantized
  kernels are fast and the memory saving is the point).
* Whatever computes, checkpoints, adapters and exported models are written in the base model's
  dtype (``save_dtype: base``), so a bf16 model stays a bf16 model; the state file beside a
  checkpoint keeps the compute-dtype copy, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


class PrecisionError(ValueError):
    """A dtype/quantization setting that cannot work (e.g. full fine-tuning of 4-bit weights)."""


def dtype_name(dtype: mx.Dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("mlx.core."))


@dataclass
class Precision:
    """What a run computes in and saves in; shown in the start-of-run summary."""

    base: mx.Dtype  # the checkpoint's floating dtype
    compute: mx.Dtype  # what the forward/backward pass runs in
    save: mx.Dtype  # what checkpoints, adapters and model folders hold
    quantized_layers: int = 0  # 4-bit (or 8-bit) layers in the loaded model
    dequantized_layers: int = 0  # of those, turned into ordinary layers for training
    bits: int | None = None

    def describe(self) -> str:
        text = f"computes in {dtype_name(self.compute)}, saves {dtype_name(self.save)}"
        if self.quantized_layers:
            kept = self.quantized_layers - self.dequantized_layers
            text += (f"; {self.bits}-bit base: {self.dequantized_layers} layers dequantized for training"
                     + (f", {kept} kept quantized" if kept else ""))
        return text


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _QUANTIZED)]


def base_dtype(model: nn.Module) -> mx.Dtype:
    """The floating dtype holding most of the published model's values (a 4-bit model's scales count:
    they are in the dtype the model was published in). LoRA's own matrices (float32 however the base
    was published) are left out."""
    counts = Counter()
    for k, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating) and not k.endswith((".lora_a", ".lora_b")):
            counts[v.dtype] += v.size
    return counts.most_common(1)[0][0] if counts else mx.float32


def compute_dtype(requested: str, base: mx.Dtype) -> mx.Dtype:
    """``auto``: float32 on the CPU backend (half precision is emulated there), else ``base``."""
    if requested == "auto":
        return mx.float32 if mx.default_device() == mx.cpu else base
    return DTYPES[requested]


def _dequantized_bytes(modules, dtype: mx.Dtype) -> int:
    total = 0
    for _, m in modules:
        rows, packed = m.weight.shape
        total += rows * packed * (32 // m.bits) * dtype.size
    return total


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def should_dequantize(setting: bool | str, modules, dtype: mx.Dtype) -> bool:
    if not modules:
        return False
    if setting != "auto":
        return bool(setting)
    if mx.default_device() != mx.cpu:
        return False
    free = _available_memory()
    return free is None or _dequantized_bytes(modules, dtype) <= free // 2


def _plain_layer(m: nn.Module, dtype: mx.Dtype) -> nn.Module:
    weight = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits,
                           mode=getattr(m, "mode", "affine")).astype(dtype)
    if isinstance(m, nn.QuantizedEmbedding):
        layer = nn.Embedding(*weight.shape)
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in m)
        if "bias" in m:
            layer.bias = m.bias.astype(dtype)
    layer.weight = weight
    return layer


def apply_precision(model: nn.Module, *, dtype: str = "auto", dequantize: bool | str = "auto",
                    save_dtype: str = "base", full_fine_tune: bool = False, agree=bool) -> Precision:
    """Put ``model`` in its training precision, in place, and say what was done.

    Floating parameters (and quantization scales/biases) are cast to the compute dtype; quantized
    layers are dequantized per ``dequantize``. Trainable/frozen status is kept: a dequantized layer
    that was frozen stays frozen. Full fine-tuning a model with quantized layers that stay quantized
    is refused unless ``dequantize`` is ``True`` (only its norms would train; ``auto`` never decides to
    turn a 4-bit model into a full-size one). ``agree`` turns this process's ``auto`` decision into the
    one every rank takes (``Ranks.rank0_choice``): free memory differs between processes."""
    base = base_dtype(model)
    compute = compute_dtype(dtype, base)
    quantized = quantized_modules(model)
    bits = quantized[0][1].bits if quantized else None
    if quantized and full_fine_tune and dequantize is not True:  # `auto` must not turn 4-bit into a full model
        raise PrecisionError(
            f"full fine-tuning a {bits}-bit model would train only its norm weights: use LoRA (--lora / "
            "use_lora=True), or set dequantize: true to train (and save) all weights dequantized")
    undo = should_dequantize(dequantize, quantized, compute)
    if dequantize == "auto" and quantized:
        undo = agree(undo)
    if undo:
        frozen = {name for name, _ in quantized}
        model.update_modules(tree_unflatten([(name, _plain_layer(m, compute)) for name, m in quantized]))
        if not full_fine_tune:
            for name, m in model.named_modules():
                if name in frozen:
                    m.freeze()
    # LoRA's own matrices stay as created (float32), as mlx-lm keeps them over a bf16 base
    cast = [(k, v.astype(compute)) for k, v in tree_flatten(model.parameters())
            if mx.issubdtype(v.dtype, mx.floating) and v.dtype != compute and not k.endswith((".lora_a", ".lora_b"))]
    if cast:
        model.update(tree_unflatten(cast))
    mx.eval(model.parameters())
    save = base if save_dtype == "base" else DTYPES[save_dtype]
    return Precision(base=base, compute=compute, save=save, quantized_layers=len(quantized),
                     dequantized_layers=len(quantized) if undo else 0, bits=bits)


def as_dtype(arrays: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Floating arrays cast to ``dtype`` (integer/packed arrays untouched)."""
    return tree_map(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v, arrays)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting a packed quantized weight by the values it holds
    (as mlx-lm's trainer reports them)."""
    total = 0
    for _, m in model.named_modules():
        for k, v in m.items():
            if not isinstance(v, mx.array):
                continue
            if isinstance(m, _QUANTIZED) and k == "weight":
                total += v.size * 32 // m.bits
            elif not (isinstance(m, _QUANTIZED) and k in ("scales", "biases")):
                total += v.size
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return trainable, total
