"""Faults through the real `edgekd run`: SIGINT (Ctrl-C) and SIGKILL inside every training stage and inside
export and quantize, each followed by a rerun that resumes at the interrupted stage; the chains end with the
same bytes as an uninterrupted run. A full disk (ENOSPC), injected into edgekd.atomic's writer at the start of
a run and in the middle of a stage, and on a real tiny tmpfs where the machine allows mounting one, ends the
run with one line, leaves nothing partial, and a rerun completes with the same artifacts.

The chains reuse tests/reliability_runs.py: its config (RESUME_OVERRIDE), its process helpers, and its clean
run as the reference (SIGKILL in distill and quantize is its own scenario, asserted by test_resume).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_CONFIG, error_lines, write_config
from reliability_runs import (
    CORES,
    LOCK,
    RESUME_OVERRIDE,
    USER_MODELS,
    Proc,
    files_in,
    kill_and_resume_scenario,
    log_size,
    read_json,
    start_edgekd,
    wait_for_log,
)

from edgekd import atomic
from edgekd.errors import StageFailed

STAGES = ("teacher", "distill", "prune", "export", "quantize", "benchmark", "report")
BOOKKEEPING = {"manifest.json", "log.txt", "resolved-config.yaml"}
SAME_BYTES = ("teacher.pt", "student.pt", "pruned.pt", "teacher.onnx", "student.onnx", "pruned.onnx",
              "model.int8.onnx", "eval.npz", "val.npz")
# When to signal, per stage: a log line the stage writes once it is under way (what is left of the stage
# after it takes far longer than the 10 ms poll). Export: one model is in the staging folder, two to go.
SIGNAL_AT = {"teacher": r"  data: synthetic", "distill": r"distill epoch 1/", "prune": r"\[prune\] running",
             "export": r"  teacher\.onnx: opset", "quantize": r"\[quantize\] running"}
CHAINS = {"SIGINT": ("teacher", "distill", "prune", "export", "quantize"),
          "SIGKILL": ("teacher", "prune", "export")}  # distill and quantize: reliability_runs' scenario


@dataclass
class Interrupted:
    stage: str
    proc: Proc
    manifest: dict[str, Any]
    files: list[str]
    next_log: str = ""  # what the following run logged
    next_stdout: str = ""  # and printed (the lock is taken before log.txt is opened)


@dataclass
class Chain:
    name: str
    run_dir: Path
    interrupted: list[Interrupted] = field(default_factory=list)
    final: Proc | None = None


def _run_chain(name: str, folder: Path, core: int | None) -> Chain:
    """One run directory: a run interrupted in each of CHAINS[name]'s stages in turn, then one to the end."""
    run_dir = folder / "runs" / TINY_CONFIG["name"]
    logs = folder.parent / f"logs-{name}"
    logs.mkdir()
    chain = Chain(name, run_dir)
    sig = getattr(signal, name)
    for index, stage in enumerate([*CHAINS[name], None]):
        offset = log_size(run_dir)
        proc = start_edgekd(["run", "pipeline.yaml"], folder, logs, f"run{index}", core)
        try:
            if stage is None:
                chain.final = proc
                proc.wait()
            else:
                wait_for_log(run_dir / "log.txt", offset, SIGNAL_AT[stage], proc)
                os.killpg(proc.pid, sig)  # the whole process group, as Ctrl-C in a terminal does
                proc.wait()
        finally:
            if proc.popen.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if chain.interrupted:
            chain.interrupted[-1].next_log = (run_dir / "log.txt").read_bytes()[offset:].decode("utf-8", "replace")
            chain.interrupted[-1].next_stdout = proc.stdout + proc.stderr  # logs are on stderr
        if stage is not None:
            chain.interrupted.append(Interrupted(stage, proc, read_json(run_dir / "manifest.json"), files_in(run_dir)))
    return chain


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Chain]:
    folders = {}
    for name in CHAINS:
        folders[name] = tmp_path_factory.mktemp(f"chain-{name}") / "work"
        folders[name].mkdir()
        write_config(folders[name], RESUME_OVERRIDE)
        (folders[name] / "user_models.py").write_text(USER_MODELS)
    cores = [CORES[i % len(CORES)] if CORES else None for i in range(len(CHAINS))]
    with ThreadPoolExecutor(len(CHAINS)) as pool:  # one chain per core, side by side
        futures = {name: pool.submit(_run_chain, name, folders[name], core) for name, core in zip(CHAINS, cores)}
        return {name: future.result() for name, future in futures.items()}


def _states(log: str) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {}
    for stage, state in re.findall(r"\[(\w+)\] (running|done|up to date)", log):
        states.setdefault(stage, []).append(state)
    return states


def _leftovers(files: list[str], manifest: dict[str, Any]) -> list[str]:
    """Files that are neither bookkeeping nor a finished stage's artifact with its recorded hash."""
    recorded = {name for entry in manifest["stages"].values() for name in entry["artifacts"]}
    return [f for f in files if f not in BOOKKEEPING | recorded | {LOCK}]


def _all(chains: dict[str, Chain]) -> list[tuple[str, Interrupted]]:
    return [(name, point) for name, chain in chains.items() for point in chain.interrupted]


def test_sigint_in_each_stage_exits_130_with_one_line_and_leaves_nothing_partial(chains: dict[str, Chain]) -> None:
    chain = chains["SIGINT"]
    assert [p.stage for p in chain.interrupted] == list(CHAINS["SIGINT"])
    for point in chain.interrupted:
        where = f"SIGINT in {point.stage}: {point.proc.describe()}"
        assert point.proc.popen.returncode == 130, where
        assert error_lines(point.proc.stderr) == ["interrupted"], where  # one line, no traceback
        assert list(point.manifest["stages"]) == list(STAGES[:STAGES.index(point.stage)]), where
        assert LOCK not in point.files, where  # released on the way out
        assert _leftovers(point.files, point.manifest) == [], where  # no temp, no work folder, no unrecorded file
        for entry in point.manifest["stages"].values():  # what the finished stages recorded is whole
            for name, digest in entry["artifacts"].items():
                assert atomic.sha256_file(chain.run_dir / name) == digest, f"{where}\n{name}"


def test_sigkill_in_each_stage_leaves_only_recorded_leftovers_and_a_manifest_without_the_stage(
        chains: dict[str, Chain]) -> None:
    chain = chains["SIGKILL"]
    assert [p.stage for p in chain.interrupted] == list(CHAINS["SIGKILL"])
    for point in chain.interrupted:
        where = f"SIGKILL in {point.stage}: {point.proc.describe()}"
        assert point.proc.popen.returncode == -signal.SIGKILL, where
        assert list(point.manifest["stages"]) == list(STAGES[:STAGES.index(point.stage)]), where
        assert LOCK in point.files, where  # a dead run's lock: the next run takes it over
        owned = set(point.manifest["files"])
        for name in _leftovers(point.files, point.manifest):  # what the next run clears, or writes over
            top = name.split("/")[0]
            temp_of = atomic.temp_target(top)
            assert name in owned or f"{top}/" in owned or temp_of in owned, f"{where}\nunrecorded leftover {name}"


def test_rerun_after_each_interruption_resumes_at_the_interrupted_stage(chains: dict[str, Chain]) -> None:
    for name, point in _all(chains):
        states = _states(point.next_log)
        index = STAGES.index(point.stage)
        assert {s: states.get(s) for s in STAGES[:index]} == {s: ["up to date"] for s in STAGES[:index]}, \
            f"{name} in {point.stage}:\n{point.next_log}"
        assert states[point.stage][0] == "running", f"{name} in {point.stage}:\n{point.next_log}"
        if name == "SIGKILL":
            assert f"taking over a stale lock left by pid {point.proc.pid}" in point.next_stdout


def test_interrupted_chains_finish_with_the_bytes_of_an_uninterrupted_run(
        chains: dict[str, Chain], tmp_path_factory: pytest.TempPathFactory) -> None:
    clean = kill_and_resume_scenario(tmp_path_factory)
    assert clean.clean.popen.returncode == 0, clean.clean.describe()
    for chain in chains.values():
        assert chain.final is not None and chain.final.popen.returncode == 0, chain.final and chain.final.describe()
        manifest = read_json(chain.run_dir / "manifest.json")
        assert list(manifest["stages"]) == list(STAGES)
        files = files_in(chain.run_dir)
        assert not [f for f in files if ".tmp-" in f or ".edgekd-work-" in f or ".ort-convert-" in f], files
        assert LOCK not in files
        differ = [n for n in SAME_BYTES if atomic.sha256_file(chain.run_dir / n) != atomic.sha256_file(clean.clean_dir / n)]
        assert not differ, f"{chain.name}: not the bytes of an uninterrupted run: {differ}"


# --------------------------------------------------------------------------------------------------
# A full disk (ENOSPC)

TEACHER_AND_DISTILL = {"prune": None, "quantize": None, "data": {"synthetic": {"num_samples": 200}},
                       "teacher": {"train": {"epochs": 1}}, "distill": {"epochs": 1}}
ONLY = ["teacher", "distill"]


@contextlib.contextmanager
def _full_disk(monkeypatch: pytest.MonkeyPatch, fails: Callable[[Path, int], bool]) -> Iterator[list[str]]:
    """edgekd.atomic's writer raising ENOSPC, after the data went into the temp file, for the writes
    `fails(target, n)` picks (n: the count of writes so far, from 1); yields the targets written."""
    real = atomic.atomic_path
    targets: list[str] = []

    @contextlib.contextmanager
    def writer(target: str | Path) -> Iterator[Path]:
        target = Path(target)
        targets.append(target.name)
        with real(target) as temp:
            yield temp
            if fails(target, len(targets)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(temp))

    monkeypatch.setattr(atomic, "atomic_path", writer)
    try:
        yield targets
    finally:
        monkeypatch.setattr(atomic, "atomic_path", real)


def _artifacts(run_dir: Path) -> dict[str, str]:
    return {name: digest for entry in read_json(run_dir / "manifest.json")["stages"].values()
            for name, digest in entry["artifacts"].items()}


def test_full_disk_at_the_start_and_mid_stage_fails_cleanly_and_a_rerun_gives_the_same_artifacts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgekd.runner.loop import run_pipeline

    # At the start: the very first write of the run (the manifest recording the run's own files).
    start = tmp_path / "start"
    start.mkdir()
    config = write_config(start, TEACHER_AND_DISTILL)
    with _full_disk(monkeypatch, lambda target, n: n == 1) as written, pytest.raises(StageFailed) as failed:
        run_pipeline(config, only=ONLY)
    run_dir = start / "runs" / "tiny"
    assert written == ["manifest.json"]
    assert failed.value.exit_code == 3 and "\n" not in str(failed.value)
    assert str(failed.value).startswith(f"{run_dir}: cannot write the run directory: [Errno 28] No space left")
    assert files_in(run_dir) == []  # no manifest, no temp file, no lock
    reference = run_pipeline(config, only=ONLY)
    assert reference.ran == ONLY

    # Mid-stage: distill trained its student, and saving it hits the full disk.
    mid = tmp_path / "mid"
    mid.mkdir()
    config = write_config(mid, TEACHER_AND_DISTILL)
    run_dir = mid / "runs" / "tiny"
    with _full_disk(monkeypatch, lambda target, n: target.name == "student.pt"), pytest.raises(StageFailed) as failed:
        run_pipeline(config, only=ONLY)
    message = str(failed.value)
    assert failed.value.exit_code == 3 and "\n" not in message
    assert re.fullmatch(r"stage distill failed: OSError: \[Errno 28\] No space left on device: '.*' "
                        rf"\(traceback in {re.escape(str(run_dir / 'log.txt'))}\)", message), message
    assert list(read_json(run_dir / "manifest.json")["stages"]) == ["teacher"]
    assert sorted(files_in(run_dir)) == sorted(BOOKKEEPING | {"teacher.pt"})  # no student.pt, no temp file
    assert "Errno 28" in (run_dir / "log.txt").read_text()
    rerun = run_pipeline(config, only=ONLY)
    assert rerun.ran == ["distill"] and rerun.skipped == ["teacher"]
    assert _artifacts(run_dir) == _artifacts(start / "runs" / "tiny")


def _mount_tmpfs(folder: Path, size: str) -> bool:
    """Mount a tmpfs of `size` on `folder`; False where this machine does not allow it (not root, a sandbox)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return proc.returncode == 0


def test_real_full_disk_mid_stage_exits_3_with_one_line_and_the_rerun_completes(tmp_path: Path) -> None:
    """A 36 KiB tmpfs holds the bookkeeping files but not teacher.pt (~31 KiB) next to them: the teacher stage
    fails saving it; with the disk grown, the rerun completes. Skipped where no tmpfs can be mounted."""
    from conftest import run_edgekd

    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, "36k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        write_config(tmp_path, {"output_dir": str(disk / "run"), **TEACHER_AND_DISTILL})
        proc = run_edgekd("run", "pipeline.yaml", "--only", "teacher", cwd=tmp_path)
        run_dir = disk / "run"
        assert proc.returncode == 3, proc.stdout + proc.stderr
        lines = error_lines(proc.stderr)  # progress logs aside
        assert len(lines) == 1 and "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr
        assert "No space left on device" in lines[0], lines[0]
        assert "teacher" not in read_json(run_dir / "manifest.json")["stages"]
        assert sorted(files_in(run_dir)) == sorted(BOOKKEEPING)  # no partial teacher.pt, no temp file, no lock
        subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)
        proc = run_edgekd("run", "pipeline.yaml", "--only", "teacher", cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        entry = read_json(run_dir / "manifest.json")["stages"]["teacher"]
        assert atomic.sha256_file(run_dir / "teacher.pt") == entry["artifacts"]["teacher.pt"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
