"""The on-device runner: a bundle folder run as a subprocess -> device.json -> merged into report.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")  # only to build the test model

from onnx_models import tiny_classifier  # noqa: E402

from edgekd.runtime import bundle, device_report  # noqa: E402
from edgekd.runtime.errors import RuntimeInputError  # noqa: E402
from edgekd.runtime.evaluate import accuracy, agreement  # noqa: E402
from edgekd.runtime.session import XNNPACK_PROVIDER, open_session  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_runner(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # A clean environment without PYTHONPATH: the bundle must find its code by itself.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """What the pipeline writes to runs/<name>/deploy/, copied to a fresh folder outside the repo."""
    folder = tmp_path_factory.mktemp("board") / "deploy"
    folder.mkdir()
    onnx.save(tiny_classifier(), str(folder / "model.onnx"))
    rng = np.random.default_rng(3)
    np.savez(folder / "eval.npz", inputs=rng.standard_normal((30, 1, 28, 28)).astype(np.float32),
             labels=rng.integers(0, 10, 30).astype(np.int64),
             teacher_predictions=rng.integers(0, 10, 30).astype(np.int64))
    (folder / "labels.json").write_text(json.dumps([str(i) for i in range(10)]))
    bundle.install_device_runner(folder)
    return folder


@pytest.fixture(scope="module")
def device_run(bundle_dir) -> tuple[subprocess.CompletedProcess, dict]:
    proc = run_runner(bundle_dir / "run_on_device.py", "--threads", "1", "--batch", "1", "2",
                      "--iterations", "5", "--warmup", "1", "--out", "device.json", cwd=bundle_dir)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads((bundle_dir / "device.json").read_text())


def test_bundle_runner_script_is_the_packaged_script(bundle_dir):
    shipped = (REPO / "edgekd" / "runtime" / "run_on_device.py").read_bytes()
    assert (bundle_dir / "run_on_device.py").read_bytes() == shipped


def test_install_device_runner_copies_the_runtime_package(bundle_dir):
    copied = {p.name for p in (bundle_dir / "edgekd_runtime").glob("*.py")}
    shipped = {p.name for p in (REPO / "edgekd" / "runtime").glob("*.py")} - {"run_on_device.py"}
    assert copied == shipped and "device_runner.py" in copied
    assert os.access(bundle_dir / "run_on_device.py", os.X_OK)


def test_device_runner_writes_device_json_from_the_bundle_copy(bundle_dir, device_run):
    proc, device = device_run
    assert device["schema_version"] == device_report.DEVICE_SCHEMA_VERSION
    assert device["runner"]["runtime_package"] == "edgekd_runtime"  # the copy, not the repository's package
    assert device_report.validate_device_json(device) is device
    [row] = device["artifacts"]
    assert (row["name"], row["path"]) == ("model.onnx", "model.onnx")
    assert row["size_bytes"] == (bundle_dir / "model.onnx").stat().st_size

    data = np.load(bundle_dir / "eval.npz")
    logits = open_session(bundle_dir / "model.onnx").run(None, {"input": data["inputs"]})[0]
    assert row["accuracy"] == accuracy(logits, data["labels"]) and row["samples"] == 30
    assert row["agreement"] == agreement(logits, data["teacher_predictions"])

    has_xnnpack = XNNPACK_PROVIDER in device["device"]["providers"]
    providers = {"cpu", "xnnpack"} if has_xnnpack else {"cpu"}
    assert {(r["provider"], r["threads"], r["batch"]) for r in row["latency_ms"]} == \
        {(p, 1, b) for p in providers for b in (1, 2)}
    assert all(r["p50"] <= r["p90"] <= r["p99"] and r["iterations"] == 5 for r in row["latency_ms"])
    assert row["throughput_ips"] > 0 and row["peak_memory_bytes"] > row["memory"]["baseline_bytes"]
    assert row["operators"]["op_counts"]["Conv"] == 1
    assert device["runner"]["xnnpack"] is has_xnnpack
    expected = "XNNPACK EP available" if has_xnnpack else "XNNPACK EP not in this onnxruntime build"
    assert expected in proc.stdout and "wrote device.json" in proc.stdout


def test_merge_device_json_appends_one_labelled_entry_per_device(device_run):
    _, device = device_run
    report = {"schema_version": 1, "artifacts": [{"name": "int8", "path": "model.int8.onnx"}],
              "deployed": {"artifact": "int8", "path": "deploy/model.onnx", "reason": "fastest"}}
    merged = device_report.merge_device_json(report, device)
    assert "devices" not in report  # the input report is not modified
    [entry] = merged["devices"]
    assert entry["fingerprint"] == device["fingerprint"] and entry["label"] == device["label"]
    [row] = entry["artifacts"]
    assert row["device"] == device["label"] and row["artifact"] == "int8"
    assert device_report.merge_device_json(merged, device) == merged  # idempotent re-merge

    other = json.loads(json.dumps(device))
    other["device"]["cpu"], other["fingerprint"], other["label"] = "Cortex-A72", "0123456789abcdef", "Pi"
    assert [d["label"] for d in device_report.merge_device_json(merged, other)["devices"]] == [device["label"], "Pi"]


def test_load_device_json_rejects_truncated_and_foreign_files(tmp_path, device_run):
    _, device = device_run
    text = json.dumps(device)
    truncated = tmp_path / "cut.json"
    truncated.write_text(text[: len(text) // 2])
    with pytest.raises(RuntimeInputError, match=r"cut\.json: not valid JSON, truncated\?"):
        device_report.load_device_json(truncated)
    foreign = tmp_path / "report.json"
    foreign.write_text(json.dumps({"artifacts": []}))
    with pytest.raises(RuntimeInputError, match="no integer 'schema_version'"):
        device_report.load_device_json(foreign)
    broken = json.loads(text)
    del broken["artifacts"][0]["latency_ms"][0]["p90"]
    with pytest.raises(RuntimeInputError, match=r"artifacts\[0\]\.latency_ms\[0\]: missing or non-numeric \['p90'\]"):
        device_report.merge_device_json({}, broken)
    newer = {**json.loads(text), "schema_version": 99}
    with pytest.raises(RuntimeInputError, match="newer than this edgekd"):
        device_report.validate_device_json(newer)


def test_device_runner_exits_2_on_a_file_that_is_not_onnx(bundle_dir, tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"\x00not a model")
    proc = run_runner(bundle_dir / "run_on_device.py", "--model", str(bogus), "--no-data", "--no-memory",
                      cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bogus}: not an ONNX model (Protobuf parsing failed.)"
    assert not (tmp_path / "device.json").exists()


def test_repository_runner_falls_back_to_the_edgekd_package(bundle_dir, tmp_path):
    proc = run_runner(REPO / "edgekd" / "runtime" / "run_on_device.py", "--model", f"int8={bundle_dir / 'model.onnx'}",
                      "--no-data", "--no-memory", "--threads", "1", "--iterations", "3", "--warmup", "1",
                      "--out", str(tmp_path / "out" / "device.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    device = device_report.load_device_json(tmp_path / "out" / "device.json")
    assert device["runner"]["runtime_package"] == "edgekd.runtime"
    assert device["artifacts"][0]["name"] == "int8" and device["artifacts"][0]["accuracy"] is None
