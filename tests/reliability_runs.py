"""Real `edgekd run` processes for the reliability tests: started with Popen, watched through their run
directory's log.txt, killed with SIGKILL, rerun.

The scenario runs once per test session (cached here); test_resume, test_determinism and test_safety (which
copies the finished run directory) assert on it:

  clean:    one uninterrupted run of RESUME_OVERRIDE (its own folder, on one core)
  resumed:  the same config in another folder (on another core, at the same time):
            run 1 killed during distill -> run 2 (meanwhile a second `edgekd run` on the busy run directory)
            killed during quantize -> run 3 to the end

Each process is pinned to one CPU core, so torch trains single-threaded: fast on a shared 2-core machine
(two processes with two threads each would fight over the cores) and the same thread count in every run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_CONFIG, write_config

# Distill long enough to be caught: a somewhat bigger synthetic set and more epochs (a second or two on one core).
# The teacher comes from user code (`pkg.module:factory`), so distill, prune and export rebuild it from
# teacher.pt's meta through the factory check; no .ort copies (the ORT converter is slow and not reproducible).
RESUME_OVERRIDE: dict[str, Any] = {
    "data": {"synthetic": {"num_samples": 600}},
    "teacher": {"model": "user_models:small"},
    "distill": {"epochs": 6},
    "export": {"ort_format": False},
}
USER_MODELS = '''
from edgekd.models.cnn import EdgeCNN


def small(num_classes, in_channels, input_size):
    return EdgeCNN(num_classes, in_channels, input_size, widths=[8, 16])
'''
RUN_NAME = TINY_CONFIG["name"]
LOCK = ".edgekd.lock"
CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
TIMEOUT_S = 300


@dataclass
class Proc:
    """A started `python -m edgekd ...` whose stdout/stderr go to files (no pipe to fill up)."""

    popen: subprocess.Popen
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        return self.popen.wait(timeout=timeout)

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def describe(self) -> str:
        return f"pid {self.pid} exit {self.popen.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def start_edgekd(args: list[str], cwd: Path, logs: Path, label: str, core: int | None = None,
                 env: dict[str, str] | None = None) -> Proc:
    """Start `python -m edgekd ARGS` in its own process group (so SIGKILL reaches its helper processes too),
    with `cwd` importable (user_models.py)."""
    out, err = logs / f"{label}.out", logs / f"{label}.err"

    def pin() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})

    with out.open("w") as stdout, err.open("w") as stderr:  # the child keeps its own copies
        popen = subprocess.Popen(
            [sys.executable, "-m", "edgekd", *args], cwd=cwd, stdout=stdout, stderr=stderr,
            start_new_session=True, preexec_fn=pin if core is not None and CORES else None,  # noqa: PLW1509
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")])),
                 "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},  # no __pycache__ of user_models beside the config
        )
    return Proc(popen, out, err)


def wait_for_log(log: Path, offset: int, pattern: str, proc: Proc, timeout: float = TIMEOUT_S) -> str:
    """Poll log.txt (from byte `offset`: what this process appended) until `pattern` appears."""
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_bytes()[offset:].decode("utf-8", "replace") if log.exists() else ""
        if regex.search(text):
            return text
        if proc.popen.poll() is not None:
            pytest.fail(f"edgekd exited before {pattern!r} appeared in {log}\n{proc.describe()}")
        time.sleep(0.01)
    pytest.fail(f"{pattern!r} did not appear in {log} within {timeout} s\n{proc.describe()}")


def kill_hard(proc: Proc) -> None:
    """SIGKILL the run and its helper processes, and reap it (a zombie would still look alive to the lock)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def log_size(run_dir: Path) -> int:
    log = run_dir / "log.txt"
    return log.stat().st_size if log.exists() else 0


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@dataclass
class Phase:
    """One `edgekd run` of the resumed chain and what the run directory looked like after it."""

    proc: Proc
    log: str  # what this run appended to log.txt
    manifest: dict[str, Any]
    files: list[str]
    lock: dict[str, Any] | None  # the lock file left behind, if any


@dataclass
class Scenario:
    folder: Path  # the resumed run's config folder
    run_dir: Path
    clean_dir: Path
    clean: Proc
    killed_in_distill: Phase
    killed_in_quantize: Phase
    final: Phase
    contender: Proc  # a second `edgekd run` started while run 2 held the run directory
    outside_before: list[str] = field(default_factory=list)


def _phase(proc: Proc, run_dir: Path, offset: int) -> Phase:
    lock = run_dir / LOCK
    return Phase(
        proc=proc, log=(run_dir / "log.txt").read_bytes()[offset:].decode("utf-8", "replace"),
        manifest=read_json(run_dir / "manifest.json"), files=files_in(run_dir),
        lock=read_json(lock) if lock.exists() else None,
    )


_CACHE: dict[str, Scenario] = {}


def kill_and_resume_scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    if "scenario" in _CACHE:
        return _CACHE["scenario"]
    logs = tmp_path_factory.mktemp("edgekd-logs")
    clean_folder = tmp_path_factory.mktemp("clean")
    folder = tmp_path_factory.mktemp("resumed")
    for where in (clean_folder, folder):
        write_config(where, RESUME_OVERRIDE)
        (where / "user_models.py").write_text(USER_MODELS)
    outside_before = files_in(folder)
    run_dir = folder / "runs" / RUN_NAME
    resumed_core, clean_core = (CORES[0], CORES[-1]) if CORES else (None, None)
    started: list[Proc] = []

    def start(label: str, core: int | None) -> Proc:
        proc = start_edgekd(["run", "pipeline.yaml"], clean_folder if label == "clean" else folder, logs, label, core)
        started.append(proc)
        return proc

    clean = start("clean", clean_core)
    try:
        # Run 1: killed while distilling (after its first epoch was logged).
        first = start("run1", resumed_core)
        wait_for_log(run_dir / "log.txt", 0, r"^.*distill epoch 1/", first)
        kill_hard(first)
        killed_in_distill = _phase(first, run_dir, 0)

        # Run 2: resumes; a second run on the same directory meanwhile; killed while quantizing.
        offset = log_size(run_dir)
        second = start("run2", resumed_core)
        wait_for_log(run_dir / "log.txt", offset, r"\[distill\] running", second)
        contender = start("contender", None)
        wait_for_log(run_dir / "log.txt", offset, r"\[quantize\] running", second)
        kill_hard(second)
        killed_in_quantize = _phase(second, run_dir, offset)
        contender.wait()

        # Run 3: to the end.
        offset = log_size(run_dir)
        third = start("run3", resumed_core)
        third.wait()
        final = _phase(third, run_dir, offset)
        clean.wait()
    finally:
        for proc in started:  # nothing outlives a failed scenario
            if proc.popen.poll() is None:
                kill_hard(proc)
    _CACHE["scenario"] = Scenario(folder, run_dir, clean_folder / "runs" / RUN_NAME, clean, killed_in_distill,
                                  killed_in_quantize, final, contender, outside_before)
    return _CACHE["scenario"]
