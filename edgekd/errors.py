"""Exceptions that carry the CLI exit code (see the README's exit-code table)."""

from __future__ import annotations


class EdgekdError(Exception):
    """Base class: a problem reported to the user as one line, never a traceback."""

    exit_code = 1


class InputError(EdgekdError):
    """Bad input: config, files, arguments, data. Exit code 2."""

    exit_code = 2


class ConfigError(InputError):
    """An invalid pipeline.yaml; the message already names the file and the key."""


class StageFailed(EdgekdError):
    """A stage failed at run time (NaN loss, parity check failed, ...). Exit code 3."""

    exit_code = 3


class BudgetsBreached(EdgekdError):
    """The pipeline ran but at least one budget failed. Exit code 1."""

    exit_code = 1
