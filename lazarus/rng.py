"""Random-number state: seeding every generator a run uses, and saving/restoring it exactly.

MLX seeds its global PRNG from the clock, so two processes (or two ranks) draw different numbers
unless something seeds them; a resumed run must continue the very same streams."""

from __future__ import annotations

import contextlib
import random

import mlx.core as mx
import numpy as np


def seed_all(seed: int) -> None:
    """Seed MLX's, NumPy's and Python's global generators."""
    mx.random.seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def set_mlx_rng_key(key: mx.array) -> None:
    """Make ``key`` (a saved ``mx.random.state[0]``) MLX's global PRNG key again.

    The state object is not assignable; ``mx.random.seed(n)`` installs key ``[n >> 32, n & 0xffffffff]``,
    so seeding with ``hi << 32 | lo`` restores ``[hi, lo]`` exactly."""
    hi, lo = (int(v) for v in key.tolist())
    mx.random.seed((hi << 32) | lo)


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Inside the block MLX's global PRNG is seeded with ``seed``; after it, the key it had before
    is back, so code drawing random numbers here neither depends on nor disturbs the caller's
    random stream (MLX seeds that stream from the clock)."""
    saved = mx.random.state[0]
    mx.random.seed(seed)
    try:
        yield
    finally:
        set_mlx_rng_key(saved)


def rng_state() -> tuple[mx.array, dict]:
    """(MLX key array, JSON document of the Python and NumPy states): all a resume needs."""
    np_state = np.random.get_state()
    doc = {"python": _to_jsonable(random.getstate()),
           "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return mx.random.state[0], doc


def set_rng_state(mlx_key: mx.array, doc: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    set_mlx_rng_key(mlx_key)
    random.setstate(_from_jsonable(doc["python"]))
    n = doc["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def _to_jsonable(x):
    if isinstance(x, tuple):
        return {"__tuple__": [_to_jsonable(v) for v in x]}
    return x


def _from_jsonable(x):
    if isinstance(x, dict) and "__tuple__" in x:
        return tuple(_from_jsonable(v) for v in x["__tuple__"])
    if isinstance(x, list):
        return [_from_jsonable(v) for v in x]
    return x
