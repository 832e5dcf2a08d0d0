"""Honest cache keys: a stage is skipped only when its inputs are truly the same — its config, its input
artifacts, the versions of the libraries it computes with, the dataset's files and a user factory's source —
and a rerun says why in the log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_config
from edgekd.runner import keys
from edgekd.runner.loop import run_pipeline

pytestmark = pytest.mark.slow


def _log(run_dir: Path) -> str:
    return (run_dir / "log.txt").read_text()


def _images(root: Path, per_class: int, start: int = 0) -> None:
    rng = np.random.default_rng(start)
    for label, name in enumerate(("dark", "light")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            pixels = (rng.random((12, 12)) * 60 + label * 150).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i}.png")


def test_imagefolder_change_reruns_the_stage_that_reads_it_and_says_why(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    _images(root, per_class=20)
    config = write_config(tmp_path, {"data": {"dataset": "imagefolder", "root": str(root), "image_size": 12},
                                     "teacher": {"model": "cnn_tiny", "train": {"epochs": 1}},
                                     "distill": None, "prune": None, "quantize": None})
    run_dir = tmp_path / "runs" / "tiny"
    assert run_pipeline(config, only=["teacher"]).ran == ["teacher"]
    assert run_pipeline(config, only=["teacher"]).skipped == ["teacher"]  # same files: cached

    _images(root, per_class=3, start=100)  # six new photos
    assert run_pipeline(config, only=["teacher"]).ran == ["teacher"]
    assert "[teacher] rerun: dataset changed: 6 files added" in _log(run_dir)
    data = json.loads((run_dir / "manifest.json").read_text())["stages"]["teacher"]["metrics"]["data"]
    assert sum(data["split_sizes"].values()) == 46

    (root / "dark" / "0.png").write_bytes((root / "light" / "0.png").read_bytes())  # one photo rewritten
    assert run_pipeline(config, only=["teacher"]).ran == ["teacher"]
    assert "[teacher] rerun: dataset changed: files modified" in _log(run_dir)


def test_library_version_change_reruns_exactly_the_stages_that_use_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path, {"data": {"synthetic": {"num_samples": 240}}, "teacher": {"train": {"epochs": 1}},
                                     "distill": {"epochs": 1}, "export": {"ort_format": False}, "report": {"plots": False}})
    run_dir = tmp_path / "runs" / "tiny"
    first = run_pipeline(config)
    assert first.ran == ["teacher", "distill", "prune", "export", "quantize", "benchmark", "report"]
    checkpoints = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.pt")}

    real = keys.library_version
    monkeypatch.setattr(keys, "library_version", lambda name: "99.0" if name == "onnxruntime" else real(name))
    second = run_pipeline(config)
    # training does not use onnxruntime; export (parity), quantize and benchmark do, and the report reads
    # the new measurements
    assert second.skipped == ["teacher", "distill", "prune"]
    assert second.ran == ["export", "quantize", "benchmark", "report"]
    assert f"[export] rerun: library onnxruntime {real('onnxruntime')!r} -> '99.0'" in _log(run_dir)
    assert "[report] rerun: new results from benchmark" in _log(run_dir)
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.pt")} == checkpoints  # not rewritten


def test_user_factory_source_is_part_of_the_teacher_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "mymodels.py"
    package.write_text("from edgekd.models.cnn import EdgeCNN\n\n"
                       "def build(num_classes, in_channels, input_size):\n"
                       "    return EdgeCNN(num_classes, in_channels, widths=(8, 16), blocks=1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = write_config(tmp_path, {"teacher": {"model": "mymodels:build", "train": {"epochs": 1}},
                                     "distill": None, "prune": None, "quantize": None})
    assert run_pipeline(config, only=["teacher"]).ran == ["teacher"]
    assert run_pipeline(config, only=["teacher"]).skipped == ["teacher"]
    package.write_text(package.read_text() + "# a comment is a change of the user's model code too\n")
    assert run_pipeline(config, only=["teacher"]).ran == ["teacher"]
    assert "[teacher] rerun: config model_source.sha256" in _log(tmp_path / "runs" / "tiny")
