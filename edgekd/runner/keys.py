"""Inputs of a stage's fingerprint beyond its config section and input artifacts: the versions of the
libraries that compute its outputs, and the source of a user's `pkg.module:factory`. Both are read without
importing anything heavy (package metadata; the module's file located, not imported), so a cached rerun
stays cheap and torch-free. Also: the one-line reason a stage reruns, for the log."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

# What the training stages (teacher, distill, prune recovery) compute with.
TRAINING_LIBRARIES = ("torch", "torchvision")


@functools.lru_cache(maxsize=None)
def library_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions(distributions: tuple[str, ...]) -> dict[str, str | None]:
    return {name: library_version(name) for name in distributions}


def factory_source(spec: str) -> dict[str, str] | None:
    """sha256 of the file that defines a `pkg.module:factory` model spec (None for built-in names): editing the
    user's model code must retrain what depends on it."""
    if ":" not in spec or spec.startswith(("torchvision:", "timm:")):
        return None
    module = spec.split(":", 1)[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin or not Path(found.origin).is_file():
        return {"module": module, "sha256": "not found"}  # the config check reports it; the key stays honest
    return {"module": module, "sha256": hashlib.sha256(Path(found.origin).read_bytes()).hexdigest()[:16]}


def _changes(old: Any, new: Any, path: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            _changes(old.get(key), new.get(key), f"{path}.{key}" if path else str(key), out)
    elif old != new:
        out.append(f"{path} {old!r} -> {new!r}")


def rerun_reason(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Why a stage whose record holds `old` must rerun with `new` ({config, inputs, libraries} each)."""
    reasons: list[str] = []
    old_files = (old.get("config") or {}).get("dataset_files") or {}
    new_files = (new.get("config") or {}).get("dataset_files") or {}
    if old_files != new_files:
        added = (new_files.get("files") or 0) - (old_files.get("files") or 0)
        reasons.append(f"dataset changed: {added} files added" if added > 0 else
                       f"dataset changed: {-added} files removed" if added < 0 else "dataset changed: files modified")
    config: list[str] = []
    _changes({k: v for k, v in (old.get("config") or {}).items() if k != "dataset_files"},
             {k: v for k, v in (new.get("config") or {}).items() if k != "dataset_files"}, "", config)
    if config:
        reasons.append("config " + "; ".join(config[:3]) + (f" (+{len(config) - 3} more)" if len(config) > 3 else ""))
    libraries: list[str] = []
    _changes(old.get("libraries") or {}, new.get("libraries") or {}, "", libraries)
    if libraries:
        reasons.append("library " + "; ".join(libraries))
    old_inputs, new_inputs = old.get("inputs") or {}, new.get("inputs") or {}
    changed = sorted(dep for dep in set(old_inputs) | set(new_inputs) if old_inputs.get(dep) != new_inputs.get(dep))
    if changed:
        reasons.append("new results from " + ", ".join(changed))
    return "; ".join(reasons) or "edgekd version changed"
