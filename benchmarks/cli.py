"""What every command line of the benchmarks shares: one-line errors, and tracebacks only behind ``--debug``.

A bad setting or an unusable input file ends the command with ONE line on stderr,
``<prog>: error: <what was wrong and what is allowed>``, and exit status 2, before any data is read
or any file written; an error during the run is one line and exit status 1. ``--debug`` shows the
traceback instead. Warnings show, except Avalanche's own deprecation notices.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable

USAGE_ERROR = 2
RUN_ERROR = 1
AVALANCHE_MODULES = r"avalanche(\.|$)"  # a warning's module name, matched from its start


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (no usage block), with ``--debug``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")

    def check(self, *checks: Callable[[], object]) -> None:
        """Run each check (e.g. ``lambda: check_positive_int("--epochs", args.epochs)``); the first
        ValueError or TypeError becomes a one-line usage error."""
        for check in checks:
            try:
                check()
            except (ValueError, TypeError) as error:
                self.error(str(error))


def report(prog: str, error: BaseException, debug: bool, status: int) -> int:
    """Print ``error`` as ``<prog>: error: <message>`` (one line) and return ``status``; with ``debug``,
    re-raise it instead (call from the ``except`` block)."""
    if debug:
        raise error
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


def hide_avalanche_deprecations() -> None:
    """Ignore the deprecation warnings raised from Avalanche's own modules (``avalanche`` and its
    submodules, not ``avalanche_dkvb``), and only those."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=AVALANCHE_MODULES)
