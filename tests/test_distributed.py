"""torchrun with the gloo backend and 2 CPU processes: DDP training stages, one set of artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_config

DDP_OVERRIDE = {
    # 2 ranks each see half of every epoch (the global batch doubles), so give the teacher a few more epochs
    "teacher": {"train": {"epochs": 4}},
    "quantize": None,
    "benchmark": {"threads": [1], "batch_sizes": [1], "warmup": 1, "iterations": 5, "memory": False,
                  "torch_reference": False},
}


def _torchrun(config: Path, cwd: Path, timeout: float = 420, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "edgekd", "run", str(config)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "EDGEKD_DIST_TIMEOUT_S": "120", **(env or {})})


@pytest.mark.slow
def test_torchrun_two_processes_write_one_set_of_artifacts_in_the_accuracy_band(tmp_path: Path) -> None:
    config = write_config(tmp_path, DDP_OVERRIDE)
    result = _torchrun(config, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s for s in manifest["stages"]] == ["teacher", "distill", "prune", "export", "benchmark", "report"]
    # one set of artifacts, nothing per rank in the run directory
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["pruned.pt", "student.pt", "teacher.pt"]
    assert not list(run_dir.glob("*rank*"))
    # rank 0 logs (to stderr); the other rank stays quiet (its console level is WARNING)
    assert result.stderr.count("[teacher] running") == 1
    teacher = manifest["stages"]["teacher"]["metrics"]
    assert teacher["test_accuracy"] >= 0.7  # the single-process run of this config reaches ~0.85-1.0; chance is 0.25

    single = write_config(tmp_path, {**DDP_OVERRIDE, "output_dir": "single"}, name="single.yaml")
    from edgekd.runner.loop import run_pipeline

    run_pipeline(single, only=["teacher"])
    single_accuracy = json.loads((tmp_path / "single" / "manifest.json").read_text())["stages"]["teacher"]["metrics"]["test_accuracy"]
    assert abs(single_accuracy - teacher["test_accuracy"]) <= 0.2


@pytest.mark.slow
def test_torchrun_failure_on_rank_1_ends_the_run_with_nonzero_exit(tmp_path: Path) -> None:
    (tmp_path / "flaky_models.py").write_text(
        "import os\n"
        "from edgekd.models import create_model\n"
        "def student(num_classes, in_channels, input_size):\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    return create_model('cnn_tiny', num_classes=num_classes, in_channels=in_channels, input_size=input_size)\n"
    )
    config = write_config(tmp_path, {**DDP_OVERRIDE, "student": {"model": "flaky_models:student"}, "prune": None})
    result = _torchrun(config, tmp_path, timeout=300, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stdout + result.stderr
    run_dir = tmp_path / "runs" / "tiny"
    assert not (run_dir / "student.pt").exists()
    assert (run_dir / "teacher.pt").is_file()  # the stage before the failure is intact
