"""Linux CPU fast path: load an optimised CBLAS before ``mlx.core``.

MLX's Linux CPU wheel resolves ``cblas_sgemm`` against a reference (netlib)
BLAS, which runs float32 matmul ~30-50x slower than OpenBLAS or MKL. When a
library exporting the CBLAS symbols is loaded with ``RTLD_GLOBAL`` *before*
``mlx.core`` is imported, the dynamic linker binds MLX's calls to it instead.

Order of preference:
1. ``LAZARUS_BLAS`` naming a library path or soname (``LAZARUS_BLAS=none`` disables),
2. a system OpenBLAS (``libopenblas.so.0``, e.g. Debian's ``libopenblas0-pthread``),
3. an installed MKL (``libmkl_rt.so``).
If none is found we warn once with the command that fixes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import platform
import sys
import warnings

INSTALL_HINT = "apt-get install -y libopenblas0-pthread  (Debian/Ubuntu; or set LAZARUS_BLAS=/path/to/libopenblas.so)"

#: The library that was loaded, or None. Set by :func:`enable`.
loaded: str | None = None


def _candidates() -> list[str]:
    names = ["libopenblas.so.0", "libopenblas.so", "libopenblasp-r0.so"]
    found = ctypes.util.find_library("openblas")
    if found:
        names.append(found)
    for pattern in ("/usr/lib/*/openblas*/libopenblas.so.0", "/usr/lib64/libopenblas*.so*"):
        names.extend(sorted(glob.glob(pattern)))
    # MKL installed from PyPI lives in <prefix>/lib
    names.extend(sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*"))))
    names.append("libmkl_rt.so")
    return names


_lib = None  # the loaded library's handle


def _try_load(name: str) -> bool:
    global loaded, _lib
    try:
        lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    if not hasattr(lib, "cblas_sgemm"):
        return False
    loaded, _lib = name, lib
    return True


def get_threads() -> int | None:
    """Threads the loaded BLAS uses per matmul (None when no library of ours is loaded)."""
    if _lib is not None and hasattr(_lib, "openblas_get_num_threads"):
        return int(_lib.openblas_get_num_threads())
    if _lib is not None and hasattr(_lib, "MKL_Get_Max_Threads"):
        return int(_lib.MKL_Get_Max_Threads())
    return None


def set_threads(n: int) -> int | None:
    """Set the loaded BLAS's threads per matmul; returns the previous count (None: not possible).

    The Loop uses this when it runs several CPU streams at once: one BLAS thread per stream
    keeps the cores busy without oversubscribing them."""
    previous = get_threads()
    if previous is None:
        return None
    if hasattr(_lib, "openblas_set_num_threads"):
        _lib.openblas_set_num_threads(ctypes.c_int(int(n)))
    elif hasattr(_lib, "MKL_Set_Num_Threads"):
        _lib.MKL_Set_Num_Threads(ctypes.c_int(int(n)))
    return previous


@contextlib.contextmanager
def threads_for_streams(streams: int, world_size: int = 1):
    """While ``streams`` CPU streams run matmuls side by side, give each an equal share of the
    cores (one BLAS thread each on 2 cores) instead of letting every stream spawn a full set."""
    previous = set_threads(max(1, (os.cpu_count() or 1) // (world_size * streams))) if streams > 1 else None
    try:
        yield
    finally:
        if previous is not None:
            set_threads(previous)


def enable() -> str | None:
    """Load a fast CBLAS globally if we are on Linux and mlx.core is not imported yet."""
    if platform.system() != "Linux" or loaded is not None:
        return loaded
    choice = os.environ.get("LAZARUS_BLAS", "").strip()
    if choice.lower() in ("none", "off", "0"):
        return None
    if "mlx.core" in sys.modules:
        # Too late to change symbol resolution. Say so when it matters (CPU backend).
        mx = sys.modules["mlx.core"]
        cuda = getattr(getattr(mx, "cuda", None), "is_available", lambda: False)()
        if choice or not (cuda or os.environ.get("LAZARUS_QUIET_BLAS")):
            warnings.warn("mlx.core was imported before lazarus, so MLX's CPU matmul keeps its slow reference "
                          "BLAS (~30x slower). Fix for every script: `python -m lazarus_blas_hook install` (a "
                          "start-up hook; `make` installs it), or `import lazarus` before `import mlx.core`",
                          stacklevel=3)
        return None
    if choice:
        if not _try_load(choice):
            warnings.warn(f"LAZARUS_BLAS={choice!r} could not be loaded or has no cblas_sgemm; "
                          "falling back to MLX's built-in BLAS", stacklevel=3)
        return loaded
    for name in _candidates():
        if _try_load(name):
            return loaded
    if not os.environ.get("LAZARUS_QUIET_BLAS"):
        warnings.warn("No optimised BLAS found: MLX's CPU matmul will be ~30x slower. "
                      f"Fix: {INSTALL_HINT}", stacklevel=3)
    return None
