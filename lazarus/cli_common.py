"""What every ``lazarus`` entry point shares (``lazarus ...`` and ``python -m lazarus.demo``): the
argument parser whose usage errors are one line, one-line warnings and errors, and the exit status
of a command (:func:`run_command`, :data:`EXIT_CODES`, :func:`classify_error`).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

EXIT_CODES = {"finished": 0, "bug": 1, "user error": 2, "nan": 3, "SIGINT": 130, "SIGTERM": 143}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class CommandParser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2), like every other user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=120)


def one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def run_command(func, args) -> int:
    """``func(args)``'s exit status; an error or an interrupt becomes one line on stderr and its
    status (``LAZARUS_DEBUG=1`` lets errors through with their traceback)."""
    # transformers warns about long token sequences that the datasets truncate anyway
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    shown = warnings.showwarning
    warnings.showwarning = show_warning
    try:
        if os.environ.get("LAZARUS_DEBUG"):
            return func(args)
        try:
            return func(args)
        except KeyboardInterrupt as e:  # a second signal during training, or Ctrl-C before it
            sig = "SIGTERM" if str(e) == "SIGTERM" else "SIGINT"
            print(f"lazarus: interrupted by {sig}", file=sys.stderr)
            return EXIT_CODES[sig]
        except Exception as e:  # noqa: BLE001 - the CLI's promise: one line, no traceback
            code, msg = classify_error(e)
            print(f"lazarus: error: {one_line(msg)}", file=sys.stderr)
            return code
    finally:
        warnings.showwarning = shown


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, like errors."""
    print(f"lazarus: warning: {one_line(message)}", file=sys.stderr if file is None else file)


def classify_error(e: BaseException) -> tuple[int, str]:
    """Exit status and message: 2 for user errors (bad input, files, config), 1 otherwise."""
    from pydantic import ValidationError

    from lazarus.checkpointing import CheckpointError, NonFiniteError
    from lazarus.data import DataError
    from lazarus.models import ModelLoadError

    if isinstance(e, NonFiniteError):
        return EXIT_CODES["nan"], f"stopped: {e}"
    if isinstance(e, CLIError):
        return 2, str(e)
    if isinstance(e, DataError):
        return 2, f"bad data: {e}"
    if isinstance(e, ModelLoadError):
        return 2, f"cannot load model: {e}"
    if isinstance(e, CheckpointError):
        return 2, f"checkpoint: {e}"
    if isinstance(e, ValidationError):
        return 2, f"invalid value: {'; '.join(_err_text(x) for x in e.errors())}"
    if isinstance(e, FileNotFoundError):
        return 2, f"file not found: {e.filename or e}"
    if isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return 2, f"{type(e).__name__}: {e.filename or e}"
    if isinstance(e, ValueError):  # the library raises these for invalid input (e.g. RewardError)
        return 2, f"{e}"
    if isinstance(e, OSError):
        return 2, f"{type(e).__name__}: {e}"
    return 1, f"internal error {type(e).__name__}: {e} (rerun with LAZARUS_DEBUG=1 for the traceback)"


def _err_text(err: dict) -> str:
    loc = ".".join(str(x) for x in err.get("loc", ()))
    return f"{loc}: {err.get('msg')}" if loc else str(err.get("msg"))
