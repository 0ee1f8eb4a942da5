"""The suite's shared CLI error convention.

A ``UserError`` is bad input the user can fix: the CLI prints ``error: <message>`` as one line on
stderr and exits 2, with no traceback. Anything else is a bug and keeps its traceback. This module
imports nothing heavy: the experiments, the SLURM launcher and the analysis all raise it.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn


class UserError(Exception):
    """Bad input a user can fix; the message is one sentence naming the problem."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ``UserError``, so flag errors are one line too (argparse adds usage)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system error, with the path it hit (a full disk names the file)."""
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # not Python's two lines with the source line


def one_line_warnings() -> None:
    """Print warnings as ``warning: <message>``, one line each."""
    warnings.formatwarning = _one_line_warning


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> NoReturn:
    """Run ``main(argv)`` and exit: 2 on ``UserError``, 1 on a file-system error (a folder that
    cannot be made or read), 130 on Ctrl-C, else main's return code."""
    one_line_warnings()
    try:
        code = main(argv)
    except UserError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
