"""Safety: no code runs from checkpoints, YAML or ONNX files; writes stay inside the run directory; --force
removes only the stage's own files; a diverging loss fails the stage (exit 3) and keeps earlier artifacts.

Training runs go through tests/reliability_runs.py's pinned `edgekd run` (one core, single-threaded torch).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import deep_merge, error_lines, run_edgekd, write_config
from reliability_runs import (
    CORES,
    RESUME_OVERRIDE,
    Proc,
    files_in,
    kill_and_resume_scenario,
    start_edgekd,
)

from edgekd import atomic
from edgekd.errors import InputError

# --force and the NaN guard start from copies of the resumed run of tests/reliability_runs.py (teacher from
# a user factory, student, ...); only teacher and distill are selected.
ONLY_TEACHER_AND_DISTILL = ["--only", "teacher", "--only", "distill"]


@dataclass
class Run:
    code: int
    out: str
    err: str
    folder: Path

    @property
    def run_dir(self) -> Path:
        return self.folder / "runs" / "tiny"


def _start(folder: Path, args: list[str], label: str, core_index: int, env: dict[str, str] | None = None) -> Proc:
    """`edgekd ARGS` in `folder`, on one core."""
    logs = folder.parent / f"logs-{label}"
    logs.mkdir()
    return start_edgekd(args, folder, logs, label, CORES[core_index % len(CORES)] if CORES else None, env)


def _finish(proc: Proc, folder: Path) -> Run:
    return Run(proc.wait(), proc.stdout, proc.stderr, folder)


def _malicious_checkpoint(folder: Path) -> Path:
    import torch

    marker = folder / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"stage1.0.0.weight": Payload()}, folder / "evil.pt")
    write_config(folder, {"teacher": {"checkpoint": "evil.pt"}})
    return marker


@dataclass
class Runs:
    source: Path  # the resumed run directory of tests/reliability_runs.py, copied by the next two
    forced: Run  # --force distill, with unrelated files in the run directory
    forced_before: dict[str, os.stat_result]
    diverged: Run  # distill.lr 1e30
    diverged_before: dict[str, Any]
    malicious: Run  # teacher.checkpoint: a pickle that runs code, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """The three `edgekd run`s that import torch, side by side (one per core, the third shares)."""
    scenario = kill_and_resume_scenario(tmp_path_factory)
    assert scenario.final.proc.popen.returncode == 0, scenario.final.proc.describe()
    evil_folder = tmp_path_factory.mktemp("malicious")
    _malicious_checkpoint(evil_folder)
    malicious = _start(evil_folder, ["run", "pipeline.yaml"], "malicious", 1, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})

    copies = {}
    for name in ("forced", "diverged"):
        copies[name] = tmp_path_factory.mktemp(name) / "copy"
        shutil.copytree(scenario.folder, copies[name])
    forced_dir = copies["forced"] / "runs" / "tiny"
    (forced_dir / "notes.txt").write_text("my notes")
    (forced_dir / "my_model.pt").write_bytes(b"not edgekd's")
    forced_before = {name: (forced_dir / name).stat() for name in ("teacher.pt", "student.pt")}
    diverged_before = {"teacher_sha": atomic.sha256_file(copies["diverged"] / "runs" / "tiny" / "teacher.pt"),
                       "teacher_entry": _manifest(copies["diverged"])["stages"]["teacher"]}
    write_config(copies["diverged"], deep_merge(RESUME_OVERRIDE, {"distill": {"epochs": 1, "lr": 1e30}}))
    forced = _start(copies["forced"], ["run", "pipeline.yaml", "--force", "distill", *ONLY_TEACHER_AND_DISTILL],
                    "forced", 0)
    diverged = _start(copies["diverged"], ["run", "pipeline.yaml", *ONLY_TEACHER_AND_DISTILL], "diverged", 1)
    return Runs(scenario.run_dir, _finish(forced, copies["forced"]), forced_before, _finish(diverged, copies["diverged"]),
                diverged_before, _finish(malicious, evil_folder))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "runs" / "tiny" / "manifest.json").read_text())


def _one_line(err: str) -> str:
    lines = error_lines(err)  # progress logs (stderr) before the failure are not the error
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# Checkpoints


def test_malicious_teacher_checkpoint_never_runs_even_when_env_forces_unsafe_torch_load(runs: Runs) -> None:
    run = runs.malicious
    assert run.code == 2, run.out + run.err
    assert "evil.pt: refused to load: not a plain weights file (Unsupported global" in _one_line(run.err)
    assert not (run.folder / "pwned").exists()
    assert not (run.run_dir / "teacher.pt").exists()


def test_checkpoint_meta_cannot_choose_which_factory_is_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgekd.models import create_model, load_model, model_meta
    from edgekd.models.checkpoint import save_checkpoint

    marker = tmp_path / "pwned"
    model = create_model("cnn_tiny", num_classes=4, in_channels=1, input_size=16)
    save_checkpoint(model, tmp_path / "evil.pt", {"model": "os:system", "model_kwargs": {"command": f"touch {marker}"}})
    with pytest.raises(InputError, match=r"evil\.pt: the checkpoint names the model factory 'os:system', which the "
                                         r"config does not"):
        load_model(tmp_path / "evil.pt", num_classes=4, in_channels=1, input_size=16, factories=("cnn_small", "cnn_tiny"))
    assert not marker.exists()

    # built-in names need no permission; a factory the config names is rebuilt as before
    save_checkpoint(model, tmp_path / "tiny.pt", model_meta("cnn_tiny", {}, "student"))
    assert load_model(tmp_path / "tiny.pt", num_classes=4, in_channels=1, input_size=16) is not None
    (tmp_path / "mine.py").write_text("from edgekd.models.cnn import EdgeCNN\n\n\n"
                                      "def build(num_classes, in_channels, input_size):\n"
                                      "    return EdgeCNN(num_classes, in_channels, input_size, widths=[8, 16])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mine = create_model("mine:build", num_classes=4, in_channels=1, input_size=16)
    save_checkpoint(mine, tmp_path / "mine.pt", model_meta("mine:build", {}, "teacher"))
    with pytest.raises(InputError, match="names the model factory 'mine:build'"):
        load_model(tmp_path / "mine.pt", num_classes=4, in_channels=1, input_size=16)
    loaded = load_model(tmp_path / "mine.pt", num_classes=4, in_channels=1, input_size=16, factories=("mine:build",))
    assert loaded.state_dict().keys() == mine.state_dict().keys()


def test_model_name_without_a_factory_never_imports_a_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgekd.models import create_model

    marker = tmp_path / "imported"
    (tmp_path / "sneaky.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("sneaky", "sneaky.build", "Sneaky"):
        with pytest.raises(InputError, match="teacher.model"):
            create_model(spec, num_classes=4, in_channels=1, input_size=16, field="teacher.model")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# YAML


@pytest.mark.parametrize("text, cause", [
    ("name: tiny\nseed: !!python/object/apply:os.system ['touch {marker}']\n",
     (r"pipeline\.yaml:2:7: YAML syntax error: could not determine a constructor for the tag "
      r"'tag:yaml\.org,2002:python/object/apply:os\.system'")),
    ("name: tiny\nteacher: !!python/object:edgekd.config.TeacherConfig {{model: cnn_small}}\n",
     r"could not determine a constructor for the tag 'tag:yaml\.org,2002:python/object:edgekd\.config\.TeacherConfig'"),
    ("name: tiny\nseed: 1\nteacher: {{model: cnn_small}}\nseed: 2\n", r"pipeline\.yaml:4:1: YAML syntax error: duplicate key 'seed'"),
    ("name: tiny\nteacher:\n  model: cnn_small\n  model: cnn_large\n", r"pipeline\.yaml:4:3: YAML syntax error: duplicate key 'model'"),
], ids=["python-object-apply", "python-object", "duplicate-top-level-key", "duplicate-nested-key"])
def test_pipeline_yaml_with_python_tags_or_duplicate_keys_is_rejected(tmp_path: Path, text: str, cause: str) -> None:
    import re

    marker = tmp_path / "pwned"
    (tmp_path / "pipeline.yaml").write_text(text.format(marker=marker))
    proc = run_edgekd("run", "pipeline.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert re.search(cause, _one_line(proc.stderr)), proc.stderr
    assert not marker.exists() and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------------
# ONNX external data


def _model_with_external_weights(folder: Path, location: str) -> Path:
    """tiny.onnx whose first weight lives in an external file at `location` (relative to the model)."""
    import onnx
    from onnx.external_data_helper import set_external_data
    from report_fixture import tiny_model

    path = folder / "models" / "tiny.onnx"
    path.parent.mkdir(parents=True)
    tiny_model(path, hidden=8)
    model = onnx.load(str(path))
    weight = model.graph.initializer[0]
    data = onnx.numpy_helper.to_array(weight).tobytes()
    target = (path.parent / location)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)  # the bytes exist where the model points: only the location check can refuse
    set_external_data(weight, location=location, offset=0, length=len(data))
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    onnx.save(model, str(path))
    return path


def test_bench_refuses_onnx_external_data_outside_the_model_folder(tmp_path: Path) -> None:
    model = _model_with_external_weights(tmp_path, "../secret.bin")
    proc = run_edgekd("bench", str(model), "--no-memory", "--no-mobile", "--iterations", "5", "--warmup", "0", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert _one_line(proc.stderr).endswith("tiny.onnx: external data '../secret.bin' is outside the model's folder; "
                                           "only weights stored beside the model file are loaded")


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "ABSOLUTE"])
def test_open_session_loads_external_data_only_from_beside_the_model(tmp_path: Path, location: str) -> None:
    from edgekd.runtime.errors import RuntimeInputError
    from edgekd.runtime.session import open_session

    location = str(tmp_path / "secret.bin") if location == "ABSOLUTE" else location
    model = _model_with_external_weights(tmp_path, location)
    with pytest.raises(RuntimeInputError, match="is outside the model's folder"):
        open_session(model)


def test_open_session_loads_external_data_stored_beside_the_model(tmp_path: Path) -> None:
    from edgekd.runtime.session import open_session

    session = open_session(_model_with_external_weights(tmp_path, "tiny.weights"))
    out = session.run(None, {"input": np.zeros((2, 1, 8, 8), np.float32)})[0]
    assert out.shape == (2, 4)


# --------------------------------------------------------------------------------------------------
# Writes stay inside the run directory; --force removes only the stage's own artifacts


@pytest.mark.parametrize("name", ["../escape.pt", "/tmp/escape.pt", "plots/../../escape.pt"])
def test_run_context_path_refuses_names_that_leave_the_run_directory(tmp_path: Path, name: str) -> None:
    from edgekd.config import validate_config
    from edgekd.runner.contract import Manifest
    from edgekd.runner.loop import context_for

    cfg = validate_config({"name": "tiny"}, base_dir=tmp_path)
    ctx = context_for(cfg, Manifest())
    with pytest.raises(InputError, match="refusing to write outside the run directory"):
        ctx.path(name)
    assert ctx.path("plots/teacher.png") == cfg.run_dir / "plots" / "teacher.png"


def test_force_never_deletes_outside_the_run_directory_even_with_a_tampered_manifest(tmp_path: Path) -> None:
    write_config(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (tmp_path / "precious.txt").write_text("keep me")
    stage = {"status": "done", "fingerprint": "0" * 16, "artifacts": {"../../precious.txt": "0" * 64}, "metrics": {}}
    (run_dir / "manifest.json").write_text(json.dumps({"schema_version": 1, "stages": {"teacher": stage}}))
    proc = run_edgekd("run", "pipeline.yaml", "--force", "teacher", "--only", "teacher", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert _one_line(proc.stderr) == "refusing to write outside the run directory: ../../precious.txt"
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_force_distill_replaces_student_and_keeps_unrelated_files(runs: Runs) -> None:
    run, before = runs.forced, runs.forced_before
    assert run.code == 0, run.out + run.err
    assert "[teacher] up to date" in run.err and "[distill] running" in run.err  # logs go to stderr
    run_dir = run.run_dir
    assert (run_dir / "notes.txt").read_text() == "my notes" and (run_dir / "my_model.pt").read_bytes() == b"not edgekd's"
    assert (run_dir / "student.pt").stat().st_ino != before["student.pt"].st_ino  # a new file took its place
    assert (run_dir / "teacher.pt").stat().st_ino == before["teacher.pt"].st_ino
    assert atomic.sha256_file(run_dir / "teacher.pt") == atomic.sha256_file(runs.source / "teacher.pt")
    assert _manifest(run.folder)["stages"]["distill"]["artifacts"]["student.pt"] == atomic.sha256_file(run_dir / "student.pt")


# --------------------------------------------------------------------------------------------------
# NaN guard


def test_diverging_distillation_fails_with_exit_3_naming_epoch_and_step_and_keeps_the_teacher(runs: Runs) -> None:
    import re

    run = runs.diverged
    assert run.code == 3, run.out + run.err
    line = _one_line(run.err)
    assert re.fullmatch(r"distill: loss became (nan|inf|-inf) at epoch 1, step \d+ \(lower the learning rate\?\)", line), line
    assert "[teacher] up to date" in run.err
    assert atomic.sha256_file(run.run_dir / "teacher.pt") == runs.diverged_before["teacher_sha"]
    stages = _manifest(run.folder)["stages"]
    assert stages["teacher"] == runs.diverged_before["teacher_entry"] and "distill" not in stages
    assert not [f for f in files_in(run.run_dir) if f in ("student.pt", "student_baseline.pt") or ".tmp-" in f]
    assert f"[distill] failed: {line}" in (run.run_dir / "log.txt").read_text()


# --------------------------------------------------------------------------------------------------
# A run directory shared with the user's own files: edgekd touches only what its manifest records it created


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in files_in(folder)}


def test_output_dir_dot_keeps_the_users_files_and_never_writes_over_the_config(tmp_path: Path) -> None:
    """`edgekd run config.yaml --output-dir .` in a folder of the user's: a refused run (exit 2) and a rerun
    leave every file of theirs as it was, temp-like names and the config's comments included."""
    config = write_config(tmp_path, name="config.yaml")
    config.write_text("# my comments, kept\n" + config.read_text())
    mine = {"notes/.tmp-draft.md": "draft", ".tmp-keep.txt": "keep", ".tmp-teacher.pt.abcdefgh": "looks like a temp",
            ".staging-export-mine/a.txt": "a", ".ort-convert-mine/b.txt": "b", "notes/deep/.tmp-x.md.abcdefgh": "x"}
    for name, text in mine.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = _snapshot(tmp_path)
    for _ in range(2):  # the second run finds a manifest of its own there
        proc = run_edgekd("run", "config.yaml", "--output-dir", ".", "--only", "distill", cwd=tmp_path)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "stage 'distill' needs teacher" in _one_line(proc.stderr)
        after = _snapshot(tmp_path)
        assert {name: after.get(name) for name in before} == before
        assert set(after) - set(before) == {"manifest.json", "log.txt", "resolved-config.yaml"}
    assert "dataset: synthetic" in (tmp_path / "resolved-config.yaml").read_text()
    assert json.loads((tmp_path / "manifest.json").read_text())["files"] == ["log.txt", "manifest.json",
                                                                                "resolved-config.yaml"]


@pytest.mark.parametrize("name", ["log.txt", "manifest.json", "resolved-config.yaml"])
def test_run_directory_file_that_is_a_symlink_is_refused_and_never_followed(tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not edgekd's\n")
    write_config(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / name).symlink_to(outside)
    proc = run_edgekd("run", "pipeline.yaml", "--only", "teacher", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert _one_line(proc.stderr).startswith(f"{run_dir / name}: is a symbolic link; edgekd never ")
    assert outside.read_text() == "not edgekd's\n"
    assert sorted(p.name for p in run_dir.iterdir()) == [name] and (run_dir / name).is_symlink()


def test_users_log_in_the_run_directory_is_refused_not_appended_to(tmp_path: Path) -> None:
    write_config(tmp_path, {"output_dir": "."})
    (tmp_path / "log.txt").write_text("my log\n")
    proc = run_edgekd("run", "pipeline.yaml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert _one_line(proc.stderr) == (f"{tmp_path / 'log.txt'}: already in the run directory and not written by "
                                      "edgekd, which never writes over a file it did not create (move it away or "
                                      "choose another output_dir)")
    assert (tmp_path / "log.txt").read_text() == "my log\n"
    assert sorted(files_in(tmp_path)) == ["log.txt", "pipeline.yaml"]  # refused before anything was written


def test_users_checkpoint_at_an_artifact_path_is_refused_not_overwritten(tmp_path: Path) -> None:
    """output_dir: . with the user's own teacher.pt as teacher.checkpoint: the teacher stage would save its
    teacher.pt over it."""
    from edgekd.models import create_model, model_meta
    from edgekd.models.checkpoint import save_checkpoint

    save_checkpoint(create_model("cnn_small", num_classes=4, in_channels=1, input_size=16), tmp_path / "teacher.pt",
                    model_meta("cnn_small", {}, "teacher"))
    mine = (tmp_path / "teacher.pt").read_bytes()
    write_config(tmp_path, {"output_dir": ".", "teacher": {"checkpoint": "teacher.pt"}})
    proc = run_edgekd("run", "pipeline.yaml", "--only", "teacher", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert _one_line(proc.stderr).startswith(f"{tmp_path / 'teacher.pt'}: already in the run directory and not "
                                             "written by edgekd")
    assert (tmp_path / "teacher.pt").read_bytes() == mine
    assert not [f for f in files_in(tmp_path) if f.startswith(".tmp-")]
    assert "teacher" not in json.loads((tmp_path / "manifest.json").read_text())["stages"]


@pytest.mark.parametrize("folder", ["plots", "deploy"])
def test_report_render_refuses_a_folder_it_did_not_create_or_a_linked_one(tmp_path: Path, folder: str) -> None:
    pytest.importorskip("onnx")
    from click.testing import CliRunner
    from report_fixture import make_run

    from edgekd.cli import main

    run_dir = make_run(tmp_path, report={"plots": True})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run_dir / folder).symlink_to(elsewhere, target_is_directory=True)
    result = CliRunner().invoke(main, ["report", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert f"{run_dir / folder}: is a symbolic link" in result.output and list(elsewhere.iterdir()) == []
    (run_dir / folder).unlink()
    (run_dir / folder).mkdir()  # the user's own folder of that name
    (run_dir / folder / "mine.txt").write_text("mine")
    result = CliRunner().invoke(main, ["report", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert f"{run_dir / folder}: already in the run directory and not written by edgekd" in result.output
    assert files_in(run_dir / folder) == ["mine.txt"]


def test_a_file_named_like_the_lock_that_is_not_one_is_refused_not_deleted(tmp_path: Path) -> None:
    from edgekd.runner.lock import LOCK, run_lock

    (tmp_path / LOCK).write_text("my notes\n")
    with pytest.raises(InputError, match=r"\.edgekd\.lock: not an edgekd lock file; edgekd will not remove it"):
        with run_lock(tmp_path):
            pass
    assert (tmp_path / LOCK).read_text() == "my notes\n"
    (tmp_path / LOCK).write_text("")  # created, then its run died before writing the record: stale
    with run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("fingerprint", ["../../escape", "../report", ".hidden", "a/b"])
def test_merged_device_file_name_from_its_fingerprint_stays_in_devices(tmp_path: Path, fingerprint: str) -> None:
    """`edgekd report RUN_DIR --merge device.json` names the kept copy after the file's own fingerprint."""
    pytest.importorskip("onnx")
    from click.testing import CliRunner
    from report_fixture import make_run

    from edgekd.cli import main

    run_dir = make_run(tmp_path)
    device = {"schema_version": 1, "fingerprint": fingerprint, "device": {"cpu": "Cortex-A72", "arch": "aarch64"},
              "artifacts": [{"name": "model", "path": "model.onnx", "latency_ms": [
                  {"threads": 1, "batch": 1, "p50": 0.9, "p90": 1.0, "p99": 1.2, "mean": 0.95}]}]}
    (tmp_path / "device.json").write_text(json.dumps(device))
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(main, ["report", str(run_dir), "--merge", str(tmp_path / "device.json")])
    assert result.exit_code == 2, result.output
    assert "is not a plain name" in result.output
    assert _snapshot(tmp_path) == before
