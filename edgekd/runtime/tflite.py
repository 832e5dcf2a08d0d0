"""LiteRT (TensorFlow Lite) `.tflite` models behind the part of ONNX Runtime's session API edgekd uses
(`get_inputs`, `run`, `get_providers`), so timing, accuracy and `edgekd bench` treat them like ONNX files.

Needs only `ai-edge-litert` (+ numpy): no torch, no TensorFlow (`pip install "edgekd[litert]"`, or just
`pip install ai-edge-litert` on a device). A full-int8 model takes and returns int8 tensors: the session
quantizes the float input and dequantizes the output with the tensors' own (scale, zero_point), exactly what
an app does, so callers always feed normalized float32 and get float logits back.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np

from .errors import RuntimeInputError

TFLITE_SUFFIX = ".tflite"
PROVIDER = "LiteRT-XNNPACK"  # the interpreter's default CPU delegate
MISSING = ('.tflite models need ai-edge-litert, which is not installed: pip install "edgekd[litert]" '
           "(or pip install ai-edge-litert)")


def is_tflite(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == TFLITE_SUFFIX


def litert_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ai_edge_litert") is not None


def quantize_input(values: np.ndarray, scale: float, zero_point: int, dtype: np.dtype) -> np.ndarray:
    """float -> int8/uint8 with the tensor's parameters: round(x / scale) + zero_point, saturated."""
    info = np.iinfo(dtype)
    return np.clip(np.round(values / scale) + zero_point, info.min, info.max).astype(dtype)


def dequantize_output(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """int8/uint8 -> float32: (q - zero_point) * scale."""
    return ((values.astype(np.int32) - zero_point) * scale).astype(np.float32)


def _quantization(detail: Mapping[str, Any]) -> dict[str, Any] | None:
    """(scale, zero_point) of a per-tensor quantized I/O tensor; None for a float tensor."""
    scale, zero_point = detail.get("quantization") or (0.0, 0)
    if not scale or np.dtype(detail["dtype"]).kind == "f":
        return None
    return {"scale": float(scale), "zero_point": int(zero_point), "dtype": np.dtype(detail["dtype"]).name}


class TfliteSession:
    """One LiteRT interpreter; input shape as exported (batch fixed, usually 1: predict_logits and the
    benchmark then run batch 1, which is how an app calls it)."""

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        path = Path(path)
        if not path.is_file():
            raise RuntimeInputError(f"{path}: not a .tflite model (file not found)")
        if threads < 1:
            raise RuntimeInputError(f"threads must be >= 1, got {threads}")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise RuntimeInputError(MISSING) from None
        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RuntimeInputError(f"{path}: LiteRT could not load the model ({first})") from None
        self.path, self.threads = path, threads
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) < 1:
            raise RuntimeInputError(f"{path}: expected one input and at least one output, the model has "
                                    f"{len(inputs)} input(s) and {len(outputs)} output(s)")
        self._input, self._output = inputs[0], outputs[0]
        self.input_quantization = _quantization(self._input)
        self.output_quantization = _quantization(self._output)

    def get_inputs(self) -> list[Any]:
        # What the caller feeds: float32 always (an int8 input is quantized here, as the app would).
        return [SimpleNamespace(name="input", shape=[int(d) for d in self._input["shape"]], type="tensor(float)")]

    def get_outputs(self) -> list[Any]:
        return [SimpleNamespace(name="logits", shape=[int(d) for d in self._output["shape"]], type="tensor(float)")]

    def get_providers(self) -> list[str]:
        return [PROVIDER]

    def io_quantization(self) -> dict[str, Any]:
        """The parameters an app needs for a full-int8 model (None entries: float I/O)."""
        return {"input": self.input_quantization, "output": self.output_quantization,
                "input_shape": [int(d) for d in self._input["shape"]],
                "input_dtype": np.dtype(self._input["dtype"]).name,
                "output_dtype": np.dtype(self._output["dtype"]).name}

    def run(self, output_names: Any, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        values = np.asarray(next(iter(feed.values())), dtype=np.float32)
        q = self.input_quantization
        if q is not None:
            values = quantize_input(values, q["scale"], q["zero_point"], np.dtype(q["dtype"]))
        self.interpreter.set_tensor(self._input["index"], values)
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self._output["index"])
        q = self.output_quantization
        return [dequantize_output(out, q["scale"], q["zero_point"]) if q is not None else np.array(out, np.float32)]


def read_io_quantization(path: str | os.PathLike) -> dict[str, Any]:
    """Input/output quantization parameters and shapes of a .tflite file (for the deploy bundle)."""
    return TfliteSession(path).io_quantization()
