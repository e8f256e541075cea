"""``python -m lazarus.launch -n 2 [--backend ring] script.py ...``: mlx.launch with a real exit code.

``mlx.launch`` stops the other ranks when one fails but itself exits 0. This wrapper runs it,
passes its output through, and exits 1 (with a one-line summary) when any rank exited non-zero
or was killed, so schedulers and CI see the failure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

_FAILED = re.compile(r"Node with rank (\d+) (exited with code (-?\d+)|was killed)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher = shutil.which("mlx.launch") or shutil.which("mlx.launch", path=str(__import__("pathlib").Path(sys.executable).parent))
    if launcher is None:
        print("lazarus.launch: mlx.launch not found (install mlx)", file=sys.stderr)
        return 2
    if "--backend" not in argv:
        argv = ["--backend", "ring", *argv]
    if "--python" not in argv:
        argv = ["--python", sys.executable, *argv]
    proc = subprocess.Popen([launcher, *argv], stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
    failed = []
    for line in proc.stderr:
        sys.stderr.write(line)
        m = _FAILED.search(line)
        if m:
            failed.append(f"rank {m.group(1)} {m.group(2)}")
    rc = proc.wait()
    if failed or rc:
        print(f"lazarus.launch: distributed run failed ({'; '.join(failed) or f'launcher exit {rc}'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
