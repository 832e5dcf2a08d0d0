"""What edgekd owns in a run directory, and the one way it picks a path to write, append to or delete there.

A run directory may hold the user's own files (`output_dir: .`). edgekd touches only what it provably
created: every top-level name it creates in the run directory (a file, or a folder it owns whole: plots/,
deploy/, devices/, its work folders) is recorded in the manifest's `files` BEFORE it is created, so a run
killed at any moment leaves nothing behind that a rerun would have to guess about. A name that is already
there and not recorded is refused (exit 2), and so is a symbolic link anywhere on the way to a path edgekd
writes: links are never followed. Leftovers of a killed run are found from that record alone (temp files
with atomic_path's exact name pattern beside a recorded file or inside a recorded folder, recorded work
folders), never by searching the directory for names that look like edgekd's.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import shutil
import time
from pathlib import Path
from typing import TextIO

from edgekd import atomic
from edgekd.errors import InputError
from edgekd.runner.contract import Manifest
from edgekd.version import __version__

MANIFEST = "manifest.json"
LOG = "log.txt"
RESOLVED_CONFIG = "resolved-config.yaml"
"""The resolved config a run used (never the name of the user's config: the input is never written)."""
WORK_PREFIX = ".edgekd-work-"
"""Work folders (export's staging, the ORT converter's output) live under this prefix, recorded like any file."""


def read_manifest(run_dir: Path) -> Manifest:
    path = run_dir / MANIFEST
    if path.is_symlink():
        raise _link_refused(path)
    if not path.is_file():
        return Manifest()
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); delete it to start the run afresh") from None
    return Manifest.from_json(data, str(path))


def write_manifest(run_dir: Path, manifest: Manifest) -> None:
    manifest.edgekd_version = __version__
    manifest.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic.write_json(run_dir / MANIFEST, manifest.to_json())


def _link_refused(path: Path) -> InputError:
    return InputError(f"{path}: is a symbolic link; edgekd never writes through links in its run directory "
                      "(remove it or choose another output_dir)")


def _plain(name: str) -> bool:
    """A relative name that stays inside the run directory (what edgekd itself ever records)."""
    clean = posixpath.normpath(name)
    return not (posixpath.isabs(clean) or clean in (".", "..") or clean.startswith("../"))


def _top_key(name: str) -> str:
    """The manifest `files` entry that owns `name`: itself for a top-level file, 'folder/' for anything in one."""
    first, _, rest = name.partition("/")
    return f"{first}/" if rest or name.endswith("/") else first


class RunFiles:
    """The paths edgekd may write in one run directory (see the module docstring).

    `checked=False` (a stage run on its own in tests, outside the runner) keeps only the checks that need no
    record: names stay inside the run directory and no symbolic link is followed.
    """

    def __init__(self, run_dir: Path, manifest: Manifest, *, checked: bool = True) -> None:
        self.run_dir = run_dir
        self.manifest = manifest
        self.checked = checked
        if checked and manifest.files is None:  # written by an edgekd that did not record its files yet
            manifest.files = sorted({MANIFEST, LOG, *(_top_key(n) for n in manifest.all_artifacts() if _plain(n))})

    # ----------------------------------------------------------------------------------------------
    # Ownership

    def _recorded(self) -> set[str]:
        return {*(self.manifest.files or ()), *(_top_key(n) for n in self.manifest.all_artifacts() if _plain(n))}

    def owns(self, name: str) -> bool:
        return _top_key(self._normalize(name)) in self._recorded()

    def _normalize(self, name: str) -> str:
        """`name` as a clean relative path inside the run directory (a trailing '/' marks a folder)."""
        raw = str(name).replace(os.sep, "/")
        if not raw or not _plain(raw):
            raise InputError(f"refusing to write outside the run directory: {name}")
        return posixpath.normpath(raw) + ("/" if raw.endswith("/") else "")

    def _refuse_links(self, clean: str) -> None:
        """A symbolic link on the way to a path edgekd writes would send the write elsewhere: refuse it."""
        current = self.run_dir
        for part in clean.rstrip("/").split("/"):
            current = current / part
            if current.is_symlink():
                raise _link_refused(current)

    def claim(self, *names: str) -> None:
        """Make `names` edgekd's, recording any new one in the manifest before it is created (one write).

        Refuses (exit 2) a name that already exists there without being recorded: the user's file."""
        new: list[str] = []
        recorded = self._recorded()
        for name in names:
            clean = self._normalize(name)
            self._refuse_links(clean)
            if not self.checked:
                continue
            key = _top_key(clean)
            if key in recorded or key in new:
                continue
            existing = self.run_dir / key.rstrip("/")
            if os.path.lexists(existing):
                raise InputError(f"{existing}: already in the run directory and not written by edgekd, which "
                                 "never writes over a file it did not create (move it away or choose another "
                                 "output_dir)")
            new.append(key)
        if new:
            self.manifest.files = sorted({*(self.manifest.files or ()), *new})
            write_manifest(self.run_dir, self.manifest)

    def path(self, name: str) -> Path:
        """Where to write `name` (relative to the run directory), once it is edgekd's to write."""
        self.claim(name)
        return self.run_dir / self._normalize(name).rstrip("/")

    def remove(self, name: str) -> None:
        """Delete `name` if edgekd wrote it; a top-level file stops being recorded (persisted with the next
        manifest write). Refuses a name that exists without being edgekd's."""
        clean = self._normalize(name)
        target = self.run_dir / clean
        if self.checked and not self.owns(clean):
            if os.path.lexists(target):
                self.claim(clean)  # raises: the user's file
            return
        self._refuse_links(clean)
        target.unlink(missing_ok=True)
        if self.checked and "/" not in clean and clean in (self.manifest.files or ()):
            self.manifest.files = [f for f in self.manifest.files or () if f != clean]

    def work_folder(self, purpose: str) -> Path:
        """An empty work folder inside the run directory (same file system: its files are renamed into place)."""
        folder = self.path(f"{WORK_PREFIX}{purpose}/")
        shutil.rmtree(folder, ignore_errors=True)  # a killed run's; recorded, so edgekd's
        folder.mkdir(parents=True)
        return folder

    def open_log(self) -> TextIO:
        """log.txt for appending; never through a symbolic link (O_NOFOLLOW, checked again at open)."""
        path = self.path(LOG)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # made a link since it was claimed
                raise _link_refused(path) from None
            raise
        return os.fdopen(fd, "a", encoding="utf-8")

    # ----------------------------------------------------------------------------------------------
    # Leftovers of a killed run

    def remove_stale_temps(self) -> list[str]:
        """Delete what a killed run left half-done: temp files of atomic writes to recorded files, temp files
        inside recorded folders, recorded work folders. Returns what was removed (relative names).

        Call it holding the run's lock. Nothing unrecorded is looked at, links are never followed."""
        if not self.checked or not self.run_dir.is_dir():
            return []
        recorded = self._recorded()
        removed: list[str] = []
        with os.scandir(self.run_dir) as scan:
            entries = list(scan)
        for entry in entries:
            if entry.is_symlink():
                continue
            if entry.is_dir():
                key = f"{entry.name}/"
                if key not in recorded:
                    continue
                if entry.name.startswith(WORK_PREFIX):
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(key)
                else:
                    removed += self._temps_inside(Path(entry.path))
            elif entry.is_file() and atomic.temp_target(entry.name) in recorded:
                os.unlink(entry.path)
                removed.append(entry.name)
        return sorted(removed)

    def _temps_inside(self, folder: Path) -> list[str]:
        removed = []
        for root, dirs, names in os.walk(folder):  # os.walk does not descend into links to folders
            for name in names:
                path = Path(root) / name
                if atomic.temp_target(name) is not None and not path.is_symlink():
                    path.unlink()
                    removed.append(path.relative_to(self.run_dir).as_posix())
        return removed
