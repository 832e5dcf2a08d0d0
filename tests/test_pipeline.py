"""The stage runner: fingerprints, skip on rerun, --force / --from / --only, lock, atomic manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import write_config
from edgekd.config import load_config
from edgekd.errors import InputError
from edgekd.runner.lock import LOCK, run_lock
from edgekd.runner.loop import run_pipeline

TEACHER_ONLY = {"distill": None, "prune": None, "quantize": None}


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def test_run_pipeline_trains_teacher_then_skips_it_on_rerun(tmp_path: Path) -> None:
    config = write_config(tmp_path, TEACHER_ONLY)
    first = run_pipeline(config, only=["teacher"])
    assert first.ran == ["teacher"]
    run_dir = tmp_path / "runs" / "tiny"
    for name in ("manifest.json", "resolved-config.yaml", "log.txt", "teacher.pt"):
        assert (run_dir / name).is_file(), name
    entry = _manifest(run_dir)["stages"]["teacher"]
    assert entry["status"] == "done" and entry["wall_s"] > 0
    assert entry["metrics"]["test_accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert set(entry["artifacts"]) == {"teacher.pt"}

    second = run_pipeline(config, only=["teacher"])
    assert second.ran == [] and second.skipped == ["teacher"]
    assert "[teacher] up to date" in (run_dir / "log.txt").read_text()

    forced = run_pipeline(config, only=["teacher"], force=["teacher"])
    assert forced.ran == ["teacher"]


def test_run_pipeline_reruns_stage_when_its_config_or_artifact_changes(tmp_path: Path) -> None:
    config = write_config(tmp_path, TEACHER_ONLY)
    run_pipeline(config, only=["teacher"])
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "teacher.pt").write_bytes(b"tampered")
    assert run_pipeline(config, only=["teacher"]).ran == ["teacher"]
    changed = write_config(tmp_path, {**TEACHER_ONLY, "teacher": {"train": {"epochs": 1}}})
    assert run_pipeline(changed, only=["teacher"]).ran == ["teacher"]
    assert run_pipeline(changed, only=["teacher"], from_stage="teacher").ran == ["teacher"]


def test_run_pipeline_only_refuses_stage_whose_inputs_are_stale(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"prune": None, "quantize": None})
    with pytest.raises(InputError, match="stage 'distill' needs teacher, which is not up to date"):
        run_pipeline(config, only=["distill"])


def test_run_pipeline_rejects_unknown_stage_names(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown stage 'quantise'"):
        run_pipeline(write_config(tmp_path), force=["quantise"])


def test_run_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path: Path) -> None:
    lock = tmp_path / LOCK
    import socket

    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(InputError, match="in use by another edgekd run"):
        with run_lock(tmp_path):
            pass
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))  # no such process
    with run_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_run_pipeline_output_dir_override_and_resolved_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, TEACHER_ONLY)
    out = tmp_path / "elsewhere"
    run_pipeline(load_config(config), only=["teacher"], output_dir=out)
    saved = (out / "resolved-config.yaml").read_text()
    assert "dataset: synthetic" in saved and str(out) in saved
