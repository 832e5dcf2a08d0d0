"""Atomic file writes: write to a temp file in the same folder, fsync, then rename over the target.

A reader (or a rerun after SIGKILL) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"
_TEMP_SUFFIX = re.compile(r"\.[a-z0-9_]{8}\Z")  # mkstemp's random part


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `target`; on success it is renamed onto `target`, on error removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f"{TEMP_MARK}{target.name}.", dir=target.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; the target gets what open() would give it
    os.close(fd)
    temp = Path(temp_name)
    try:
        yield temp
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(target: str | Path, data: bytes | memoryview) -> Path:
    with atomic_path(target) as temp:
        temp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, data: Any) -> Path:
    return write_text(target, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_target(name: str) -> str | None:
    """The file name whose atomic_path temp file `name` is, or None: only mkstemp's exact pattern
    (TEMP_MARK + target + '.' + 8 of [a-z0-9_]) counts, so a user's '.tmp-notes.md' is never taken for one."""
    if not name.startswith(TEMP_MARK) or not _TEMP_SUFFIX.search(name):
        return None
    target = name[len(TEMP_MARK):-9]
    return target or None
