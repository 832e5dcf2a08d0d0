"""`edgekd bench MODEL.onnx`: the table, the JSON, exit code 2 on bad input, and never importing torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")  # only to build the test model
from onnx_models import tiny_classifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# `-X importtime` lists every module the process imported ("import time: self | cumulative | name").
IMPORTED_TORCH = re.compile(r"^import time:.*\|\s+torch(\.|\s*$)", re.MULTILINE)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(1)
    paths = {"model": folder / "tiny.onnx", "data": folder / "eval.npz", "bad_data": folder / "rgb.npz",
             "not_onnx": folder / "notes.onnx"}
    onnx.save(tiny_classifier(hidden=2, classes=3, size=8), str(paths["model"]))
    labels = rng.integers(0, 3, 12).astype(np.int64)
    np.savez(paths["data"], inputs=rng.standard_normal((12, 1, 8, 8)).astype(np.float32), labels=labels,
             teacher_predictions=labels)
    np.savez(paths["bad_data"], inputs=rng.standard_normal((12, 3, 8, 8)).astype(np.float32), labels=labels)
    paths["not_onnx"].write_text("this is not a protobuf\n")
    return paths


def bench(*args: str | Path) -> subprocess.CompletedProcess:
    """`python -X importtime -m edgekd bench ...`; fails the test if the command imported torch."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "edgekd", "bench", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert not IMPORTED_TORCH.search(proc.stderr), "edgekd bench imported torch"
    proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    return proc


def test_bench_prints_table_and_writes_json_rows_for_every_threads_and_batch(files, tmp_path):
    out = tmp_path / "result.json"
    proc = bench(files["model"], "--data", files["data"], "--threads", 1, "--threads", 2, "--batch", 1,
                 "--batch", 3, "--warmup", 1, "--iterations", 5, "--no-memory", "--no-mobile", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "p50 ms" in proc.stdout and "p99 ms" in proc.stdout
    table_rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"^\s+[12]\s+[13]\s+\d", line)]
    assert sorted((int(r[0]), int(r[1])) for r in table_rows) == [(1, 1), (1, 3), (2, 1), (2, 3)]
    result = json.loads(out.read_text())
    assert sorted((r["threads"], r["batch"]) for r in result["rows"]) == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for row in result["rows"]:
        assert 0 < row["min"] <= row["p50"] <= row["p90"] <= row["p99"] <= row["max"]
        assert row["iterations"] == 5 and row["providers"][-1] == "CPUExecutionProvider"
    assert 0.0 <= result["accuracy"] <= 1.0 and result["agreement"] == result["accuracy"]
    assert result["accuracy_samples"] == 12 and result["mobile"] is None and result["peak_memory_bytes"] is None
    assert not list(tmp_path.glob(".tmp-*")), "the JSON is written through a temp file and renamed"


def test_bench_exits_2_on_a_file_that_is_not_onnx(files):
    proc = bench(files["not_onnx"], "--no-memory", "--no-mobile")
    assert proc.returncode == 2
    assert "notes.onnx: not an ONNX model" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_exits_2_when_data_shape_does_not_match_the_model(files):
    proc = bench(files["model"], "--data", files["bad_data"], "--no-memory", "--no-mobile", "--iterations", 5)
    assert proc.returncode == 2
    assert "input shape (1, 3, 8, 8) does not match the model's input 'input' [batch, 1, 8, 8]" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_bench_exits_2_on_an_unknown_provider_naming_the_available_ones(files):
    proc = bench(files["model"], "--providers", "cpu,warpdrive", "--no-memory", "--no-mobile")
    assert proc.returncode == 2
    assert "execution provider 'warpdrive' is not available" in proc.stderr
    assert "CPUExecutionProvider" in proc.stderr and "Traceback" not in proc.stderr
