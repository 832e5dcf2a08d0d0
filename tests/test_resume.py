"""Kill and resume, and locking, through the real `edgekd run`: SIGKILL during distill and during quantize,
reruns skip finished stages by fingerprint, redo the killed stage from scratch, and leave a complete run
directory with no truncated file; a second run on a busy run directory is refused, a dead run's lock is
taken over. (The runs themselves: tests/reliability_runs.py.)"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reliability_runs import LOCK, Scenario, files_in, kill_and_resume_scenario

from edgekd import atomic

STAGES = ("teacher", "distill", "prune", "export", "quantize", "benchmark", "report")


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return kill_and_resume_scenario(tmp_path_factory)


def _states(log: str) -> dict[str, list[str]]:
    """stage -> the states this run logged for it: running, done, up to date."""
    states: dict[str, list[str]] = {}
    for stage, state in re.findall(r"\[(\w+)\] (running|done|up to date)", log):
        states.setdefault(stage, []).append(state)
    return states


def test_kill_during_distill_keeps_the_teacher_and_leaves_no_student(scenario: Scenario) -> None:
    phase = scenario.killed_in_distill
    assert phase.proc.popen.returncode == -9
    assert _states(phase.log) == {"teacher": ["running", "done"], "distill": ["running"]}, phase.log
    assert list(phase.manifest["stages"]) == ["teacher"]  # distill was forgotten before it started
    assert "teacher.pt" in phase.files
    assert not [f for f in phase.files if f.startswith("student")], phase.files


def test_rerun_after_kill_skips_teacher_by_fingerprint_and_redoes_distill(scenario: Scenario) -> None:
    first, second = scenario.killed_in_distill, scenario.killed_in_quantize
    states = _states(second.log)
    assert states["teacher"] == ["up to date"], second.log
    assert states["distill"] == ["running", "done"]
    assert f"taking over a stale lock left by pid {first.proc.pid}" in second.proc.stderr
    assert second.manifest["stages"]["teacher"] == first.manifest["stages"]["teacher"]  # untouched, not retrained


def test_kill_during_quantize_then_rerun_finishes_only_what_is_left(scenario: Scenario) -> None:
    killed, final = scenario.killed_in_quantize, scenario.final
    assert killed.proc.popen.returncode == -9
    assert _states(killed.log)["quantize"] == ["running"], killed.log
    assert list(killed.manifest["stages"]) == ["teacher", "distill", "prune", "export"]
    assert "model.int8.onnx" not in killed.files

    assert final.proc.popen.returncode == 0, final.proc.describe()
    states = _states(final.log)
    assert {stage: states[stage] for stage in STAGES[:4]} == {stage: ["up to date"] for stage in STAGES[:4]}, final.log
    assert {stage: states[stage] for stage in STAGES[4:]} == {stage: ["running", "done"] for stage in STAGES[4:]}
    for stage in STAGES[:4]:  # fingerprints and artifacts of the finished stages carried over as they were
        assert final.manifest["stages"][stage]["fingerprint"] == killed.manifest["stages"][stage]["fingerprint"]
        assert final.manifest["stages"][stage]["artifacts"] == killed.manifest["stages"][stage]["artifacts"]


def test_resumed_run_directory_has_a_complete_report_and_no_truncated_file(scenario: Scenario) -> None:
    import onnx
    import torch

    run_dir = scenario.run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["stages"]) == list(STAGES)
    assert all(entry["status"] == "done" for entry in manifest["stages"].values())
    report = json.loads((run_dir / "report.json").read_text())
    assert {row["name"] for row in report["artifacts"]} == {"teacher", "student", "pruned", "int8"}
    assert all(isinstance(row["accuracy"], float) and row["latency_ms"] for row in report["artifacts"])
    assert (run_dir / report["deployed"]["path"]).is_file()

    files = files_in(run_dir)
    assert not [f for f in files if ".tmp-" in f or ".edgekd-work-" in f or ".ort-convert-" in f], files
    assert LOCK not in files
    for name in files:
        path = run_dir / name
        if name.endswith(".pt"):
            assert isinstance(torch.load(path, map_location="cpu", weights_only=True)["state_dict"], dict), name
        elif name.endswith(".onnx"):
            onnx.checker.check_model(str(path), full_check=True)
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".npz"):
            with np.load(path) as arrays:
                assert len(arrays["inputs"]) == len(arrays["labels"]) > 0, name
    for stage, entry in manifest["stages"].items():  # every artifact the manifest names is there, whole
        for name, digest in entry["artifacts"].items():
            assert atomic.sha256_file(run_dir / name) == digest, f"{stage}: {name}"


def test_second_run_on_a_busy_run_directory_exits_2_and_touches_nothing(scenario: Scenario) -> None:
    contender, holder = scenario.contender, scenario.killed_in_quantize.proc
    assert contender.popen.returncode == 2, contender.describe()
    lines = contender.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in contender.stderr
    assert re.fullmatch(rf".*/runs/tiny: in use by another edgekd run \(pid {holder.pid}\); wait for it to finish "
                        rf"\(if no edgekd run is using it, remove .*/runs/tiny/\.edgekd\.lock\)", lines[0]), lines[0]
    assert contender.stdout == ""  # refused before it logged (logs go to stderr: the one line above is all), wrote
    # config.yaml or read the manifest


def test_lock_of_a_killed_run_is_left_behind_then_taken_over(scenario: Scenario) -> None:
    first, second = scenario.killed_in_distill, scenario.killed_in_quantize
    assert first.lock is not None and first.lock["pid"] == first.proc.pid
    assert second.lock is not None and second.lock["pid"] == second.proc.pid
    assert f"taking over a stale lock left by pid {second.proc.pid}" in scenario.final.proc.stderr
    assert not (scenario.run_dir / LOCK).exists()  # released at the end of the run


def test_run_writes_nothing_outside_its_run_directory(scenario: Scenario) -> None:
    outside = [f for f in files_in(scenario.folder) if not f.startswith("runs/tiny/")]
    assert outside == scenario.outside_before == ["pipeline.yaml", "user_models.py"]
    assert [p.name for p in (scenario.folder / "runs").iterdir()] == ["tiny"]


def test_killed_runs_leave_manifests_that_never_point_at_a_missing_file(scenario: Scenario) -> None:
    for phase in (scenario.killed_in_distill, scenario.killed_in_quantize):
        for entry in phase.manifest["stages"].values():
            assert set(entry["artifacts"]) <= set(phase.files), entry["artifacts"]



# --------------------------------------------------------------------------------------------------
# Lock races and leftovers, without a training run


def _race_for_lock(run_dir: str, start: Any, release: Any, results: Any) -> None:
    from edgekd.errors import InputError
    from edgekd.runner.lock import run_lock

    start.wait()
    try:
        with run_lock(Path(run_dir)):
            results.put("acquired")
            release.wait(30)  # hold it until every racer has had its try
    except InputError:
        results.put("refused")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_run_lock_admits_exactly_one_of_many_processes_racing_for_a_stale_lock(tmp_path: Path) -> None:
    import multiprocessing
    import socket

    import edgekd.runner.loop  # noqa: F401 - imported once here, not in each forked racer

    context = multiprocessing.get_context("fork")
    racers = 6
    for _ in range(3):
        (tmp_path / LOCK).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))  # dead pid
        start, release, results = context.Barrier(racers), context.Event(), context.Queue()
        processes = [context.Process(target=_race_for_lock, args=(str(tmp_path), start, release, results))
                     for _ in range(racers)]
        for process in processes:
            process.start()
        outcomes = sorted(results.get(timeout=60) for _ in range(racers))
        release.set()
        for process in processes:
            process.join(30)
        assert outcomes == ["acquired"] + ["refused"] * (racers - 1)
        assert not (tmp_path / LOCK).exists()


def test_rerun_removes_only_the_leftovers_of_files_and_folders_the_manifest_records(tmp_path: Path) -> None:
    from edgekd.runner.contract import Manifest
    from edgekd.runner.files import RunFiles

    run_dir = tmp_path / "run"
    leftovers = [".tmp-teacher.pt.k2j3ab_9", "deploy/.tmp-model.onnx.x1yz0000", "plots/.tmp-latency.png.9qaaaaaa",
                 ".edgekd-work-export/teacher.onnx", ".edgekd-work-quantize/.ort-convert-xyz/out/model.int8.ort"]
    kept = ["teacher.pt", "deploy/model.onnx", "deploy/.tmp-notes.md",  # not atomic_path's exact temp pattern
            ".tmp-mine.txt.abcdefgh",  # atomic_path's pattern, but for a file edgekd never recorded
            "notes/.tmp-draft.md", "notes/.tmp-draft.md.abcdefgh", ".edgekd-work-other/mine.txt"]
    for name in leftovers + kept:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("x")
    (run_dir / "elsewhere").mkdir()
    (run_dir / "elsewhere" / ".tmp-teacher.pt.k2j3ab_9").write_text("x")
    (run_dir / "linked").symlink_to(run_dir / "elsewhere")  # a recorded name that is a link: never followed
    kept += ["elsewhere/.tmp-teacher.pt.k2j3ab_9"]
    manifest = Manifest(files=["teacher.pt", "deploy/", "plots/", ".edgekd-work-export/", ".edgekd-work-quantize/",
                               "linked/"])
    removed = RunFiles(run_dir, manifest).remove_stale_temps()
    assert files_in(run_dir) == sorted(kept)
    assert removed == sorted([".edgekd-work-export/", ".edgekd-work-quantize/", *leftovers[:3]])
    assert (run_dir / "linked").is_symlink()


def test_atomic_writes_leave_no_temp_file_and_give_umask_permissions(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        atomic.write_json(tmp_path / "report.json", {"a": 1})
        with pytest.raises(RuntimeError), atomic.atomic_path(tmp_path / "model.onnx") as temp:
            temp.write_bytes(b"half a mod")
            raise RuntimeError("killed halfway")
    finally:
        os.umask(mask)
    assert files_in(tmp_path) == ["report.json"]  # the failed write left neither a target nor a temp file
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
