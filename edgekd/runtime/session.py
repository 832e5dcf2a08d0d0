"""ONNX Runtime sessions with pinned threading, provider validation and input checks."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from .errors import RuntimeInputError
from .proto import ProtoError, read_model_summary

CPU_PROVIDER = "CPUExecutionProvider"
XNNPACK_PROVIDER = "XnnpackExecutionProvider"

# Short names accepted on the command line; full ORT names are accepted too (case-insensitive).
PROVIDER_ALIASES = {
    "cpu": CPU_PROVIDER,
    "xnnpack": XNNPACK_PROVIDER,
    "coreml": "CoreMLExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

_ORT_TYPE_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class InputSpec:
    """One model input. `shape` has None for every dynamic dim; `dims` keeps the symbolic names."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype | None  # None for a type numpy cannot hold (e.g. a sequence)
    dims: tuple[int | str | None, ...]

    @property
    def has_dynamic_batch(self) -> bool:
        return bool(self.shape) and self.shape[0] is None

    def describe(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dims": list(self.dims),
                "dtype": None if self.dtype is None else self.dtype.name}


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    """Map aliases to ORT names, check each is available here, and keep the CPU EP last as fallback.

    Why the fallback: partial EPs (XNNPACK, NNAPI, CoreML) hand the nodes they cannot run to the CPU EP;
    without it in the list a session with one unsupported node would fail to load.
    """
    available = ort.get_available_providers()
    if not providers:
        return [CPU_PROVIDER]
    by_lower = {name.lower(): name for name in available}
    resolved: list[str] = []
    for requested in providers:
        name = PROVIDER_ALIASES.get(requested.lower(), requested)
        actual = by_lower.get(name.lower())
        if actual is None:
            raise RuntimeInputError(
                f"execution provider {requested!r} is not available in this onnxruntime "
                f"{ort.__version__}; available: {', '.join(available)}")
        if actual not in resolved:
            resolved.append(actual)
    if CPU_PROVIDER in available and CPU_PROVIDER not in resolved:
        resolved.append(CPU_PROVIDER)
    return resolved


def _check_external_data(path: Path) -> None:
    """External weights may only live beside (or below) the model: a path escaping the folder is refused."""
    try:
        locations = read_model_summary(path).external_data
    except (ProtoError, OSError, ValueError):
        return  # not parseable here: onnxruntime gives the authoritative error just after
    model_dir = path.parent.resolve()
    for location in locations:
        target = (model_dir / location).resolve()
        if os.path.isabs(location) or model_dir not in (target, *target.parents):
            raise RuntimeInputError(
                f"{path}: external data {location!r} is outside the model's folder; "
                "only weights stored beside the model file are loaded")
        if not target.is_file():
            raise RuntimeInputError(f"{path}: external data file {location!r} is missing beside the model")


def open_session(model_path: str | os.PathLike, threads: int = 1,
                 providers: Sequence[str] | None = None, stop_spinning_after_run: bool = False,
                 profile_prefix: str | None = None) -> ort.InferenceSession:
    """Open `model_path` with explicit threading; `session.get_providers()` tells which EPs really ran.

    A `.tflite` file opens a LiteRT interpreter behind the same API (`runtime.tflite`; providers do not apply).

    Threads are always set: ORT otherwise sizes its pool from the host's cores, not the container quota.
    With XNNPACK the work runs on XNNPACK's own pool, so (as ORT's docs recommend) its pool gets the
    threads, the ORT intra-op pool gets 1 and spinning is off, to avoid two pools fighting for cores.
    `stop_spinning_after_run` parks the intra-op workers when a run ends (they still spin inside it): for
    several multi-threaded sessions used in turn, whose idle workers would otherwise spin for ~60 ms after
    each run and take the cores from the next session.
    """
    path = Path(model_path)
    if path.suffix.lower() == ".tflite":  # LiteRT: same session API, ai-edge-litert instead of onnxruntime
        from .tflite import TfliteSession

        return TfliteSession(path, threads)  # type: ignore[return-value]
    if not path.is_file():
        raise RuntimeInputError(f"{path}: not an ONNX model (file not found)")
    if threads < 1:
        raise RuntimeInputError(f"threads must be >= 1, got {threads}")
    resolved = resolve_providers(providers)
    if path.suffix.lower() != ".ort":
        _check_external_data(path)

    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: warnings would interleave with benchmark output
    provider_entries: list[Any] = []
    for name in resolved:
        if name == XNNPACK_PROVIDER:
            provider_entries.append((name, {"intra_op_num_threads": str(threads)}))
        else:
            provider_entries.append(name)
    if XNNPACK_PROVIDER in resolved:
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:
        options.intra_op_num_threads = threads
    if stop_spinning_after_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix

    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=provider_entries)
    except Exception as exc:  # ORT raises pybind classes (InvalidProtobuf, Fail, ...) without a common base
        first_line = _short_ort_error(exc)
        if "protobuf" in first_line.lower() or type(exc).__name__ == "InvalidProtobuf":
            raise RuntimeInputError(f"{path}: not an ONNX model ({first_line})") from None
        raise RuntimeInputError(f"{path}: onnxruntime could not load the model ({first_line})") from None


def _short_ort_error(exc: Exception) -> str:
    """'[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from X failed:Protobuf parsing failed.' -> the cause."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    line = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", line)
    return re.sub(r"^Load model from .* failed:\s*", "", line) or type(exc).__name__


def _dtype_of(ort_type: str) -> np.dtype | None:
    numpy_type = _ORT_TYPE_TO_NUMPY.get(ort_type)
    return None if numpy_type is None else np.dtype(numpy_type)


def input_spec(session: ort.InferenceSession) -> list[InputSpec]:
    """Name, shape (dynamic dims as None), dtype of each model input, in the model's order."""
    specs = []
    for arg in session.get_inputs():
        dims = tuple(arg.shape) if arg.shape is not None else ()
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in dims)
        specs.append(InputSpec(arg.name, shape, _dtype_of(arg.type), dims))
    return specs


def as_feed(session: ort.InferenceSession, inputs: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A single array goes to the model's only input; a mapping is passed through by name."""
    if isinstance(inputs, Mapping):
        return dict(inputs)
    specs = input_spec(session)
    if len(specs) != 1:
        names = ", ".join(spec.name for spec in specs)
        raise RuntimeInputError(f"the model has {len(specs)} inputs ({names}); pass a dict name -> array")
    return {specs[0].name: inputs}


def check_input(session: ort.InferenceSession, inputs: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Raise RuntimeInputError unless `inputs` fit the model's inputs (names, rank, fixed dims, dtype)."""
    feed = as_feed(session, inputs)
    specs = {spec.name: spec for spec in input_spec(session)}
    missing = sorted(set(specs) - set(feed))
    unknown = sorted(set(feed) - set(specs))
    if missing or unknown:
        raise RuntimeInputError(f"inputs do not match the model: missing {missing}, unknown {unknown}")
    for name, array in feed.items():
        spec = specs[name]
        array = np.asarray(array)
        if len(array.shape) != len(spec.shape) or any(
                want is not None and want != got for want, got in zip(spec.shape, array.shape)):
            raise RuntimeInputError(f"input shape {tuple(array.shape)} does not match the model's input "
                                    f"{name!r} {spec.describe()}")
        if spec.dtype is not None and array.dtype != spec.dtype:
            raise RuntimeInputError(f"input dtype {array.dtype} does not match the model's input "
                                    f"{name!r} ({spec.dtype})")
    return feed


def supports_batch(spec: InputSpec, batch: int) -> bool:
    """True when the input's leading dim is dynamic or fixed to `batch`."""
    return bool(spec.shape) and (spec.shape[0] is None or spec.shape[0] == batch)


def random_inputs(session: ort.InferenceSession, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the model's shape with leading dim `batch` (for latency runs without data)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in input_spec(session):
        if spec.dtype is None:
            raise RuntimeInputError(f"input {spec.name!r} has a non-tensor type; pass real data")
        if not supports_batch(spec, batch):
            raise RuntimeInputError(f"the model's input {spec.name!r} {spec.describe()} has a fixed batch; "
                                    f"batch {batch} cannot run")
        if any(d is None for d in spec.shape[1:]):
            raise RuntimeInputError(f"the model's input {spec.name!r} {spec.describe()} has dynamic dims "
                                    "besides the batch; pass data with real shapes")
        shape = (batch, *spec.shape[1:])
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feed[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feed[spec.name] = rng.integers(0, 10, shape).astype(spec.dtype)
    return feed
