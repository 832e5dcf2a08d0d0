"""Hand-built ONNX classifiers for the runtime, bench, device-runner and ARM tests (no torch needed)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_classifier(conv_w: np.ndarray, conv_b: np.ndarray, fc_w: np.ndarray, fc_b: np.ndarray, size: int,
                    batch: int | str = "batch", quantize_input: bool = False) -> onnx.ModelProto:
    """Conv 3x3 (pad 1) + Relu + GlobalAveragePool + Flatten + Gemm: `input` [batch, C, size, size] ->
    `logits` [batch, classes]. conv_w is [hidden, C, 3, 3], fc_w [hidden, classes]. With `quantize_input`
    a QuantizeLinear/DequantizeLinear pair sits on the input, as the quantize stage inserts them."""
    hidden, channels = conv_w.shape[:2]
    classes = fc_w.shape[1]
    weights = [numpy_helper.from_array(np.asarray(array, np.float32), name)
               for array, name in ((conv_w, "W"), (conv_b, "B"), (fc_w, "G"), (fc_b, "GB"))]
    nodes, first = [], "input"
    if quantize_input:
        weights += [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                    numpy_helper.from_array(np.array(0, np.uint8), "z")]
        nodes += [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])]
        first = "dq"
    nodes += [helper.make_node("Conv", [first, "W", "B"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "G", "GB"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime this project pins (>= 1.18), the emulated 1.26 too
    onnx.checker.check_model(model)
    return model


def tiny_classifier(channels: int = 1, size: int = 28, hidden: int = 4, classes: int = 10, seed: int = 0,
                    batch: int | str = "batch", quantize_input: bool = False) -> onnx.ModelProto:
    """conv_classifier with standard-normal weights (seeded) and zero biases."""
    rng = np.random.default_rng(seed)
    conv_w = rng.standard_normal((hidden, channels, 3, 3))
    fc_w = rng.standard_normal((hidden, classes))
    return conv_classifier(conv_w, np.zeros(hidden), fc_w, np.zeros(classes), size, batch, quantize_input)
