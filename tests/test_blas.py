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


def test_explicit_library_and_opt_out():
    bad = probe({"LAZARUS_BLAS": "/nonexistent/libnothing.so"})
    assert "could not be loaded" in bad.stderr and "LOADED None" in bad.stdout
    off = probe({"LAZARUS_BLAS": "none"})
    assert "LOADED None" in off.stdout and "Warning" not in off.stderr
