"""Atomic file writes: write to a temp file in the same folder, fsync, then rename over the target.

A reader (or a rerun after SIGKILL) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"


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


def write_bytes(target: str | Path, data: bytes) -> Path:
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


# Work folders that stages create inside the run directory (export's staging folder, the ORT-format
# converter's temp folder); a process killed midway leaves them behind.
STALE_FOLDER_PREFIXES = (TEMP_MARK, ".staging-export-", ".ort-convert-")


def remove_stale_temps(folder: Path) -> None:
    """Delete temp files and work folders a killed process left behind (call it holding the run's lock)."""
    import shutil

    if not folder.is_dir():
        return
    for stale in sorted(folder.rglob(f"{TEMP_MARK}*"), reverse=True):
        if stale.is_file() or stale.is_symlink():
            stale.unlink(missing_ok=True)
    for stale in folder.iterdir():
        if stale.is_dir() and not stale.is_symlink() and stale.name.startswith(STALE_FOLDER_PREFIXES):
            shutil.rmtree(stale, ignore_errors=True)
