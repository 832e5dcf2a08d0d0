"""The accuracy gate every quantized artifact passes, whatever runtime made it (edgekd.gate.accuracy), and the
report refusing what it flags. Base install only (numpy, onnx, onnxruntime): the collapsed model is a real
ONNX graph whose logits do not depend on the input, run by ONNX Runtime like any artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekd.gate.accuracy import collapse_reason, int8_verdict
from edgekd.report.choice import choose_artifact, not_deployable
from edgekd.runtime.evaluate import EvalData
from edgekd.runtime.tflite import dequantize_output, quantize_input
from edgekd.stages.benchmark.measure import Artifact, evaluate_artifacts

CLASSES, SIDE = 4, 4


def _linear_classifier(path: Path, weight: np.ndarray, bias: np.ndarray) -> Path:
    """input (N, 1, SIDE, SIDE) -> Flatten -> Gemm -> logits (N, CLASSES): with weight 0 the logits are the
    bias for every input, i.e. a model that collapsed to argmax(bias)."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1)],
        "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, SIDE, SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(weight.astype(np.float32), "W"), numpy_helper.from_array(bias.astype(np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _data() -> tuple[EvalData, np.ndarray]:
    """Images whose class is the quadrant of their brightest pixel; the matching weights classify them."""
    rng = np.random.default_rng(0)
    labels = np.arange(64) % CLASSES
    images = rng.normal(0, 0.1, (64, 1, SIDE, SIDE)).astype(np.float32)
    weight = np.zeros((CLASSES, SIDE * SIDE), np.float32)
    for c in range(CLASSES):
        weight[c, c * 4:(c + 1) * 4] = 1.0
    for i, label in enumerate(labels):
        images[i, 0].reshape(-1)[label * 4:(label + 1) * 4] += 1.0
    return EvalData(images, labels.astype(np.int64), labels.astype(np.int64)), weight


def test_a_collapsed_int8_artifact_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    data, weight = _data()
    good = _linear_classifier(tmp_path / "pruned.onnx", weight, np.zeros(CLASSES))
    constant = _linear_classifier(tmp_path / "model.int8.onnx", np.zeros_like(weight), np.array([0.1, 0.2, 0.9, 0.3]))
    artifacts = [Artifact("pruned", "fp32", good.name, good, None, None),
                 Artifact("int8", "int8", constant.name, constant, None, None)]
    evaluation = evaluate_artifacts(artifacts, data, threads=1, providers=None)
    assert evaluation["pruned"]["accuracy"] == 1.0 and evaluation["pruned"]["classes_predicted"] == CLASSES
    assert evaluation["pruned"]["collapsed"] is None
    assert evaluation["int8"]["classes_predicted"] == 1
    assert evaluation["int8"]["accuracy"] == 0.25  # a quarter of the images are class 2: plausible, not chance-flagged
    assert evaluation["int8"]["collapsed"] == "collapsed: predicts class 2 for all 64 test images (the reference has 4 classes)"

    rows = [{"name": name, "kind": a.kind, "runtime": "onnxruntime", "path": a.file, "size_bytes": 1000,
             "latency_ms": [{"threads": 1, "batch": 1, "p50": 1.0 if name == "pruned" else 0.2}], **evaluation[name]}
            for name, a in zip(("pruned", "int8"), artifacts)]
    blocked = not_deployable({}, rows, CLASSES)
    assert blocked == {"int8": "collapsed: predicts class 2 for all 64 test images (the reference has 4 classes); never deployed"}
    choice, candidates = choose_artifact(rows, {"latency_threads": 1, "latency_batch": 1}, blocked)
    assert choice["artifact"] == "pruned"  # the collapsed int8 is 5x faster and still never deployed
    refused = next(c for c in candidates if c["artifact"] == "int8")
    assert not refused["eligible"] and refused["excluded_reason"].startswith("not deployable: collapsed: predicts class 2")


def test_int8_verdict_refuses_a_collapse_even_without_fallback_and_a_drop_beyond_the_limit() -> None:
    labels = np.array([0, 1, 2, 3] * 5)
    fp32 = labels.copy()
    collapsed = int8_verdict(np.full(20, 1), fp32, labels, 0.5, "litert pruned", fallback=False)
    assert (collapsed.collapsed, collapsed.deployable, collapsed.classes_predicted) == (True, False, 1)
    assert collapsed.reason == ("int8 collapsed: predicts class 1 for all 20 validation images (the reference has 4 "
                                "classes); never deployed")
    worse = labels.copy()
    worse[:3] = (worse[:3] + 1) % 4  # 3 of 20 wrong: drop 0.15
    dropped = int8_verdict(worse, fp32, labels, 0.1, "executorch pruned")
    assert not dropped.deployable and abs(dropped.accuracy_drop - 0.15) < 1e-9
    assert dropped.reason.startswith("int8 validation accuracy drops 0.1500 vs executorch pruned fp32 (limit "
                                     "quantize.max_accuracy_drop 0.1)")
    kept = int8_verdict(worse, fp32, labels, 0.1, "executorch pruned", fallback=False)
    assert kept.deployable and kept.reason is None
    assert int8_verdict(fp32, fp32, labels, 0.0, "x").deployable
    assert collapse_reason(np.zeros(5), np.zeros(5)) is None  # one class in the data too: nothing collapsed


def test_tflite_int8_io_quantization_round_trips_within_half_a_step() -> None:
    values = np.linspace(-1.9, 1.9, 101, dtype=np.float32)  # inside [(-128 - zp), (127 - zp)] * scale
    scale, zero_point = 4.0 / 255, -3
    q = quantize_input(values, scale, zero_point, np.dtype(np.int8))
    assert q.dtype == np.int8 and q.min() >= -128 and q.max() <= 127
    back = dequantize_output(q, scale, zero_point)
    assert back.dtype == np.float32 and np.max(np.abs(back - values)) <= scale / 2 + 1e-6
    assert quantize_input(np.array([100.0]), scale, zero_point, np.dtype(np.int8))[0] == 127  # saturates
