"""Model folders out: a trained model (LoRA adapters fused into their base) written as a folder that
``load_model``, ``mlx_lm.load``/``mlx_lm.generate`` and the next ``lazarus train --model`` accept.

* :func:`save_model_folder` writes ``config.json`` (the source folder's, ``torch_dtype`` and the
  quantization entries updated), the weights sharded like mlx-lm (``model.safetensors`` or
  ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``), the tokenizer with its
  chat template (``tokenizer.save_pretrained``) and ``generation_config.json``. Weights are written
  in the base model's dtype unless told otherwise; layers that were quantized in the base stay
  quantized (re-quantized with the base's bits and group size, as ``mlx_lm.fuse`` does) unless
  ``dequantize``. The folder is built under a hidden temporary name beside ``out_dir`` and renamed
  into place when complete, so a killed export never leaves a folder that looks like a model.
* :func:`fuse_adapters` is ``lazarus export``: a base (a model or run folder) + adapters -> folder.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from lazarus.checkpointing import NonFiniteError, _fsync_dir, first_non_finite
from lazarus.guards import process_alive
from lazarus.models.loading import load_model, source_dir as loaded_from
from lazarus.models.precision import as_dtype, dtype_name

#: safetensors dtype names -> MLX dtypes (the floating ones a base model may be published in)
_FLOAT_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}
#: non-affine quantization modes: scales are uint8 and each mode allows one (bits, group size)
_MODES = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}


def _weight_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("model*.safetensors"))  # what mlx_lm.utils.load_model reads


def source_tensors(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """``name -> (safetensors dtype, shape)`` of every tensor in the folder's weight files, read
    from the files' headers only (no tensor is loaded)."""
    out = {}
    for f in _weight_files(folder):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        out.update({k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return out


def fused_weights(model: nn.Module, dequantize: bool = False) -> dict[str, mx.array]:
    """The model's weights with every LoRA layer fused into its base layer (mlx-lm's
    ``LoRALinear.fuse(dequantize=...)``) and, with ``dequantize``, every quantized layer made an
    ordinary one (``mlx_lm.utils.dequantize_model``). The model itself is left as it is."""
    from mlx_lm.utils import dequantize_model

    weights = dict(tree_flatten(model.parameters()))
    replaced = {name: m.fuse(dequantize=dequantize) for name, m in model.named_modules()
                if name and hasattr(m, "fuse")}
    if dequantize:
        for name, m in model.named_modules():
            if "scales" in m and name and not any(name.startswith(f"{p}.") for p in replaced):
                holder = nn.Module()
                holder.layer = m  # dequantize_model replaces holder.layer, never the model's layer
                replaced[name] = dequantize_model(holder).layer
    for name, layer in replaced.items():
        weights = {k: v for k, v in weights.items() if not k.startswith(f"{name}.")}
        weights.update({f"{name}.{k}": v for k, v in tree_flatten(layer.parameters())})
    return weights


def _quant_params(in_dims: int, packed_cols: int, scale_cols: int, uint8_scales: bool) -> dict:
    """What mlx-lm's ``infer_quant_config`` recovers from a saved layer's shapes."""
    group, bits = in_dims // scale_cols, packed_cols * 32 // in_dims
    return {"group_size": group, "bits": bits, "mode": _MODES.get((bits, group), "affine") if uint8_scales
            else "affine"}


def _requantize(weights: dict, source: Path, saved: dict, dtype: mx.Dtype) -> dict | None:
    """Quantize again, with the base's bits, group size and mode, the layers that were quantized in the
    base folder but are ordinary here (dequantized for training, or fused into a dequantized base);
    a layer whose values are still exactly the base's gets the base's own tensors back. Returns the
    last parameters used (None when nothing was quantized)."""
    params, originals = None, None
    for path in sorted(k[: -len(".scales")] for k in saved if k.endswith(".scales")):
        w = weights.get(f"{path}.weight")
        if w is None or f"{path}.scales" in weights or f"{path}.weight" not in saved:
            continue
        params = _quant_params(w.shape[-1], saved[f"{path}.weight"][1][-1], saved[f"{path}.scales"][1][-1],
                               saved[f"{path}.scales"][0] == "U8")
        if originals is None:  # mx.load is lazy: only the tensors compared below are read
            originals = {k: v for f in _weight_files(source) for k, v in mx.load(str(f)).items()}
        old = [originals[f"{path}.{k}"] for k in ("weight", "scales", "biases") if f"{path}.{k}" in originals]
        same = mx.dequantize(*old[:2], old[2] if len(old) > 2 else None, **params).astype(w.dtype)
        packed = old if mx.array_equal(same, w).item() else mx.quantize(w.astype(dtype), **params)
        weights.update(zip((f"{path}.weight", f"{path}.scales", f"{path}.biases"), packed))
    return params


def _model_quantization(model: nn.Module) -> dict | None:
    m = next((m for _, m in model.named_modules() if "scales" in m and hasattr(m, "bits")), None)
    return None if m is None else {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}


def _config(source: Path, weights: dict, dtype: mx.Dtype, quantization: dict | None) -> dict:
    """The source's config.json with this folder's dtype; while quantized layers remain, mlx-lm's
    ``quantization`` entry (the source's, else the layers' own settings) and its copy
    ``quantization_config``; without them, neither."""
    config = json.loads((source / "config.json").read_text())
    config.pop("_name_or_path", None)
    config["torch_dtype"] = dtype_name(dtype)
    if "dtype" in config:  # newer transformers write both
        config["dtype"] = dtype_name(dtype)
    if not any(k.endswith(".scales") for k in weights):
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    else:
        if not isinstance(config.get("quantization"), dict):
            config["quantization"] = quantization
        config["quantization_config"] = config["quantization"]  # as mlx_lm.utils.save_config writes it
    return config


def _cast(model: nn.Module, weights: dict, dtype: mx.Dtype) -> dict:
    """Floating weights in ``dtype``, except those the architecture keeps as they are
    (mlx-lm's ``cast_predicate``, as ``mlx_lm.convert --dtype`` does)."""
    keep = getattr(model, "cast_predicate", lambda _: True)
    cast = as_dtype({k: v for k, v in weights.items() if keep(k)}, dtype)
    return {k: cast.get(k, v) for k, v in weights.items()}


def save_model_folder(model: nn.Module, tokenizer, out_dir: str | os.PathLike, *,
                      source_dir: str | os.PathLike | None = None, dtype: mx.Dtype | None = None,
                      dequantize: bool = False) -> Path:
    """Write ``model`` (LoRA layers fused) as a complete model folder at ``out_dir``; returns it.

    ``source_dir``: the folder whose ``config.json`` and ``generation_config.json`` describe the
    model (default: the one :func:`lazarus.models.load_model` loaded it from). ``dtype``: the
    weights' dtype (default: the source's, so a bfloat16 model stays bfloat16 whatever it computed
    in). ``dequantize``: write quantized layers as ordinary ones (else the base's 4-bit layers stay
    4-bit). An existing ``out_dir`` is replaced only once the new folder is complete."""
    source = Path(source_dir) if source_dir is not None else loaded_from(model)
    if source is None or not (Path(source) / "config.json").exists():
        raise ValueError("save_model_folder needs source_dir= (the model folder whose config.json describes "
                         f"this model); got {source}")
    saved = source_tensors(source)
    if dtype is None:
        floats = Counter(d for d, _ in saved.values() if d in _FLOAT_DTYPES)
        dtype = _FLOAT_DTYPES[floats.most_common(1)[0][0]] if floats else mx.float32
    weights = fused_weights(model, dequantize)
    quantization = _model_quantization(model)
    if not dequantize:
        quantization = _requantize(weights, Path(source), saved, dtype) or quantization
    weights = _cast(model, weights, dtype)
    bad = first_non_finite(weights)
    if bad is not None:
        raise NonFiniteError(f"not writing a model folder: {bad} holds NaN or inf")
    config = _config(Path(source), weights, dtype, quantization)
    return _write_folder(Path(out_dir), weights, config, tokenizer, Path(source))


def _write_folder(out: Path, weights: dict, config: dict, tokenizer, source: Path) -> Path:
    from mlx_lm.utils import make_shards

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        tmp.mkdir()
        shards = make_shards(weights)
        pattern = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
        for i, shard in enumerate(shards):
            name = pattern.format(i + 1, len(shards))
            mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
            index["weight_map"].update(dict.fromkeys(shard, name))
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
        (tmp / "config.json").write_text(json.dumps(config, indent=4))
        tokenizer.save_pretrained(str(tmp))
        if (source / "generation_config.json").exists():
            shutil.copy(source / "generation_config.json", tmp / "generation_config.json")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _install(tmp: Path, out: Path) -> None:
    """Rename the complete folder into place; an earlier folder there is moved aside first and
    deleted after (in between, no folder at ``out`` at all: never a half-old, half-new one)."""
    old = None
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old"
        os.replace(out, old)
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def _remove_stale(out: Path) -> None:
    """What a killed export to ``out`` left beside it (unless its process still runs)."""
    for p in [*out.parent.glob(f".{out.name}.*.partial"), *out.parent.glob(f".{out.name}.*.old")]:
        pid = p.name[len(out.name) + 2:].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and process_alive(int(pid)):
            continue  # another export to the same place is under way
        shutil.rmtree(p, ignore_errors=True)


def fuse_adapters(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  dequantize: bool = False) -> Path:
    """``lazarus export``: load ``base_dir`` (a model folder, or a run folder) with the LoRA adapters
    of ``adapter_dir``, fuse them (mlx-lm's ``fuse``; ``dequantize`` also turns 4-bit layers into
    ordinary ones) and write the model folder ``out_dir`` in the base's dtype."""
    model, tokenizer = load_model(base_dir, adapter_path=adapter_dir)
    return save_model_folder(model, tokenizer, out_dir, dequantize=dequantize)
