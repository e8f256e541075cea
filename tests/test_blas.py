"""The Linux CPU BLAS fast path is active and falls back loudly."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="Linux CPU fast path only")

PROBE = "import lazarus, mlx.core as mx; from lazarus import _blas; print('LOADED', _blas.loaded)"


def probe(env_extra):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("LAZARUS_BLAS", "LAZARUS_QUIET_BLAS")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-W", "always", "-c", PROBE], capture_output=True, text=True, env=env,
                          timeout=60)


def test_fast_blas_is_loaded_by_default():
    out = probe({})
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.split("LOADED", 1)[1].strip()
    assert loaded != "None", "no optimised BLAS found; `make test` installs libopenblas0-pthread"


def test_fast_path_holds_when_mlx_core_is_imported_first():
    code = "import mlx.core as mx; import lazarus; from lazarus import _blas; print('LOADED', _blas.loaded)"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "LOADED None" not in out.stdout, "start-up hook missing: run `make` or `python -m lazarus_blas_hook install`"
    assert "imported before lazarus" not in out.stderr


def test_start_up_hook_imports_neither_mlx_nor_lazarus():
    code = "import sys; print(sorted(m for m in ('mlx.core', 'lazarus', 'lazarus._blas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "['lazarus._blas']", out.stdout + out.stderr


def test_explicit_library_and_opt_out():
    bad = probe({"LAZARUS_BLAS": "/nonexistent/libnothing.so"})
    assert "could not be loaded" in bad.stderr and "LOADED None" in bad.stdout
    off = probe({"LAZARUS_BLAS": "none"})
    assert "LOADED None" in off.stdout and "Warning" not in off.stderr
