"""int8 post-training quantization with onnxruntime.quantization: settings, CPU-aware defaults,
calibration data, exclusion checks, and one quantize-and-measure attempt. No torch.

The search over settings (which attempt wins) lives in `edgekd.stages.quantize`; everything here works on
files and numpy arrays and is tested directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgekd.errors import InputError, StageFailed

log = logging.getLogger("edgekd")

_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}  # not Distribution: meant for float8, wrecks int8
_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger",
                 "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearGlobalAveragePool")
_WEIGHTED_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
_CALIB_BATCH = 32
_HISTOGRAM_WARN_BYTES = 2 << 30
BIAS_CORRECTION_SAMPLES = 128  # calibration images used to measure each layer's mean output error


@dataclass(frozen=True)
class QuantSettings:
    """One quantization recipe; every behaviour-changing option of quantize_static/dynamic is explicit."""

    mode: str = "static"  # static | dynamic
    format: str = "qdq"  # qdq | qoperator (static only)
    per_channel: bool = True
    reduce_range: bool = False
    activation_type: str = "uint8"  # static only; dynamic picks uint8 at run time
    weight_type: str = "int8"
    method: str = "minmax"
    percentile: float = 99.999
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    # Per-layer weight range: (node name, reduce_range) pairs overriding `reduce_range` for that node's weight
    # (the mixed-precision search keeps 8-bit weights where they measurably lower the error).
    weight_range_overrides: tuple[tuple[str, bool], ...] = ()
    bias_correction: bool = False  # fast bias correction after quantizing (static QDQ only): see bias_correct
    label: str = "configured"  # why this attempt exists; not part of the recipe

    def key(self) -> tuple:
        return tuple((k, v) for k, v in asdict(self).items() if k != "label")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["exclude_nodes"], data["exclude_op_types"] = list(self.exclude_nodes), list(self.exclude_op_types)
        data["weight_range_overrides"] = {node: reduce for node, reduce in self.weight_range_overrides}
        if not self.weight_range_overrides:
            data.pop("weight_range_overrides")
        if self.mode == "dynamic":
            for key in ("format", "activation_type", "method", "percentile"):
                data.pop(key)
        elif self.method != "percentile":
            data.pop("percentile")
        if self.mode == "dynamic" or self.format != "qdq":
            data.pop("bias_correction")
        return data

    def check(self) -> None:
        if self.mode == "static" and self.activation_type == "int8" and self.weight_type == "uint8":
            raise InputError("quantize.weight_type: uint8 weights need uint8 activations (onnxruntime does not "
                             "support int8 activations with uint8 weights); set quantize.activation_type: uint8")


# --------------------------------------------------------------------------------------------------
# CPU-aware defaults


def cpu_features() -> dict[str, Any]:
    """{'arch', 'flags'} of this machine (edgekd.runtime.cpu.cpu_info; never raises)."""
    try:
        from edgekd.runtime.cpu import cpu_info

        info = cpu_info()
        return {"cpu": info.get("cpu"), "arch": info.get("arch"), "flags": info.get("flags") or {}}
    except Exception:  # noqa: BLE001 - unknown CPU: the caller takes the saturation-safe choice
        return {"cpu": None, "arch": None, "flags": {}}


def choose_for_cpu(activation_type: str, reduce_range: bool | str, weight_type: str,
                   cpu: dict[str, Any]) -> tuple[str, bool, str]:
    """Resolve 'auto' activation type / reduce_range from CPU flags: (activation_type, reduce_range, why).

    x86 without VNNI multiplies u8 x s8 with VPMADDUBSW, whose 16-bit intermediate can saturate; ORT's
    remedy is 7-bit weights (reduce_range) or u8 x u8. VNNI (and ARM's dot-product) accumulate in 32 bits.
    """
    flags = cpu.get("flags") or {}
    arch = (cpu.get("arch") or "").lower()
    vnni = any(flags.get(k) for k in ("avx512_vnni", "avx_vnni", "amx"))
    if arch in ("aarch64", "arm64") or arch.startswith("arm"):
        auto_act, auto_rr, why = "int8", False, "ARM: symmetric int8 activations, no saturation (ORT guidance)"
    elif vnni:
        auto_act, auto_rr, why = "uint8", False, "x86 with VNNI: u8 x s8 without saturation"
    elif flags.get("avx2") or flags.get("avx512f"):
        auto_act, auto_rr, why = "uint8", True, "x86 without VNNI: u8 x s8 can saturate, so 7-bit weights"
    else:
        auto_act, auto_rr, why = "uint8", True, "CPU features unknown: the saturation-safe choice"
    act = auto_act if activation_type == "auto" else activation_type
    if weight_type == "uint8" and activation_type == "auto":
        act = "uint8"  # ORT has no int8-activation x uint8-weight kernels
    rr = auto_rr if reduce_range == "auto" else bool(reduce_range)
    return act, rr, why


# --------------------------------------------------------------------------------------------------
# Calibration data


def calibration_indices(n_train: int, samples: int, seed: int) -> np.ndarray:
    """A deterministic (seeded) sample of training indices, sorted; all of them when samples >= n_train."""
    if n_train <= 0:
        raise InputError("calibration: the training split is empty")
    order = np.random.default_rng(seed + 7919).permutation(n_train)  # own stream: not the split's
    return np.sort(order[:min(samples, n_train)])


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds calibration arrays in batches. One reader serves one quantize call: ORT drains it, and a
    drained reader silently yields nothing, so callers create a fresh one each time (`fresh()`)."""

    def __init__(self, inputs: np.ndarray, input_name: str = "input", batch_size: int = _CALIB_BATCH) -> None:
        if len(inputs) == 0:
            raise InputError("calibration: no calibration samples (quantize.calibration.samples and the "
                             "training split must be non-empty)")
        self.inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        self.input_name, self.batch_size = input_name, max(1, int(batch_size))
        self.position = 0
        self.samples_yielded = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.inputs):
            return None
        batch = self.inputs[self.position:self.position + self.batch_size]
        self.position += len(batch)
        self.samples_yielded += len(batch)
        return {self.input_name: batch}

    def __len__(self) -> int:
        return math.ceil(len(self.inputs) / self.batch_size)

    def fresh(self) -> ArrayCalibrationReader:
        return ArrayCalibrationReader(self.inputs, self.input_name, self.batch_size)


# --------------------------------------------------------------------------------------------------
# Graph preparation and inspection


def preprocess(source: str | Path, target: str | Path) -> str:
    """ORT's quant_pre_process (shape inference + graph optimization); returns which variant ran.

    Symbolic shape inference fails on some graphs; then ONNX shape inference alone is used.
    """
    try:
        quant_pre_process(str(source), str(target), skip_symbolic_shape=False)
        return "full"
    except Exception as exc:  # noqa: BLE001 - retry without the fragile step, then give up clearly
        log.info("  quant_pre_process with symbolic shapes failed (%s); retrying without", str(exc)[:200])
    try:
        quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
        return "onnx_shape_only"
    except Exception as exc:
        raise StageFailed(f"quantization pre-processing of {Path(source).name} failed: {exc}") from exc


def graph_nodes(path: str | Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path), load_external_data=False).graph.node)


def op_counts(path: str | Path) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in graph_nodes(path)).items()))


def quantized_node_count(counts: dict[str, int]) -> int:
    return sum(n for op, n in counts.items() if op in QUANTIZED_OPS)


def validate_exclusions(path: str | Path, nodes: Sequence[str], op_types: Sequence[str]) -> None:
    """InputError for names not in the pre-processed graph (onnxruntime would silently ignore them)."""
    graph = graph_nodes(path)
    names = [n.name for n in graph]
    unknown = [n for n in nodes if n not in set(names)]
    if unknown:
        weighted = [n.name for n in graph if n.op_type in _WEIGHTED_OPS] or names
        raise InputError(f"quantize.exclude_nodes: no node named {', '.join(map(repr, unknown))} in the graph "
                         f"being quantized (names depend on the exporter); valid names include: "
                         f"{', '.join(weighted[:6])}")
    present = sorted({n.op_type for n in graph})
    missing = [t for t in op_types if t not in present]
    if missing:
        raise InputError(f"quantize.exclude_op_types: {', '.join(map(repr, missing))} not in the graph; "
                         f"its operator types: {', '.join(present)}")


def edge_layers(path: str | Path) -> tuple[str, ...]:
    """Names of the first and last weighted layers (often the most quantization-sensitive)."""
    weighted = [n.name for n in graph_nodes(path) if n.op_type in _WEIGHTED_OPS and n.name]
    return tuple(dict.fromkeys([weighted[0], weighted[-1]])) if weighted else ()


def activation_bytes_per_sample(path: str | Path) -> int:
    """Rough float bytes of all intermediate activations for one sample (from the shape-inferred graph)."""
    total = 0
    for info in onnx.load(str(path), load_external_data=False).graph.value_info:
        dims = info.type.tensor_type.shape.dim
        sizes = [d.dim_value for d in dims[1:]] if dims else []
        if sizes and all(s > 0 for s in sizes):
            total += 4 * int(np.prod(sizes))
    return total


# --------------------------------------------------------------------------------------------------
# Quantizing


@dataclass
class CalibrationCache:
    """Calibration ranges computed once per (method, op types) and reused across attempts (ORT >= 1.23
    accepts calibration_cache_path); without that support every attempt recalibrates."""

    folder: Path
    supported: bool = field(default_factory=lambda: "calibration_cache_path" in
                            inspect.signature(quantize_static).parameters)

    def path_for(self, settings: QuantSettings) -> Path | None:
        if not self.supported:
            return None
        key = f"{settings.method}-{settings.percentile}-{','.join(sorted(settings.exclude_op_types))}"
        return self.folder / f"calibration-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def _op_types(path: Path, exclude: Sequence[str], dynamic: bool) -> list[str] | None:
    if not exclude:
        return None  # onnxruntime's default: everything it can quantize
    from onnxruntime.quantization.registry import (
        IntegerOpsRegistry,
        QDQRegistry,
        QLinearOpsRegistry,
    )

    known = set(IntegerOpsRegistry) if dynamic else set(QLinearOpsRegistry) | set(QDQRegistry)
    present = {n.op_type for n in graph_nodes(path)}
    return sorted((known & present) - set(exclude))


def _weight_channel_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a node's weight, as onnxruntime quantizes it per channel."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return {"ConvTranspose": 1, "MatMul": 1}.get(node.op_type, 0)


def quantize_model(pre: str | Path, target: str | Path, settings: QuantSettings,
                   reader: ArrayCalibrationReader | None, cache: CalibrationCache | None = None) -> dict[str, Any]:
    """Quantize the pre-processed model to `target`; returns the exact options passed (for the manifest)."""
    settings.check()
    pre, target = Path(pre), Path(target)
    op_types = _op_types(pre, settings.exclude_op_types, settings.mode == "dynamic")
    if settings.mode == "dynamic":
        options = {"per_channel": settings.per_channel, "reduce_range": settings.reduce_range,
                   "weight_type": settings.weight_type, "extra_options": {"WeightSymmetric": True}}
        quantize_dynamic(pre, target, op_types_to_quantize=op_types, nodes_to_exclude=list(settings.exclude_nodes),
                         per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                         weight_type=_TYPES[settings.weight_type], extra_options=options["extra_options"])
        return options
    if reader is None:
        raise InputError("static quantization needs calibration data")
    extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": False}
    # Not CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMax calibrator discards (not merges) the
    # batches it flushes, failing with "No data is collected" at multiples of it. MinMax keeps only
    # per-batch min/max values anyway, so its memory stays small without it.
    if settings.method == "percentile":
        extra["CalibPercentile"] = settings.percentile
    if settings.weight_range_overrides:
        nodes = {n.name: n for n in graph_nodes(pre) if len(n.input) > 1}
        overrides: dict[str, list[dict[str, Any]]] = {}
        for name, reduce in settings.weight_range_overrides:
            if name in nodes:
                override: dict[str, Any] = {"reduce_range": reduce}
                if settings.per_channel:  # the QOperator quantizer wants the channel axis of a per-channel override
                    override["axis"] = _weight_channel_axis(nodes[name])
                overrides[nodes[name].input[1]] = [override]
        extra["TensorQuantOverrides"] = overrides
    kwargs: dict[str, Any] = {}
    cache_path = cache.path_for(settings) if cache else None
    if cache_path is not None:
        kwargs["calibration_cache_path"] = cache_path
    with contextlib.redirect_stdout(io.StringIO()):  # histogram calibrators print progress lines
        quantize_static(
            pre, target, calibration_data_reader=reader.fresh(), quant_format=_FORMATS[settings.format],
            op_types_to_quantize=op_types, per_channel=settings.per_channel, reduce_range=settings.reduce_range,
            activation_type=_TYPES[settings.activation_type], weight_type=_TYPES[settings.weight_type],
            nodes_to_exclude=list(settings.exclude_nodes), calibrate_method=_METHODS[settings.method],
            calibration_providers=["CPUExecutionProvider"], extra_options=extra, **kwargs)
    corrected = None
    if settings.bias_correction and settings.format == "qdq":
        sample = reader.inputs[:BIAS_CORRECTION_SAMPLES]
        uncorrected = target.with_name(target.stem + ".uncorrected.onnx")
        target.replace(uncorrected)
        corrected = bias_correct(pre, uncorrected, target, sample)
        uncorrected.unlink()
    return {"quant_format": settings.format, "per_channel": settings.per_channel,
            "bias_correction": None if corrected is None else {"samples": min(len(reader.inputs),
                                                                              BIAS_CORRECTION_SAMPLES),
                                                               "mean_abs_shift": corrected},
            "reduce_range": settings.reduce_range, "activation_type": settings.activation_type,
            "weight_type": settings.weight_type, "calibrate_method": settings.method, "extra_options": extra}


# --------------------------------------------------------------------------------------------------
# Measuring an attempt


def predictions(path: str | Path, inputs: np.ndarray) -> np.ndarray:
    """Top-1 classes from ONNX Runtime (1 thread)."""
    from edgekd.runtime.evaluate import predict_logits
    from edgekd.runtime.session import open_session

    return predict_logits(open_session(path, threads=1), inputs, batch_size=256).argmax(axis=-1)


def time_pair(fp32: str | Path, int8: str | Path, sample: np.ndarray, iterations: int = 100) -> dict[str, float]:
    """p50 latency (ms) of both models, interleaved in chunks, batch 1, 1 thread: same noise for both."""
    from edgekd.runtime.timing import interleaved_benchmark

    rows = interleaved_benchmark({"fp32": str(fp32), "int8": str(int8)}, {1: sample[:1]}, [1],
                                 warmup=10, iterations=iterations, chunk=10)
    p50_fp32, p50_int8 = rows["fp32"][0]["p50"], rows["int8"][0]["p50"]
    return {"p50_ms_fp32": p50_fp32, "p50_ms": p50_int8,
            "speedup": p50_fp32 / max(p50_int8, 1e-9)}  # finite: the manifest is strict JSON


def evaluate_attempt(fp32: Path, int8: Path, inputs: np.ndarray, labels: np.ndarray,
                     fp32_predictions: np.ndarray, iterations: int) -> dict[str, Any]:
    """Size, quantized-node count, validation accuracy and agreement with fp32, latency vs fp32."""
    predicted = predictions(int8, inputs)
    fp32_accuracy = float(np.mean(fp32_predictions == labels))
    accuracy = float(np.mean(predicted == labels))
    counts = op_counts(int8)
    return {"size_bytes": int8.stat().st_size, "quantized_nodes": quantized_node_count(counts),
            "val_accuracy": accuracy, "accuracy_drop": fp32_accuracy - accuracy,
            "agreement": float(np.mean(predicted == fp32_predictions)),
            **time_pair(fp32, int8, inputs, iterations)}


def with_label(settings: QuantSettings, label: str, **changes: Any) -> QuantSettings:
    return replace(settings, label=label, **changes)


# --------------------------------------------------------------------------------------------------
# Fast bias correction (what NNCF applies by default after quantizing)


def bias_correct(pre: str | Path, int8: str | Path, target: str | Path, inputs: np.ndarray) -> dict[str, float]:
    """Shift each int8 Conv/Gemm's int32 bias by the mean per-channel error of its output vs the fp32 graph on
    `inputs` (calibration images), layer by layer in graph order (each correction is measured with the earlier
    ones applied: correcting all at once from one pass over-corrects, measured): int8 rounding errors that do
    not average to zero become a bias.

    Works on the QDQ graph: the bias is `DequantizeLinear(int32 initializer, scale)`, the node keeps its fp32
    output name. Returns {node: mean |shift| in output units} for the nodes corrected.
    """
    from onnx import helper, numpy_helper

    from edgekd.runtime.session import open_session

    model = onnx.load(str(int8))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    fp32_names = {n.name for n in graph_nodes(pre)}
    targets = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.name in fp32_names:
            dq = producer.get(node.input[2])
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits and dq.input[1] in inits:
                targets.append((node, dq))
    if not targets:
        onnx.save(model, str(target))
        return {}
    def channel_means(path: str | Path, folder: Path, which: Sequence[int]) -> list[np.ndarray]:
        """Mean of the output of each target node in `which`, per channel (axis 1), over the batch and spatial
        positions. Only those outputs are fetched: at 224² every extra activation map costs a copy per batch."""
        probe_model = onnx.load(str(path))
        outputs = {n.name: n.output[0] for n in probe_model.graph.node}
        names = [outputs[targets[i][0].name] for i in which]  # the int8 graph renames outputs that are graph outputs
        present = {o.name for o in probe_model.graph.output}
        probe_model.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                        for n in names if n not in present)
        probe = folder / f"probe-{Path(path).stem}.onnx"
        onnx.save(probe_model, str(probe))
        session = open_session(probe, threads=1)
        sums: list[np.ndarray] = [np.zeros(0)] * len(names)
        counts = [0] * len(names)
        for start in range(0, len(inputs), 64):
            values = session.run(names, {session.get_inputs()[0].name: inputs[start:start + 64]})
            for i, value in enumerate(values):
                moved = np.moveaxis(value.astype(np.float64), 1, -1).reshape(-1, value.shape[1])
                sums[i] = moved.sum(axis=0) + (sums[i] if sums[i].size else 0)
                counts[i] += moved.shape[0]
        return [total / count for total, count in zip(sums, counts)]

    import tempfile

    shifts = {}
    with tempfile.TemporaryDirectory(prefix="edgekd-bias-") as folder:
        fp32_means = channel_means(pre, Path(folder), range(len(targets)))
        current = Path(folder) / "current.onnx"
        onnx.save(model, str(current))
        for index, (node, dq) in enumerate(targets):
            delta = channel_means(current, Path(folder), [index])[0] - fp32_means[index]
            bias = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int64)
            scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
            corrected = np.clip(bias - np.round(delta / scale), -(2**31), 2**31 - 1).astype(np.int32)
            inits[dq.input[0]].CopyFrom(numpy_helper.from_array(corrected, dq.input[0]))
            shifts[node.name] = float(np.mean(np.abs(delta)))
            onnx.save(model, str(current))
    onnx.save(model, str(target))
    return shifts
