"""One edgekd run per run directory: a lock file, with stale locks (dead process) taken over."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekd.errors import InputError

LOCK = ".edgekd.lock"

log = logging.getLogger("edgekd")



def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _acquiring(run_dir: Path) -> Iterator[None]:
    """Serializes lock acquisition between processes with flock on the run directory itself (no extra file;
    the kernel drops it if the process dies). Without it, a second process could read the lock file in the
    instant between its creation and its record being written, or two processes could both take over one
    stale lock, and both would run."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the O_EXCL create below still keeps two runs apart, minus these races
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One edgekd run per run directory; a lock left by a dead process is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with _acquiring(run_dir):
        _acquire(run_dir / LOCK, run_dir)
    try:
        yield
    finally:
        (run_dir / LOCK).unlink(missing_ok=True)


def _holder(lock_path: Path) -> dict[str, Any]:
    """The record in an existing lock file; {} for an empty one (its creator died before writing it).

    Anything else is not an edgekd lock: it is refused, never taken over (taking over deletes it)."""
    holder: Any = None
    try:
        if not lock_path.is_symlink():
            text = lock_path.read_text()
            holder = json.loads(text) if text else {}
    except FileNotFoundError:  # released meanwhile: try again
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    if not isinstance(holder, dict) or (holder and not {"pid", "host"} <= holder.keys()):
        raise InputError(f"{lock_path}: not an edgekd lock file; edgekd will not remove it (move it away "
                         "or choose another output_dir)")
    return holder


def check_not_busy(run_dir: Path) -> None:
    """Refuse at once (InputError) when a live edgekd run holds `run_dir`: a second run learns it before its
    pre-flight, not after. Takes nothing: `run_lock` still decides, race-free, when the run starts."""
    lock_path = run_dir / LOCK
    if lock_path.is_file():
        _refuse_live_holder(_holder(lock_path), run_dir, lock_path)


def _refuse_live_holder(holder: dict, run_dir: Path, lock_path: Path) -> None:
    """InputError when the lock record names a process alive on this host, or any process on another host."""
    if not holder:
        return
    if holder.get("host") != socket.gethostname():
        raise InputError(
            f"{run_dir}: locked by edgekd on host {holder.get('host')} (pid {holder.get('pid')}); "
            f"remove {lock_path} if that run is gone"
        )
    if _process_alive(int(holder.get("pid", -1))):
        raise InputError(
            f"{run_dir}: in use by another edgekd run (pid {holder['pid']}); wait for it to finish "
            f"(if no edgekd run is using it, remove {lock_path})"
        )


def _acquire(lock_path: Path, run_dir: Path) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock_path)
            _refuse_live_holder(holder, run_dir, lock_path)
            log.warning("taking over a stale lock left by pid %s", holder.get("pid", "?"))
            lock_path.unlink(missing_ok=True)
            continue
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
        except BaseException:  # a full disk, say: leave no lock behind
            lock_path.unlink(missing_ok=True)
            raise
        return
    raise InputError(f"{run_dir}: could not take the lock {lock_path}; remove it if no edgekd run is using it")


