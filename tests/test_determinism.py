"""Determinism: two CPU runs of one config with one seed, in different output directories, give identical
accuracies and byte-identical checkpoints, ONNX files and evaluation data (timings aside).

The second run is the kill-and-resume chain of tests/reliability_runs.py (killed in distill and in quantize,
finished by a third process), so this also shows that resuming changes nothing. Both runs are pinned to one
core: results are reproducible for a given thread count (a different count changes float summation order).
ORT-format `.ort` copies are left out (export.ort_format: false): onnxruntime's converter does not write
them byte-identically, even from one .onnx file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reliability_runs import Scenario, kill_and_resume_scenario

from edgekd import atomic

SAME_BYTES = ("teacher.pt", "student.pt", "pruned.pt", "teacher.onnx", "student.onnx", "pruned.onnx", "model.int8.onnx",
              "eval.npz", "val.npz")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    scenario: Scenario = kill_and_resume_scenario(tmp_path_factory)
    assert scenario.clean.popen.returncode == 0, scenario.clean.describe()
    assert scenario.final.proc.popen.returncode == 0, scenario.final.proc.describe()
    return scenario.clean_dir, scenario.run_dir


def _stage_metrics(run_dir: Path) -> dict:
    return {stage: entry["metrics"] for stage, entry in json.loads((run_dir / "manifest.json").read_text())["stages"].items()}


def test_two_runs_of_one_config_write_byte_identical_models_and_onnx_files(runs: tuple[Path, Path]) -> None:
    first, second = runs
    differ = [name for name in SAME_BYTES if atomic.sha256_file(first / name) != atomic.sha256_file(second / name)]
    assert not differ, f"not byte-identical across runs: {differ}"


def test_two_runs_of_one_config_give_identical_accuracies(runs: tuple[Path, Path]) -> None:
    first, second = (_stage_metrics(run) for run in runs)
    for stage, keys in {
        "teacher": ("val_accuracy", "test_accuracy"),
        "distill": ("student_val_accuracy", "student_test_accuracy", "student_test_agreement", "best_epoch"),
        "prune": ("accuracy_after_prune", "accuracy_after_recovery", "test_accuracy", "params_after", "macs_after"),
        "quantize": ("fp32_val_accuracy", "int8_val_accuracy", "agreement", "quantized_nodes", "size_bytes"),
    }.items():
        assert {k: first[stage][k] for k in keys} == {k: second[stage][k] for k in keys}, stage
    # per-epoch training curves too (wall times aside)
    for stage in ("teacher", "distill"):
        curve = [{k: v for k, v in row.items() if not k.endswith("_s")} for row in first[stage]["history"]]
        assert curve == [{k: v for k, v in row.items() if not k.endswith("_s")} for row in second[stage]["history"]]
    rows = [{row["name"]: (row["accuracy"], row["agreement"], row["size_bytes"], row["params"])
             for row in json.loads((run / "report.json").read_text())["artifacts"]} for run in runs]
    assert rows[0] == rows[1]


def test_onnx_metadata_names_no_run_directory_or_temp_path(runs: tuple[Path, Path]) -> None:
    import onnx

    for run_dir in runs:
        for name in ("teacher.onnx", "model.int8.onnx"):
            values = " ".join(p.value for p in onnx.load(str(run_dir / name), load_external_data=False).metadata_props)
            assert str(run_dir.parent.parent) not in values and ".tmp-" not in values, name
