"""PyTorch -> ONNX: export, full checks, parity against PyTorch, and the metadata an app needs.

Runner-free (used by `edgekd.stages.export` and testable on its own). Every exported model has one input
`input` (float32 NCHW, normalized, dynamic batch axis `batch`) and one output `logits` (batch, classes).
Files are always self-contained: the exporter's `.onnx.data` sidecar (the dynamo path's default) is folded
back into the one `.onnx`, so size, hashing, copying and the device runner see a single file.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgekd import atomic
from edgekd.version import __version__
from edgekd.errors import InputError, StageFailed

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"


@dataclass
class ExportResult:
    """What was asked for and what was written (the dynamo exporter raises opsets below 18 to 18)."""

    path: Path
    opset_requested: int
    opset_written: int
    dynamo: bool
    dynamic_batch: bool
    size_bytes: int
    parity: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = self.path.name
        return data


def written_opset(model: onnx.ModelProto) -> int:
    """The default-domain (ai.onnx) opset a model declares."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamo: bool,
                  dynamic_batch: bool) -> None:
    # Pinned at the call site: torch 2.9 flipped the default exporter to dynamo=True.
    options: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME],
                               "opset_version": opset, "dynamo": dynamo, "external_data": False}
    if dynamic_batch and dynamo:
        options["dynamic_shapes"] = ({0: torch.export.Dim(BATCH_DIM)},)
    elif dynamic_batch:
        options["dynamic_axes"] = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}}
    if dynamo:
        options["verbose"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript path warns that it is legacy on every call
        torch.onnx.export(model, (example,), str(path), **options)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, opset: int, dynamo: bool = False,
                dynamic_batch: bool = True, metadata: dict[str, str] | None = None, name: str = "model",
                ) -> ExportResult:
    """Export `model` (CPU, eval mode) to one self-contained ONNX file at `path`, written atomically.

    Runs `onnx.checker` (full check) and strict shape inference before anything is written.
    Raises InputError when the requested opset cannot express an operator, StageFailed for other failures.
    """
    path = Path(path)
    if dynamo:
        import importlib.util

        if importlib.util.find_spec("onnxscript") is None:  # the dynamo exporter's one extra dependency
            raise InputError("export.dynamo: true needs onnxscript, which is not installed: "
                             "pip install 'edgekd[dynamo]' (or set export.dynamo: false, the default exporter)")
    model = model.eval().cpu()
    example = example.detach().cpu().float()
    if dynamic_batch and dynamo and example.shape[0] < 2:
        example = example.repeat(2, *([1] * (example.dim() - 1)))  # torch.export specializes batch 1
    with tempfile.TemporaryDirectory(prefix="edgekd-export-") as work:
        raw = Path(work) / "model.onnx"
        try:
            with torch.inference_mode(False), torch.no_grad():
                _torch_export(model, example, raw, opset, dynamo, dynamic_batch)
        except Exception as exc:
            message = _first_line(exc)
            if isinstance(exc, torch.onnx.errors.UnsupportedOperatorError) and "opset" in message:
                raise InputError(f"export.opset: {opset} is too low for {name}: {message}") from None
            other = "true" if not dynamo else "false"
            raise StageFailed(f"ONNX export of {name} failed ({type(exc).__name__}: {message}); "
                              f"try export.dynamo: {other}") from exc
        proto = onnx.load(str(raw), load_external_data=True)  # pulls a `.onnx.data` sidecar back in
    _check_io(proto, name)
    set_metadata(proto, metadata or {})
    try:
        onnx.checker.check_model(proto, full_check=True)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise StageFailed(f"{name}: the exported ONNX model is invalid: {_first_line(exc)}") from exc
    with atomic.atomic_path(path) as temp:
        onnx.save_model(proto, str(temp), save_as_external_data=False)
    return ExportResult(path=path, opset_requested=opset, opset_written=written_opset(proto), dynamo=dynamo,
                        dynamic_batch=dynamic_batch, size_bytes=path.stat().st_size)


def _check_io(proto: onnx.ModelProto, name: str) -> None:
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise StageFailed(f"{name}: expected one input '{INPUT_NAME}' and one output '{OUTPUT_NAME}', "
                          f"the export has inputs {inputs} and outputs {outputs} (models must take one image batch "
                          "and return one logits tensor)")


# --------------------------------------------------------------------------------------------------
# Metadata


def build_metadata(*, labels: Sequence[str], preprocess: dict[str, Any], artifact: str, source_artifact: str,
                   source_sha256: str | None = None, config_fingerprint: str | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Everything an app needs to preprocess an image and read the output, as string key/values."""
    channels, height, width = preprocess["channels"], preprocess["height"], preprocess["width"]
    data: dict[str, Any] = {
        "edgekd_version": __version__,
        "artifact": artifact,
        "source_artifact": source_artifact,
        "source_sha256": source_sha256,
        "config_fingerprint": config_fingerprint,
        "labels": list(labels),
        "num_classes": len(labels),
        "input_name": INPUT_NAME,
        "input_layout": preprocess.get("layout", "NCHW"),
        "input_shape": [BATCH_DIM, channels, height, width],
        "input_dtype": "float32",
        "pixel_scale": preprocess["scale"],
        "mean": preprocess["mean"],
        "std": preprocess["std"],
        "normalization": preprocess.get("formula", "input = (pixel * scale - mean[c]) / std[c]"),
        "output_name": OUTPUT_NAME,
        "output": "logits (batch, num_classes) float32: raw scores, argmax = class index into labels; "
                  "softmax for probabilities",
        "preprocess": preprocess,
        **(extra or {}),
    }
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in data.items()
            if value is not None}


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Replace (not append) each key in the model's metadata_props."""
    kept = {p.key: p.value for p in proto.metadata_props if p.key not in metadata}
    del proto.metadata_props[:]
    for key, value in {**kept, **metadata}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """metadata_props of an ONNX file, JSON values decoded (labels -> list, mean -> list, ...)."""
    proto = onnx.load(str(path), load_external_data=False)
    result: dict[str, Any] = {}
    for prop in proto.metadata_props:
        try:
            result[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            result[prop.key] = prop.value
    return result


# --------------------------------------------------------------------------------------------------
# Parity and size


def _batch_of(inputs: np.ndarray, batch: int) -> np.ndarray:
    """The first `batch` samples (tiled when the data has fewer), contiguous float32."""
    reps = -(-batch // len(inputs))
    data = np.concatenate([inputs] * reps) if reps > 1 else inputs
    return np.ascontiguousarray(data[:batch], dtype=np.float32)


def parity(model: nn.Module, onnx_path: str | Path, inputs: np.ndarray, batch_sizes: Sequence[int],
           ) -> list[dict[str, float]]:
    """Max |ORT - PyTorch| of the logits per batch size (ORT CPU, 1 thread; PyTorch on CPU)."""
    from edgekd.runtime.session import open_session

    if len(inputs) == 0:
        raise InputError("parity check needs at least one validation sample")
    session = open_session(onnx_path, threads=1)
    model = model.eval().cpu()
    rows = []
    for batch in batch_sizes:
        x = _batch_of(inputs, batch)
        with torch.inference_mode():
            expected = model(torch.from_numpy(x)).float().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        if got.shape != expected.shape:
            diff = float("inf")
        else:
            diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))) if got.size else 0.0
        rows.append({"batch": int(batch), "max_abs_diff": diff})
    return rows


def check_parity(rows: list[dict[str, float]], atol: float, name: str) -> None:
    """StageFailed (exit 3) naming every batch size over `atol`; NaN counts as a failure."""
    bad = [r for r in rows if not r["max_abs_diff"] <= atol]
    if bad:
        numbers = ", ".join(f"batch {r['batch']}: {r['max_abs_diff']:.3g}" for r in rows)
        raise StageFailed(f"{name}: ONNX Runtime and PyTorch logits differ by more than export.parity_atol "
                          f"{atol:g} ({numbers})")


def count_macs(model: nn.Module, example: torch.Tensor) -> tuple[int | None, int]:
    """(MACs for one sample, parameters); MACs None when torch-pruning cannot trace the model."""
    params = sum(p.numel() for p in model.parameters())
    try:
        import torch_pruning as tp

        with torch.no_grad():
            macs, _ = tp.utils.count_ops_and_params(model.eval().cpu(), example[:1].cpu())
        return int(macs), params
    except Exception:  # noqa: BLE001 - a count is a nice-to-have, never a failure
        return None, params


def ort_sidecars(folder: Path, ort_path: Path) -> list[str]:
    """Files the ORT converter leaves beside a .ort (the operator list a minimal ORT build needs)."""
    config = folder / f"{ort_path.stem}.required_operators.config"
    return [config.name] if config.is_file() else []
