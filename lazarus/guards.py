"""What keeps a run stoppable: signal handling and, with several ranks, a watchdog.

``run_guards`` is entered around ``Loop.fit``. A first SIGINT/SIGTERM only records its name
(the Loop then checkpoints and stops at the next safe point); a second one interrupts at once.
With several ranks, a peer that dies leaves the others blocked in a collective forever: the
watchdog turns that into a clean non-zero exit after ``timeout`` seconds without a heartbeat,
and ends a rank whose launcher is gone (it must not outlive it as an orphan)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time


class Guards:
    """What the Loop reads (``signal``) and calls (``beat``) while guarded."""

    def __init__(self) -> None:
        self.signal: str | None = None  # name of the first signal received
        self.last_beat = time.monotonic()

    def beat(self) -> None:
        """Progress was made (a step or an eval batch finished)."""
        self.last_beat = time.monotonic()


@contextlib.contextmanager
def run_guards(*, handle_signals: bool, rank: int = 0, distributed: bool = False, timeout: float | None = None):
    guards = Guards()
    old = _install_signal_handlers(guards) if handle_signals else None
    done = _start_watchdog(guards, rank, timeout) if distributed and timeout else None
    try:
        yield guards
    finally:
        if done is not None:
            done.set()
        if old:
            for sig, handler in old.items():
                signal.signal(sig, handler)


def _install_signal_handlers(guards: Guards):
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if guards.signal is not None:  # second signal: give up immediately
            raise KeyboardInterrupt(name)
        guards.signal = name

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _start_watchdog(guards: Guards, rank: int, timeout: float) -> threading.Event:
    done = threading.Event()
    launcher = int(os.environ.get("LAZARUS_LAUNCHER_PID", "0") or 0)
    parent = os.getppid()

    def watch():
        while not done.wait(1.0):
            if (launcher and not process_alive(launcher)) or os.getppid() != parent:
                print(f"[lazarus] rank {rank}: the launcher exited; aborting.", file=sys.stderr, flush=True)
                os._exit(1)
            idle = time.monotonic() - guards.last_beat
            if idle > timeout:
                print(f"[lazarus] rank {rank}: no progress for {idle:.0f}s (limit {timeout:.0f}s, "
                      "LAZARUS_DIST_TIMEOUT); a peer rank probably failed. Aborting.", file=sys.stderr, flush=True)
                os._exit(3)

    threading.Thread(target=watch, name="lazarus-watchdog", daemon=True).start()
    return done


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, counts as gone on Linux)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
