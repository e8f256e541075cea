"""Atomic checkpoint files.

A checkpoint named ``NAME`` in a directory is two files:

* ``NAME.safetensors`` - the trainable weights only (LoRA adapters when LoRA is on,
  otherwise all weights), loadable with ``mx.load`` / ``trainer.load_checkpoint``;
* ``NAME.<id>.state.safetensors`` - everything needed to resume exactly: optimizer
  arrays, RNG key, trainer arrays (e.g. DPO's reference cache), buffered rollouts, and
  a JSON document (safetensors metadata) with counters, data position, RNG states and
  every stateful callback's ``state_dict()``.

The weights file names its state file in its metadata and is renamed into place *last*:
that rename is the commit point. A process killed at any moment therefore leaves either
the previous complete checkpoint or the new complete one, never a mix; orphaned state
files from an interrupted write are removed by the next successful write.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import mlx.core as mx

FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not fit the model."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_safetensors(path: str | os.PathLike, arrays: dict, metadata: dict | None = None) -> None:
    """Write ``arrays`` to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.safetensors"
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def write_checkpoint(path: str | os.PathLike, weights: dict, state_arrays: dict, state_doc: dict) -> Path:
    """Write a resumable checkpoint whose weights file is ``path`` (``*.safetensors``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    stem = path.name[: -len(".safetensors")]
    state_name = f"{stem}.{uuid.uuid4().hex[:12]}.state.safetensors"
    atomic_save_safetensors(path.parent / state_name, state_arrays,
                            {"lazarus_state": json.dumps(state_doc), "lazarus_format": FORMAT_VERSION})
    atomic_save_safetensors(path, weights, {"lazarus_state_file": state_name,
                                            "lazarus_format": FORMAT_VERSION, "format": "mlx"})
    # The rename above committed the new checkpoint; older state files of this name are now garbage.
    for old in path.parent.glob(f"{stem}.*.state.safetensors"):
        if old.name != state_name and old.name.count(".") == 3:
            try:
                old.unlink()
            except OSError:
                pass
    return path


def remove_checkpoint(path: str | os.PathLike) -> None:
    path = Path(path)
    state = state_file_for(path)
    for p in (path, state):
        if p is not None and p.exists():
            p.unlink()


def state_file_for(path: Path) -> Path | None:
    try:
        _, meta = mx.load(str(path), return_metadata=True)
    except Exception:
        return None
    name = meta.get("lazarus_state_file")
    return path.parent / name if name else None


def read_weights(path: str | os.PathLike) -> tuple[dict, dict]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    return weights, meta


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """Return ``(weights, state_arrays, state_doc)`` of a resumable checkpoint."""
    path = Path(path)
    weights, meta = read_weights(path)
    state_name = meta.get("lazarus_state_file")
    if not state_name:
        raise CheckpointError(f"{path} holds weights only (no resume state); "
                              "use trainer.load_checkpoint() to load the weights")
    state_path = path.parent / state_name
    if not state_path.exists():
        raise CheckpointError(f"{path}: its resume state {state_name} is missing")
    arrays, smeta = mx.load(str(state_path), return_metadata=True)
    try:
        doc = json.loads(smeta["lazarus_state"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_path}: resume state is unreadable ({e})") from e
    return weights, arrays, doc


def check_compatible(path, saved: dict, expected: dict) -> None:
    """Raise a CheckpointError naming what differs between saved and expected weights."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(saved) & set(expected)) if tuple(saved[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise CheckpointError(f"checkpoint {path} does not match this model: " + "; ".join(parts)
                              + ". Was it saved from a different model or LoRA setup?")
