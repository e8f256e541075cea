"""Per-machine decisions for CPU optimisations whose payoff depends on the CPU and the MLX build.

Why: a CPU-side optimisation that wins on one machine can lose on another. The vectorised-exp
kernels of :mod:`lazarus.models.fast_cpu` won 1.4x on one CPU with mlx 0.32.0 and lost 4.6x on
another with mlx 0.32.4 (that loss was subnormal floats, now fixed, but the lesson stands: MLX
changes under us and CPUs differ). So a default of ``"auto"`` means *measured here*: the first
time a feature is needed on a machine, a short micro-benchmark times it on and off (alternating,
best of several), and the feature is used only when it wins by a clear margin. The verdict is
cached in ``~/.cache/lazarus/autotune.json`` (``LAZARUS_CACHE_DIR`` moves it), keyed by CPU model,
core count, MLX version and the BLAS library in use, so each combination is measured once.
``LAZARUS_AUTOTUNE=off`` skips measuring and takes the safe choice (feature off).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

from lazarus import _blas

#: "on" must beat "off" by this factor to be chosen: a tie keeps the plain path.
MIN_GAIN = 1.03


def cache_file() -> Path:
    base = os.environ.get("LAZARUS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lazarus")
    return Path(base) / "autotune.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    import mlx.core as mx

    return f"{cpu_model()} | {os.cpu_count()} cores | mlx {mx.__version__} | blas {_blas.loaded or 'built-in'}"


def _read() -> dict:
    """The cached verdicts; a missing, unreadable or malformed file (or entry) counts as unmeasured."""
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: {f: v for f, v in features.items() if isinstance(v, dict) and "enabled" in v}
            for key, features in data.items() if isinstance(features, dict)}


def _write(data: dict) -> None:
    from lazarus.checkpointing import atomic_write_text

    try:
        atomic_write_text(cache_file(), json.dumps(data, indent=1, sort_keys=True))
    except (OSError, ValueError):  # ValueError: checkpointing's CheckpointError wraps OSError
        pass  # a read-only home still gets the right answer, just measured again next time


def best_of_alternating(on: Callable[[], None], off: Callable[[], None], rounds: int = 5) -> tuple[float, float]:
    """Best wall time of ``on`` and of ``off``, run alternately (after one warm-up call each)."""
    on(), off()
    t_on = t_off = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        on()
        t_on = min(t_on, time.perf_counter() - t)
        t = time.perf_counter()
        off()
        t_off = min(t_off, time.perf_counter() - t)
    return t_on, t_off


def decide(feature: str, measure: Callable[[], tuple[float, float]]) -> bool:
    """Whether ``feature`` pays off on this machine. ``measure()`` returns (seconds on, seconds
    off); it runs only when this machine/MLX/BLAS combination has no cached verdict."""
    if os.environ.get("LAZARUS_AUTOTUNE", "").lower() in ("off", "0", "false", "no"):
        return False
    key = machine_key()
    verdict = _read().get(key, {}).get(feature)
    if verdict is not None:
        return bool(verdict["enabled"])
    with _exclusive():  # processes starting together measure one at a time, not against each other
        verdict = _read().get(key, {}).get(feature)  # measured by whoever held the lock before us
        if verdict is not None:
            return bool(verdict["enabled"])
        return _measure_and_store(key, feature, measure)


@contextlib.contextmanager
def _exclusive():
    try:
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        handle = open(cache_file().with_suffix(".lock"), "w")
    except OSError:
        yield  # no writable cache folder: measure without the lock
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _measure_and_store(key: str, feature: str, measure: Callable[[], tuple[float, float]]) -> bool:
    print(f"[lazarus] measuring '{feature}' on this machine (once; cached in {cache_file()}) ...",
          file=sys.stderr, flush=True)
    t_on, t_off = measure()
    enabled = t_off / t_on >= MIN_GAIN
    print(f"[lazarus] '{feature}': {t_off / t_on:.2f}x vs off -> {'on' if enabled else 'off'}", file=sys.stderr,
          flush=True)
    data = _read()  # keep the verdicts other features and machines have
    data.setdefault(key, {})[feature] = {"enabled": enabled, "speedup": round(t_off / t_on, 3),
                                         "measured": time.strftime("%Y-%m-%d")}
    _write(data)
    return enabled
