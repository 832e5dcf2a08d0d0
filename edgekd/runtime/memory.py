"""Peak resident memory of loading and running a model, measured in a fresh process.

A fresh process because peak RSS only ever grows: measured in the caller (which may hold a training run
or other sessions) it would say nothing about the model. The child is this file run as a script
(`python memory.py MODEL --threads N --batch B`), which imports only numpy, onnxruntime and its sibling
modules, so it works the same from `edgekd/runtime/` and from a deploy bundle's copy of this folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from typing import Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
_CHILD_TIMEOUT_S = 600


def current_peak_rss_bytes() -> int | None:
    """This process's peak resident set size in bytes, or None where the OS gives no way to read it."""
    # Linux/Android: VmHWM is the high-water mark of this process's own address space. ru_maxrss is not
    # trusted there: after fork+exec the kernel folds the parent's peak into it, so a child of a 2 GB
    # training process would report 2 GB.
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB elsewhere


def _run_child(args: Sequence[str], what: str) -> int | None:
    from .errors import RuntimeInputError  # not at module level: this file also runs as a bare script

    command = [sys.executable, os.path.join(_HERE, "memory.py"), *args]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"memory probe of {what} took over {_CHILD_TIMEOUT_S} s") from None
    if proc.returncode == 2:  # the child's RuntimeInputError: a bad model or input, one line on stderr
        raise RuntimeInputError((proc.stderr.strip().splitlines() or [f"{what}: cannot be loaded"])[-1])
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe of {what} failed with exit code {proc.returncode}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def peak_memory_bytes(model_path: str | os.PathLike, threads: int = 1, batch: int = 1,
                      providers: Sequence[str] | None = None) -> int | None:
    """Absolute peak RSS (bytes) of a fresh interpreter that imports numpy + onnxruntime, opens the model
    with `threads` and runs one batch of random inputs. None where the OS cannot report it."""
    args = [os.path.abspath(model_path), "--threads", str(threads), "--batch", str(batch)]
    if providers:
        args += ["--providers", *providers]
    return _run_child(args, str(model_path))


@lru_cache(maxsize=1)
def baseline_memory_bytes() -> int | None:
    """Peak RSS of the same interpreter with numpy + onnxruntime imported and no model: subtract it from
    peak_memory_bytes() to show what the model itself costs."""
    return _run_child(["--baseline"], "the baseline interpreter")


def memory_profile(model_path: str | os.PathLike, threads: int = 1, batch: int = 1,
                   providers: Sequence[str] | None = None) -> dict[str, int | None]:
    """{'peak_bytes', 'baseline_bytes', 'model_increment_bytes'} for reports."""
    peak = peak_memory_bytes(model_path, threads, batch, providers)
    baseline = baseline_memory_bytes()
    increment = None if peak is None or baseline is None else max(peak - baseline, 0)
    return {"peak_bytes": peak, "baseline_bytes": baseline, "model_increment_bytes": increment}


def _load_sibling(name: str):
    """Import a sibling module as part of a private package, without running edgekd/__init__.py
    (which may pull the training stack) — the child must stay as lean as a device install."""
    import importlib
    import types

    package = sys.modules.get("_edgekd_runtime_probe")
    if package is None:
        package = types.ModuleType("_edgekd_runtime_probe")
        package.__path__ = [_HERE]
        sys.modules[package.__name__] = package
    return importlib.import_module(f"{package.__name__}.{name}")


def _child_main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="measure peak RSS of one model run (internal)")
    parser.add_argument("model", nargs="?")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--providers", nargs="*", default=None)
    parser.add_argument("--baseline", action="store_true")
    args = parser.parse_args(argv)

    import numpy  # noqa: F401  (the baseline counts both imports)
    import onnxruntime  # noqa: F401

    session_module = _load_sibling("session")
    errors = _load_sibling("errors")
    if not args.baseline:
        if not args.model:
            parser.error("MODEL is required unless --baseline")
        try:
            session = session_module.open_session(args.model, args.threads, args.providers)
            session.run(None, session_module.random_inputs(session, args.batch))
        except errors.RuntimeInputError as exc:
            print(exc, file=sys.stderr)
            return 2
    print(json.dumps({"peak_rss_bytes": current_peak_rss_bytes()}))
    return 0


if __name__ == "__main__":
    # Run as a script, this folder is sys.path[0]; drop it so our module names cannot shadow
    # anything numpy or onnxruntime imports.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    sys.exit(_child_main(sys.argv[1:]))
