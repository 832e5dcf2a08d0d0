"""Console output of the `edgekd` command line: the application's logging set-up.

The library (everything else under `edgekd`) only logs through `logging.getLogger("edgekd")`: it attaches no
console handler and never turns propagation off, so a notebook or a host application decides what is shown.
The one handler the library adds is the run directory's `log.txt` (runner/loop.py), for the duration of a run.

The CLI calls `configure_console_logging` once per invocation: one handler on the root logger that writes
the message text to stderr (stdout stays for results: tables, verdicts, paths), at INFO by default, DEBUG
with `-v`, WARNING with `-q` (and on the ranks other than 0 of a torchrun job).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

LOGGER = "edgekd"


class StderrHandler(logging.StreamHandler):
    """A StreamHandler that writes to whatever `sys.stderr` is at emit time (click's test runner swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


def console_level(verbosity: int, main_rank: bool = True) -> int:
    """-q (verbosity < 0) warnings only; default INFO; -v DEBUG. Ranks other than 0 show warnings only."""
    if verbosity < 0 or not main_rank:
        return logging.WARNING
    return logging.DEBUG if verbosity > 0 else logging.INFO


def configure_console_logging(verbosity: int = 0, main_rank: bool = True) -> StderrHandler:
    """Install (or re-level) the CLI's stderr handler on the root logger; idempotent within a process.

    The `edgekd` logger is set to INFO (DEBUG with -v) so the run's log.txt stays complete whatever the
    console shows; the console handler's own level filters what reaches the terminal.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, StderrHandler)), None)
    if handler is None:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    handler.setLevel(console_level(verbosity, main_rank))
    logging.getLogger(LOGGER).setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    return handler
