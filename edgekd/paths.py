"""Output paths checked before any work starts: a run directory, a --json / --junit file.

A path that cannot be written (a file where a folder should be, a folder under a file, no permission, a name
too long, a full disk) is reported as one line naming the option and the path, instead of a traceback after
minutes of work. The probe creates what is missing, writes a few kilobytes and removes all of it again, so a
failed check leaves nothing behind (and a passed one neither: the command creates its outputs itself).
Torch-free: `edgekd bench`, `check` and `compare` use it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edgekd.errors import InputError

PROBE_BYTES = 4 * 1024  # a full disk (or a file-size limit) fails here, not on the first artifact


def check_writable_folder(folder: Path, what: str, shown: Path | None = None) -> None:
    """InputError `what: folder: problem` unless `folder` exists as (or can be created as) a writable folder.

    `shown`: the path the user gave, named in the message (a file inside `folder`).
    """
    folder = Path(folder)
    shown = shown or folder
    created: list[Path] = []
    try:
        missing: list[Path] = []
        for candidate in (folder, *folder.parents):
            if candidate.exists() or candidate.is_symlink():
                if not candidate.is_dir():
                    where = "is" if candidate == shown else f"is under {candidate}, which is"
                    raise InputError(f"{what}: {shown}: {where} a file, not a folder")
                break
            missing.append(candidate)
        for candidate in reversed(missing):
            candidate.mkdir()
            created.append(candidate)
        handle, name = tempfile.mkstemp(prefix=".edgekd-probe-", dir=folder)
        try:
            with os.fdopen(handle, "wb") as probe:
                probe.write(b"\0" * PROBE_BYTES)
                probe.flush()
                os.fsync(probe.fileno())
        finally:
            os.unlink(name)
    except OSError as exc:
        raise InputError(f"{what}: {shown}: cannot write there ({exc.strerror or exc})") from None
    finally:
        for candidate in reversed(created):
            try:
                candidate.rmdir()
            except OSError:
                pass


def check_output_file(path: Path, option: str) -> None:
    """InputError unless `path` can be written as a file (for --json, --junit)."""
    path = Path(path)
    try:
        is_dir = path.is_dir()
    except OSError as exc:  # e.g. a name too long for the file system
        raise InputError(f"{option}: {path}: cannot write there ({exc.strerror or exc})") from None
    if is_dir:
        raise InputError(f"{option}: {path}: is a folder, not a file")
    check_writable_folder(path.parent, option, shown=path)
