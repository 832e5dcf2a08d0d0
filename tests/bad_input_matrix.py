"""The bad-input matrix's machinery, shared by test_bad_inputs.py and test_bad_inputs_models.py: a case (files
to set up, the CLI arguments, the expected exit code and one-line cause), the builders most cases use, a
module-scoped pool that runs the selected cases as real `python -m edgekd` processes two at a time, and the
check every case must pass (the exit code, one error line matching the cause, no traceback, nothing of the
user's changed, no new file but the runner's bookkeeping where a case allows it)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_CONFIG, error_lines, run_edgekd, write_config

RUN_DIR = Path("runs") / TINY_CONFIG["name"]
# What the runner itself may leave in a run directory when a stage fails (never a stage's artifact).
BOOKKEEPING = {f"{RUN_DIR}/{name}" for name in ("resolved-config.yaml", "log.txt", "manifest.json")}
CLICK_LINES = re.compile(r"^(Usage: |Try '|\s*$)")
# The case folder first on the import path (user factories, sitecustomize.py), the checkout after it.
LOCAL_IMPORTS = {"PYTHONPATH": os.pathsep.join(filter(None, [".", os.environ.get("PYTHONPATH")]))}


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Path], list[str]]  # writes the case's files into its folder, returns the CLI arguments
    code: int
    cause: str  # regex the one error line must match
    writes: str = "nothing"  # "nothing": no file appears or changes; "bookkeeping": only BOOKKEEPING may appear
    usage: bool = False  # a click usage error: "Usage:"/"Try" lines, then one "Error: ..." line
    env: dict[str, str] = field(default_factory=dict)
    within_s: float | None = None  # answered within this many seconds (e.g. an alias bomb is not expanded)


# --------------------------------------------------------------------------------------------------
# Case builders


def config_case(id: str, override: dict[str, Any] | None = None, cause: str = "", *, text: str | None = None,
                args: tuple[str, ...] = (), code: int = 2, writes: str = "nothing", usage: bool = False,
                extra: Callable[[Path], None] | None = None, env: dict[str, str] | None = None,
                within_s: float | None = None) -> Case:
    """`edgekd run pipeline.yaml ARGS` with TINY_CONFIG + override (or the raw YAML `text`)."""

    def setup(folder: Path) -> list[str]:
        if text is not None:
            (folder / "pipeline.yaml").write_text(text)
        else:
            write_config(folder, override)
        if extra is not None:
            extra(folder)
        return ["run", "pipeline.yaml", *args]

    return Case(id, setup, code, cause, writes, usage, env or {}, within_s)


def stage_case(id: str, override: dict[str, Any], cause: str, extra: Callable[[Path], None] | None = None,
               env: dict[str, str] | None = None) -> Case:
    """A config that validates but fails in the teacher stage (data or model), before any training."""
    return config_case(id, override, cause, writes="bookkeeping", extra=extra, env=env)


def tool_case(id: str, args: list[str], cause: str, files: Callable[[Path], None] | None = None, *,
              usage: bool = False, env: dict[str, str] | None = None) -> Case:
    """bench / check / compare / report on files in the case folder."""

    def setup(folder: Path) -> list[str]:
        if files is not None:
            files(folder)
        return list(args)

    return Case(id, setup, 2, cause, "nothing", usage, env or {})


def sitecustomize(text: str) -> Callable[[Path], None]:
    """A sitecustomize.py in the case folder (with LOCAL_IMPORTS: run before edgekd, e.g. to hide a package)."""

    def make(folder: Path) -> None:
        (folder / "sitecustomize.py").write_text(text)

    return make


# --------------------------------------------------------------------------------------------------
# Running and checking


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@dataclass
class Outcome:
    folder: Path
    before: dict[str, str]
    proc: Any = None
    seconds: float = 0.0


def run_cases(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              cases: Sequence[Case]) -> dict[str, Future]:
    """For a module-scoped fixture: the cases the session selected from the requesting module, each set up in its
    own folder here and run two at a time as real `python -m edgekd` processes; case id -> future Outcome."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params}
    results: dict[str, Future] = {}
    pool = ThreadPoolExecutor(max_workers=2)
    request.addfinalizer(pool.shutdown)
    for case in cases:
        if case.id not in selected:
            continue
        folder = tmp_path_factory.mktemp(case.id)
        args = case.setup(folder)
        outcome = Outcome(folder, snapshot(folder))

        def job(case: Case = case, args: list[str] = args, outcome: Outcome = outcome) -> Outcome:
            started = time.perf_counter()
            outcome.proc = run_edgekd(*args, cwd=outcome.folder, env=case.env, timeout=300)
            outcome.seconds = time.perf_counter() - started
            return outcome

        results[case.id] = pool.submit(job)
    return results


def assert_refused(case: Case, outcome: Outcome) -> None:
    """The case's exit code, one error line matching its cause, no traceback, and nothing written or changed."""
    proc = outcome.proc
    shown = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == case.code, shown
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, shown
    lines = error_lines(proc.stderr)  # progress logs before a stage fails are not the error
    if case.usage:  # click's own usage error: "Usage: ...", "Try '... -h' for help.", then the one Error line
        lines = [line for line in lines if not CLICK_LINES.match(line)]
    assert len(lines) == 1, shown
    assert re.search(case.cause, lines[0]), f"{lines[0]!r} does not match {case.cause!r}\n{shown}"
    if case.within_s is not None:
        assert outcome.seconds < case.within_s, f"answered after {outcome.seconds:.1f} s"

    after = snapshot(outcome.folder)
    changed = sorted(name for name in outcome.before if after.get(name) != outcome.before[name])
    assert not changed, f"changed or removed: {changed}"
    new = sorted(set(after) - set(outcome.before))
    allowed = BOOKKEEPING if case.writes == "bookkeeping" else set()
    assert not [name for name in new if name not in allowed], f"new files: {new}"
    if case.writes == "bookkeeping" and (outcome.folder / RUN_DIR / "manifest.json").exists():
        manifest = json.loads((outcome.folder / RUN_DIR / "manifest.json").read_text())
        assert manifest["stages"] == {}, "a failed stage must not be recorded"
