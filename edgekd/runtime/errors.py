"""Errors raised by the torch-free runtime."""

from __future__ import annotations


class RuntimeInputError(ValueError):
    """Bad input to the runtime: a file that is not a model, a wrong shape, an unknown provider.

    The CLI maps it to exit code 2 ("bad input"), so its message must name the file or value at fault
    in one line.
    """

    exit_code = 2  # same attribute as edgekd.errors.InputError, without importing the pipeline package
