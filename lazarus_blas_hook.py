"""Interpreter start-up hook: the Linux CPU BLAS fast path for every program in this environment.

Why: MLX binds its matmul to a BLAS once, when ``mlx.core`` is first imported. ``import lazarus``
loads an optimised OpenBLAS/MKL just before that, but a script that imports ``mlx.core`` first
(or ``mlx_lm.lora`` itself) kept MLX's reference BLAS and trained ~10x slower. Python runs the
``import`` lines of ``*.pth`` files in site-packages at start-up, so ``lazarus-blas.pth``
(one line: ``import lazarus_blas_hook``) loads the library before any user code runs.

The hook loads ``lazarus/_blas.py`` by its file path, as ``lazarus._blas``, without importing the
``lazarus`` package (so start-up does not import MLX), and never raises or warns: ``import
lazarus`` reports problems later as before. ``LAZARUS_BLAS=none`` turns it off.

``make`` installs the ``.pth`` file; after a plain ``pip install`` run
``python -m lazarus_blas_hook install`` (``uninstall`` removes it).
"""

from __future__ import annotations

import os
import sys

PTH_NAME = "lazarus-blas.pth"


def _load_fast_blas() -> None:
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return
    if os.environ.get("LAZARUS_BLAS", "").strip().lower() in ("none", "off", "0"):
        return
    import importlib.util
    import warnings

    package = importlib.util.find_spec("lazarus")  # finds, does not import, the package
    if package is None or not package.submodule_search_locations:
        return
    path = os.path.join(list(package.submodule_search_locations)[0], "_blas.py")
    spec = importlib.util.spec_from_file_location("lazarus._blas", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lazarus._blas"] = module  # `import lazarus` later finds this one, already enabled
    spec.loader.exec_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.enable()


def pth_path() -> str:
    import sysconfig

    return os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)


def main(argv: list[str]) -> int:
    if argv[:1] == ["install"]:
        with open(pth_path(), "w") as f:
            f.write("import lazarus_blas_hook\n")
        print(f"installed {pth_path()}")
        return 0
    if argv[:1] == ["uninstall"]:
        if os.path.exists(pth_path()):
            os.remove(pth_path())
        print(f"removed {pth_path()}")
        return 0
    print("usage: python -m lazarus_blas_hook {install,uninstall}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
else:
    try:
        _load_fast_blas()
    except Exception:  # noqa: BLE001 - a start-up hook must never stop Python from starting
        pass
