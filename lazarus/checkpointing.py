"""Atomic, checksummed checkpoint files.

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
files and temporary files of an interrupted write are removed by the next run that takes
the folder's lock (:func:`clean_folder`). Each file's metadata holds a CRC-32 of its
tensors, so a file damaged after it was written (a flipped bit, a truncated copy) is
reported on load instead of being trained on.
"""

from __future__ import annotations

import errno
import json
import os
import re
import uuid
import zlib
from pathlib import Path

import mlx.core as mx

FORMAT_VERSION = "1"
LOCK_NAME = ".lazarus.lock"
_CHECKPOINT_RE = re.compile(r"^(step_\d+|best|final)\.safetensors$")
_STATE_RE = re.compile(r"^[^/\\]+\.[0-9a-f]{12}\.state\.safetensors$")
_TEMP_RE = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp(\.safetensors)?$")  # what _tmp_name makes, nothing else


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, unwritable, or does not fit the model."""


class NonFiniteError(CheckpointError):
    """Weights (or optimizer state) hold NaN/inf: such a checkpoint is never written."""


# ------------------------------------------------------------------ low-level writes
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(path: Path, e: OSError) -> CheckpointError:
    why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return CheckpointError(f"cannot write {path}: {why}")


def _bytes(a: mx.array) -> memoryview:
    view = memoryview(a)
    if not view.c_contiguous:
        view = memoryview(mx.contiguous(a))
    return view.cast("B")


def checksum(arrays: dict) -> str:
    """CRC-32 of the tensors' names, dtypes, shapes and bytes (in name order), as hex.

    CRC-32 detects every single-bit error and runs at several GB/s, so it costs little next
    to writing the file; it guards against damage, not against tampering."""
    crc = 0
    for name in sorted(arrays):
        a = arrays[name]
        crc = zlib.crc32(f"{name}|{a.dtype}|{tuple(a.shape)}".encode(), crc)
        crc = zlib.crc32(_bytes(a), crc)
    return f"{crc:08x}"


def _tmp_name(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}"


def _atomic_write(path: str | os.PathLike, suffix: str, mode: str, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename over ``path``, fsync the
    folder. Any OSError (a full disk included: writes go through a Python file, which reports short
    writes) becomes a :class:`CheckpointError` naming the path; the temporary file never stays."""
    path = Path(path)
    tmp = _tmp_name(path, suffix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_save_safetensors(path: str | os.PathLike, arrays: dict, metadata: dict | None = None) -> None:
    """Write ``arrays`` to ``path`` atomically; the metadata gains ``lazarus_crc32``."""
    mx.eval(arrays)
    meta = dict(metadata or {}, lazarus_crc32=checksum(arrays))
    _atomic_write(path, ".tmp.safetensors", "wb", lambda f: mx.save_safetensors(f, arrays, metadata=meta))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_write(path, ".tmp", "w", lambda f: f.write(text))


# ------------------------------------------------------------------ checkpoints
def first_non_finite(arrays: dict) -> str | None:
    """Name of the first (in name order) floating-point array holding NaN or inf, else None.
    One fused reduction per array, evaluated together: one host sync."""
    names = [k for k in sorted(arrays) if mx.issubdtype(arrays[k].dtype, mx.floating)]
    if not names:
        return None
    ok = mx.stack([mx.isfinite(arrays[k]).all() for k in names]).tolist()
    return next((k for k, good in zip(names, ok) if not good), None)


def write_checkpoint(path: str | os.PathLike, weights: dict, state_arrays: dict, state_doc: dict,
                     non_finite_hint: str = "") -> Path:
    """Write a resumable checkpoint whose weights file is ``path`` (``*.safetensors``).
    Raises :class:`NonFiniteError` (writing nothing; the files already there stay as they are)
    when a weight or optimizer array is NaN or inf; ``non_finite_hint`` ends that message."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    bad = first_non_finite({**weights, **{k: v for k, v in state_arrays.items() if k.startswith("optimizer.")}})
    if bad is not None:
        raise NonFiniteError(f"refusing to write {path}: {bad} holds NaN or inf{non_finite_hint}")
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


def _state_path(path: Path, name) -> Path | None:
    """The state file a weights file names, only when it is a plain file name of the right
    form: a planted name such as ``../x`` must never make pruning delete outside the folder."""
    if not isinstance(name, str) or not _STATE_RE.match(name) or Path(name).name != name:
        return None
    return path.parent / name


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint's weights file and the state file it names (inside its folder only)."""
    path = Path(path)
    state = state_file_for(path)
    for p in (path, state):
        if p is not None and p.exists():
            p.unlink()


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``__metadata__`` of a safetensors file, from its header only (no tensor is read)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 2 <= size <= 100_000_000:
            raise ValueError(f"{path}: not a safetensors file")
        header = json.loads(f.read(size))
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def state_file_for(path: Path) -> Path | None:
    try:
        meta = read_metadata(path)
    except (OSError, ValueError, AttributeError):  # AttributeError: a header that is not a JSON object
        return None
    return _state_path(Path(path), meta.get("lazarus_state_file"))


def _load_verified(path: Path, what: str) -> tuple[dict, dict]:
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
        expected = meta.get("lazarus_crc32")
        if expected is not None and checksum(arrays) != expected:
            raise CheckpointError(f"{what} {path} is corrupt: its checksum does not match (damaged or "
                                  "partially copied file)")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt or truncated file
        raise CheckpointError(f"cannot read {what} {path}: {e}") from None
    return arrays, meta


def read_weights(path: str | os.PathLike) -> tuple[dict, dict]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass a .safetensors file in it")
    return _load_verified(path, "checkpoint")


def peek_state_doc(path: str | os.PathLike) -> dict | None:
    """The resume state's JSON document of the checkpoint at ``path``, read from the file headers
    only and without verifying checksums; None when it cannot be read. For settings that must be
    known before the model is prepared (``restore`` later reads and verifies everything)."""
    try:
        state_path = state_file_for(Path(path))
        doc = json.loads(read_metadata(state_path)["lazarus_state"]) if state_path is not None else None
    except Exception:  # noqa: BLE001  (any damage: restore() reports it properly)
        return None
    return doc if isinstance(doc, dict) else None


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """Return ``(weights, state_arrays, state_doc)`` of a resumable checkpoint."""
    path = Path(path)
    weights, meta = read_weights(path)
    state_name = meta.get("lazarus_state_file")
    if not state_name:
        raise CheckpointError(f"{path} holds weights only (no resume state); "
                              "use trainer.load_checkpoint() to load the weights")
    state_path = _state_path(path, state_name)
    if state_path is None:
        raise CheckpointError(f"{path}: names an invalid resume state file {state_name!r}")
    if not state_path.exists():
        raise CheckpointError(f"{path}: its resume state {state_name} is missing")
    arrays, smeta = _load_verified(state_path, "resume state")
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


# ------------------------------------------------------------------ the folder
def list_checkpoints(directory: str | os.PathLike) -> list[str]:
    """Names of the checkpoints (``step_N``, ``best``, ``final``) in ``directory``, never a
    temporary or state file."""
    d = Path(directory)
    if not d.is_dir():
        return []
    names = [p.name for p in d.iterdir() if _CHECKPOINT_RE.match(p.name)]
    return sorted(names, key=lambda n: (not n.startswith("step_"), int(n[5:-12]) if n.startswith("step_") else 0, n))


def clean_folder(directory: str | os.PathLike) -> list[str]:
    """Remove what interrupted writes left in ``directory``: temporary files of
    :func:`atomic_save_safetensors` / :func:`atomic_write_text` and state files that no
    weights file names. Call it only while holding the folder's :class:`FolderLock`."""
    d = Path(directory)
    if not d.is_dir():
        return []
    removed = []
    named = set()
    for p in d.iterdir():
        if p.name.endswith(".safetensors") and not p.name.startswith(".") and ".state." not in p.name:
            s = state_file_for(p)
            if s is not None:
                named.add(s.name)
    for p in d.iterdir():
        temp = _TEMP_RE.match(p.name) is not None
        orphan = _STATE_RE.match(p.name) is not None and p.name not in named
        if (temp or orphan) and p.is_file():
            try:
                p.unlink()
                removed.append(p.name)
            except OSError:
                pass
    return removed


_HELD: dict[str, list] = {}  # resolved folder -> [open lock file, count]: re-entrant inside one process


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lazarus.lock``: two runs never write one checkpoint
    folder at once. The kernel drops it when the process dies (even by kill -9), so a crash
    never leaves a stale lock. Re-entrant within a process (the CLI and the Checkpoint
    callback both take it). Taking it also proves the folder is writable."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.held = False

    def acquire(self) -> "FolderLock":
        import fcntl

        if self.held:
            return self
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _write_error(self.directory, e) from None
        key = str(self.directory.resolve())
        if key in _HELD:
            _HELD[key][1] += 1
            self.held = True
            return self
        path = self.directory / LOCK_NAME
        try:
            f = open(path, "a+")
        except OSError as e:
            raise _write_error(path, e) from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise CheckpointError(f"{self.directory} is in use by another run (pid {owner}); wait for it to "
                                  "finish or choose another output folder") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
        except OSError as e:
            f.close()
            raise _write_error(path, e) from None
        _HELD[key] = [f, 1]
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        key = str(self.directory.resolve())
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            entry[0].close()  # closing the file drops the flock
