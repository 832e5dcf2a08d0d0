"""Per-operator profile (edgekd.runtime.profile) from ONNX Runtime's profiler, and `edgekd bench --profile`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")  # only to build the test models
from onnx_models import tiny_classifier  # noqa: E402

from edgekd.runtime.profile import family_table, parse_trace, profile_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from edgekd.stages.quantize import quantization as qz

    folder = tmp_path_factory.mktemp("profile")
    fp32 = folder / "tiny.onnx"
    onnx.save(tiny_classifier(hidden=8, classes=5, size=16), str(fp32))
    calib = np.random.default_rng(0).standard_normal((32, 1, 16, 16)).astype(np.float32)
    pre, int8 = folder / "pre.onnx", folder / "int8.onnx"
    qz.preprocess(fp32, pre)
    qz.quantize_model(pre, int8, qz.QuantSettings(reduce_range=True), qz.ArrayCalibrationReader(calib))
    return {"fp32": fp32, "int8": int8, "sample": calib[:1]}


def test_profile_of_a_real_model_has_its_op_types_positive_times_and_consistent_sums(models) -> None:
    profile = profile_model(models["fp32"], models["sample"], warmup=3, runs=7)
    assert profile["runs"] == 7 and profile["warmup"] == 3 and profile["batch"] == 1
    op_types = {row["op_type"] for row in profile["op_types"]}
    assert "Conv" in op_types and "Gemm" in op_types  # Conv (fused with Relu by ORT) and the head
    assert all(node["us"] > 0 for node in profile["nodes"])
    assert sum(row["us"] for row in profile["op_types"]) == pytest.approx(profile["node_us"])
    assert sum(row["share"] for row in profile["op_types"]) == pytest.approx(1.0)
    assert sum(row["nodes"] for row in profile["op_types"]) == len(profile["nodes"])
    # kernels run inside session.run: their time is a part of the run's (medians of both: a share <= 1)
    assert 0 < profile["node_us"] and 0 < profile["node_us"] / profile["run_us"] <= 1.0


def test_int8_profile_shows_the_integer_kernels_and_the_quantize_boundaries(models) -> None:
    profile = profile_model(models["int8"], models["sample"], warmup=2, runs=5)
    op_types = {row["op_type"] for row in profile["op_types"]}
    assert "QLinearConv" in op_types and "QuantizeLinear" in op_types
    fp32 = profile_model(models["fp32"], models["sample"], warmup=2, runs=5)
    table = family_table({"fp32": fp32, "int8": profile})
    conv = next(row for row in table if row["family"] == "conv")
    assert conv["fp32"] > 0 and conv["int8"] > 0
    qdq = next(row for row in table if row["family"] == "quantize/dequantize")
    assert qdq["fp32"] == 0 and qdq["int8"] > 0


def test_parse_trace_keeps_only_the_last_runs_windows() -> None:
    # 2 warm-up runs where the node takes 1000 us, then 3 timed runs of 10, 20, 30 us
    events, ts = [], 0
    for duration in (1000, 1000, 10, 20, 30):
        events.append({"cat": "Session", "name": "model_run", "ts": ts, "dur": duration + 5})
        events.append({"cat": "Node", "name": "conv_kernel_time", "ts": ts + 1, "dur": duration,
                       "args": {"op_name": "Conv", "provider": "CPUExecutionProvider"}})
        ts += duration + 100
    profile = parse_trace(events, runs=3)
    assert profile["nodes"] == [{"name": "conv", "op_type": "Conv", "provider": "CPU", "us": 20.0, "mean_us": 20.0,
                                 "order": 0}]
    assert profile["run_us"] == pytest.approx(25.0)


def test_parse_trace_with_fewer_runs_than_asked_is_an_input_error() -> None:
    from edgekd.runtime.errors import RuntimeInputError

    with pytest.raises(RuntimeInputError, match="holds 1 runs, fewer than the 2"):
        parse_trace([{"cat": "Session", "name": "model_run", "ts": 0, "dur": 5}], runs=2)


def _bench(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "edgekd", "bench", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bench_profile_prints_op_types_and_writes_them_to_json(models, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _bench(models["int8"], "--profile", "6", "--warmup", "2", "--iterations", "5", "--no-memory",
                  "--no-mobile", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "QLinearConv" in proc.stdout and "slowest nodes" in proc.stdout
    profile = json.loads(out.read_text())["profile"]
    assert profile["runs"] == 6 and profile["op_types"][0]["us"] > 0


def test_bench_profile_zero_runs_is_exit_2_one_line(models) -> None:
    proc = _bench(models["fp32"], "--profile", "0", "--no-memory", "--no-mobile")
    assert proc.returncode == 2
    assert "--profile" in proc.stderr and "Traceback" not in proc.stderr
