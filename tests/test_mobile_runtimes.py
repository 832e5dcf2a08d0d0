"""LiteRT (.tflite via litert-torch) and ExecuTorch (.pte, XNNPACK) export targets: fp32 parity with PyTorch,
int8 with each runtime's own PT2E quantizer, the same benchmark loop and accuracy gate as ONNX, and a pipeline
run that deploys a .tflite. Each test needs its extra and skips with the reason otherwise (the base install's
side — config errors, the missing-extra message, the gate refusing a collapsed model — is tested in
test_bad_inputs.py and test_accuracy_gate.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_edgekd, write_config

HAS_LITERT = all(importlib.util.find_spec(m) is not None for m in ("litert_torch", "ai_edge_litert"))
HAS_EXECUTORCH = importlib.util.find_spec("executorch") is not None
needs_litert = pytest.mark.skipif(not HAS_LITERT, reason='needs the litert extra: pip install "edgekd[litert]"')
needs_executorch = pytest.mark.skipif(not HAS_EXECUTORCH, reason='needs the executorch extra: pip install "edgekd[executorch]"')

SIDE, CLASSES = 12, 5


def _model_and_data():
    """A small CNN with BatchNorm trained for a second on images whose class is where a bright block sits, so
    its predictions span every class: fp32 files must reproduce its logits, int8 files must stay close."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = np.arange(60) % CLASSES
    inputs = rng.normal(0, 0.3, (60, 1, SIDE, SIDE)).astype(np.float32)
    for i, label in enumerate(labels):
        inputs[i, 0, 2 * label:2 * label + 3, 2:10] += 2.0
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    x, y = torch.from_numpy(inputs), torch.from_numpy(labels)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.inference_mode():
        logits = model(x).numpy()
    assert len(np.unique(logits.argmax(1))) == CLASSES  # a real classifier, not a constant one
    return model, inputs, logits


def _check_target(exporter, tmp_path: Path, suffix: str) -> None:
    import torch

    from edgekd.gate.accuracy import int8_verdict
    from edgekd.runtime.evaluate import predict_logits
    from edgekd.runtime.timing import interleaved_benchmark
    from edgekd.stages.mobile.sessions import open_artifact

    model, inputs, expected = _model_and_data()
    example = torch.from_numpy(inputs[:1])
    fp32, int8 = tmp_path / f"m{suffix}", tmp_path / f"m.int8{suffix}"
    exporter.export_fp32(model, example, fp32)
    exporter.export_int8(model, example, inputs[::2], int8)  # calibration images
    got_fp32 = predict_logits(open_artifact(fp32), inputs)
    assert got_fp32.shape == expected.shape and np.max(np.abs(got_fp32 - expected)) < 1e-4
    got_int8 = predict_logits(open_artifact(int8), inputs)
    spread = float(expected.max() - expected.min())
    assert np.max(np.abs(got_int8 - expected)) < 0.1 * spread  # int8 logits within 10% of the logit range
    labels = expected.argmax(1)
    verdict = int8_verdict(got_int8.argmax(1), got_fp32.argmax(1), labels, 0.1, "m")
    assert verdict.accuracy >= 0.85 and not verdict.collapsed and verdict.deployable
    rows = interleaved_benchmark({"fp32": fp32, "int8": int8}, {1: inputs[:1]}, [1], warmup=2, iterations=15, chunk=5,
                                 session_factory=open_artifact)
    for name in ("fp32", "int8"):
        (row,) = rows[name]
        assert row["batch"] == 1 and row["iterations"] == 15 and 0 < row["p50"] <= row["p99"]
    assert fp32.stat().st_size > 0 and int8.stat().st_size > 0


@needs_litert
def test_tflite_fp32_matches_torch_and_int8_passes_the_gate(tmp_path: Path) -> None:
    from edgekd.runtime.tflite import TfliteSession
    from edgekd.stages.mobile import litert

    _check_target(litert, tmp_path, ".tflite")
    io = TfliteSession(tmp_path / "m.int8.tflite").io_quantization()
    assert io["input_dtype"] == "int8" and io["input"]["scale"] > 0  # full int8: the app quantizes the input
    assert io["output_dtype"] == "int8" and io["output"]["scale"] > 0
    assert TfliteSession(tmp_path / "m.tflite").io_quantization()["input"] is None  # fp32: float I/O


@needs_executorch
def test_pte_fp32_matches_torch_and_int8_passes_the_gate(tmp_path: Path) -> None:
    from edgekd.stages.mobile import executorch_export

    _check_target(executorch_export, tmp_path, ".pte")


@needs_litert
def test_a_collapsed_tflite_int8_file_is_refused(tmp_path: Path) -> None:
    """A real .tflite whose logits do not depend on the input (the failure the spike saw on mobilenet_v2)."""
    import torch
    from torch import nn

    from edgekd.gate.accuracy import int8_verdict
    from edgekd.runtime.evaluate import predict_logits
    from edgekd.stages.mobile import litert
    from edgekd.stages.mobile.sessions import open_artifact

    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([0.1, 0.9, 0.2, 0.3, 0.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1).mean(1, keepdim=True) * 0.0 + self.bias

    _, inputs, expected = _model_and_data()
    path = tmp_path / "collapsed.int8.tflite"
    litert.export_int8(Constant().eval(), torch.from_numpy(inputs[:1]), inputs[:8], path)
    predictions = predict_logits(open_artifact(path), inputs).argmax(1)
    labels = expected.argmax(1)
    verdict = int8_verdict(predictions, labels, labels, 0.5, "litert m", fallback=False)
    assert not verdict.deployable and verdict.classes_predicted == 1
    assert verdict.reason == (f"int8 collapsed: predicts class 1 for all {len(inputs)} validation images (the "
                              f"reference has {len(np.unique(labels))} classes); never deployed")


@needs_litert
@needs_executorch
def test_pipeline_exports_benchmarks_and_deploys_a_tflite(tmp_path: Path) -> None:
    config = write_config(tmp_path, {
        "distill": None, "prune": None, "teacher": {"model": "cnn_tiny", "train": {"epochs": 1, "lr": 0.01}},
        "data": {"synthetic": {"num_samples": 240, "image_size": 12}},
        "export": {"targets": ["onnx", "tflite", "pte"], "ort_format": False},
        "report": {"deploy_runtime": "tflite", "html": False},
    })
    result = run_edgekd("run", str(config), cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    report = json.loads((run_dir / "report.json").read_text())
    by_runtime = {(e["runtime"], e["kind"]): e for e in report["runtimes"]}
    assert set(by_runtime) == {(r, k) for r in ("onnxruntime", "litert", "executorch") for k in ("fp32", "int8")}
    for entry in by_runtime.values():
        assert entry["p50_ms"] > 0 and entry["size_bytes"] > 0 and 0 <= entry["accuracy"] <= 1
    # the same model on three runtimes: fp32 predictions agree exactly on the test split
    assert by_runtime[("litert", "fp32")]["accuracy"] == by_runtime[("onnxruntime", "fp32")]["accuracy"]
    assert by_runtime[("executorch", "fp32")]["accuracy"] == by_runtime[("onnxruntime", "fp32")]["accuracy"]
    deployed = report["deployed"]
    assert deployed["runtime"] == "litert" and deployed["path"] == "deploy/model.tflite"
    pre = json.loads((run_dir / "deploy" / "preprocess.json").read_text())
    assert pre["model_file"] == "model.tflite" and pre["runtime"] == "litert" and "input_quantization" in pre
    assert (run_dir / "deploy" / "model.tflite").is_file() and not (run_dir / "deploy" / "model.onnx").exists()
    assert "## Runtimes" in (run_dir / "report.md").read_text() and (run_dir / "plots" / "runtimes.png").is_file()
    onnx_rows = [c for c in report["candidates"] if c["artifact"] in ("teacher", "int8")]
    assert all(not c["eligible"] for c in onnx_rows)  # onnxruntime artifacts are compared, not deployed
