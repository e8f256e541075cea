"""``python -m lazarus.launch -n 2 [--backend ring] script.py ...``: mlx.launch that ends the whole job.

``mlx.launch`` exits 0 when a rank fails, and when one rank dies (even by kill -9) the others stay
blocked in a collective, so it waits on them forever. This wrapper runs it in a process group of
its own and guarantees that the job ends and says so:

* it passes the output through and, as soon as mlx.launch reports a failed rank, gives the other
  ranks ``RANK_FAILURE_GRACE`` seconds and then kills the whole group; it exits 1 with a one-line
  summary whenever a rank exited non-zero or was killed;
* SIGINT/SIGTERM/SIGHUP sent to the launcher go to every rank (each checkpoints and stops, as in
  a single process); mlx.launch itself ignores them, so it keeps relaying the ranks' output and
  does not cut a checkpoint short; after ``SIGNAL_GRACE`` seconds whatever is left is killed, and
  the launcher exits 130/143/129;
* nothing of the group outlives the launcher, and each rank's watchdog (see ``Loop``) ends the
  rank when ``LAZARUS_LAUNCHER_PID`` is gone, which covers a kill -9 of the launcher itself.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_FAILED = re.compile(r"Node with rank (\d+) (exited with code (-?\d+)|was killed)")
RANK_FAILURE_GRACE = 5.0  # the other ranks cannot progress without the failed one: nothing to wait for
SIGNAL_GRACE = 60.0  # time for every rank to write its checkpoint after a signal
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Runs mlx.launch with the stop signals ignored. The ranks inherit that until the Loop installs its
# own handlers (during fit); a signal before that is covered by the SIGNAL_GRACE kill.
_RUN_IGNORING_SIGNALS = ("import runpy, signal, sys\n"
                         "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP): signal.signal(s, signal.SIG_IGN)\n"
                         "sys.argv = sys.argv[1:]\n"
                         "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _kill_later(pgid: int, seconds: float, done: threading.Event) -> None:
    """SIGKILL the group after ``seconds`` unless the launcher finished first."""
    def run():
        if not done.wait(seconds):
            _kill_group(pgid, signal.SIGKILL)

    threading.Thread(target=run, name="lazarus-launch-kill", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher = shutil.which("mlx.launch") or shutil.which("mlx.launch", path=str(Path(sys.executable).parent))
    if launcher is None:
        print("lazarus.launch: mlx.launch not found (install mlx)", file=sys.stderr)
        return 2
    if "--backend" not in argv:
        argv = ["--backend", "ring", *argv]
    if "--python" not in argv:
        argv = ["--python", sys.executable, *argv]
    env = dict(os.environ, LAZARUS_LAUNCHER_PID=str(os.getpid()))
    # Own session = own process group: the whole job (mlx.launch and every rank) can be killed at once.
    proc = subprocess.Popen([sys.executable, "-c", _RUN_IGNORING_SIGNALS, launcher, *argv], stdin=subprocess.DEVNULL,
                            stdout=sys.stdout, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    pgid = proc.pid
    done = threading.Event()
    received: list[int] = []

    def forward(signum, frame):
        if not received:
            _kill_later(pgid, SIGNAL_GRACE, done)
        received.append(signum)
        # the ranks handle SIGINT/SIGTERM (checkpoint, then exit); SIGHUP becomes SIGTERM for them
        forward = signal.SIGTERM if signum == signal.SIGHUP else signum
        _kill_group(pgid, forward if len(received) == 1 else signal.SIGKILL)

    old = {s: signal.signal(s, forward) for s in _STOP_SIGNALS}
    failed = []
    try:
        for line in proc.stderr:
            sys.stderr.write(line)
            m = _FAILED.search(line)
            if m:
                if not failed:
                    _kill_later(pgid, RANK_FAILURE_GRACE, done)
                failed.append(f"rank {m.group(1)} {m.group(2)}")
        rc = proc.wait()
        deadline = time.monotonic() + 5.0
        while _group_alive(pgid) and time.monotonic() < deadline:  # ranks mlx.launch left behind
            time.sleep(0.1)
    finally:
        done.set()
        _kill_group(pgid, signal.SIGKILL)  # no rank may outlive the launcher
        for s, h in old.items():
            signal.signal(s, h)
    if received:
        name = signal.Signals(received[0]).name
        print(f"lazarus.launch: stopped by {name}; every rank was told to checkpoint and stop", file=sys.stderr)
        return 128 + received[0]
    if failed or rc:
        print(f"lazarus.launch: distributed run failed ({'; '.join(failed) or f'launcher exit {rc}'}); "
              "all ranks stopped", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
