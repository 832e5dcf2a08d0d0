"""Mobile readiness of a model: its operators, ORT's mobile usability verdict, and ORT-format conversion.

The operator list comes from our own protobuf reader (proto.py), so it works on a board without `onnx`.
ORT's two mobile tools are run as subprocesses (`python -m onnxruntime.tools...`), never imported: the
usability checker needs the `onnx` package, and importing `onnxruntime.tools` imports torch whenever it is
installed (its __init__ does), which would break this package's torch-free promise.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .proto import ProtoError, read_model_summary

logger = logging.getLogger(__name__)

_TOOL_TIMEOUT_S = 300
# "Model should perform well with NNAPI as is: NO" / "... if modified to have fixed input shapes: YES"
_VERDICT = re.compile(r"Model should perform well with (.+?) (as is|if modified to have fixed input shapes): "
                      r"(YES|NO|MAYBE)")
_QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                  "MatMulInteger", "DynamicQuantizeLinear")


def _ort_tool_exists(module: str) -> bool:
    # Looked up as a file, not with importlib.util.find_spec: find_spec imports onnxruntime.tools (-> torch).
    try:
        import onnxruntime
    except ImportError:
        return False
    return (Path(onnxruntime.__file__).parent / "tools" / f"{module}.py").is_file()


# `python -m onnxruntime.tools.X`, except that torch is marked absent first: onnxruntime/tools/__init__.py
# imports torch whenever it is installed (for an export helper these tools never use), which costs
# seconds and hundreds of MB per call on a dev machine.
_TOOL_LAUNCHER = ("import runpy, sys; sys.modules['torch'] = None; module = sys.argv.pop(1); "
                  "runpy.run_module(module, run_name='__main__', alter_sys=True)")


def _run_ort_tool(module: str, args: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", _TOOL_LAUNCHER, f"onnxruntime.tools.{module}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, cwd=cwd)


def operator_summary(model_path: str | os.PathLike) -> dict[str, Any] | None:
    """{'opsets', 'op_counts', 'node_count', 'quantized_nodes', 'producer'}; None if the file can't be read."""
    try:
        summary = read_model_summary(model_path)
    except (ProtoError, OSError) as exc:
        logger.warning("%s: cannot read the operator list (%s)", model_path, exc)
        return None
    counts = dict(sorted(summary.op_counts.items()))
    quantized = sum(n for op, n in counts.items() if op.split(":")[-1] in _QUANTIZED_OPS)
    return {"producer": summary.producer, "ir_version": summary.ir_version, "opsets": summary.opsets,
            "op_counts": counts, "node_count": summary.node_count, "quantized_nodes": quantized}


def check_mobile_usability(model_path: str | os.PathLike) -> dict[str, Any]:
    """ORT's verdict per mobile EP (NNAPI, CoreML): {'available', 'verdicts', 'recommendation', 'reason'}.

    verdicts: EP -> {'as_is': YES|NO|MAYBE, 'fixed_shapes': YES|NO|MAYBE}. 'available' is False (with a
    reason) when the checker is missing or fails, e.g. on a board without the `onnx` package.
    """
    result: dict[str, Any] = {"available": False, "verdicts": {}, "recommendation": None, "reason": None}
    module = "check_onnx_model_mobile_usability"
    if not _ort_tool_exists(module):
        result["reason"] = f"onnxruntime.tools.{module} is not in this onnxruntime"
        return result
    try:
        proc = _run_ort_tool(module, [os.path.abspath(model_path)])
    except (OSError, subprocess.TimeoutExpired) as exc:
        result["reason"] = f"checker did not finish: {exc}"
        return result
    output = proc.stdout + proc.stderr  # the checker reports through logging, i.e. on stderr
    if proc.returncode != 0:
        result["reason"] = (output.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return result
    for provider, condition, verdict in _VERDICT.findall(output):
        key = "as_is" if condition == "as is" else "fixed_shapes"
        result["verdicts"].setdefault(provider, {})[key] = verdict
    for line in output.splitlines():
        text = line.split(":", 1)[-1].strip()
        if text.startswith(("As NNAPI or CoreML", "For optimal performance")):
            result["recommendation"] = text
    result["available"] = bool(result["verdicts"])
    if not result["available"]:
        result["reason"] = "checker output had no verdict lines"
    return result


def convert_to_ort_with_reason(model_path: str | os.PathLike,
                               out_dir: str | os.PathLike) -> tuple[Path | None, str | None]:
    """Convert to ORT format (for ORT Mobile / minimal builds): (path, None) or (None, why it failed).

    Converted in a temp dir beside the target and renamed into place, so `out_dir` never holds half a
    file. The optimization style is 'Fixed' (optimizations baked in), the one ORT recommends for the CPU EP.
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    module = "convert_onnx_models_to_ort"
    if not model_path.is_file():
        return None, f"{model_path}: file not found"
    if not _ort_tool_exists(module):
        return None, f"onnxruntime.tools.{module} is not in this onnxruntime"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{model_path.stem}.ort"
    with tempfile.TemporaryDirectory(prefix=".ort-convert-", dir=out_dir) as work_dir:
        # Work on a copy: the tool converts every .onnx in a folder and writes beside it by default.
        source = Path(work_dir) / "in" / model_path.name
        source.parent.mkdir()
        shutil.copy2(model_path, source)
        try:
            external = read_model_summary(model_path).external_data
        except (ProtoError, OSError) as exc:
            return None, f"{model_path}: not an ONNX model ({exc})"
        for location in sorted(set(external)):  # external weights must travel with the model
            (source.parent / location).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model_path.parent / location, source.parent / location)
        try:
            proc = _run_ort_tool(module, [str(source), "--output_dir", str(Path(work_dir) / "out"),
                                          "--optimization_style", "Fixed"], cwd=work_dir)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"converter did not finish: {exc}"
        produced = Path(work_dir) / "out" / f"{model_path.stem}.ort"
        if proc.returncode != 0 or not produced.is_file():
            lines = (proc.stderr + proc.stdout).strip().splitlines()
            errors = [line for line in lines if "error" in line.lower()] or lines
            return None, (errors or [f"exit code {proc.returncode}"])[-1].strip()
        # The operator list a minimal ORT build needs (`build.sh --include_ops_by_config`) goes along.
        for config in (Path(work_dir) / "out").glob("*.config"):
            os.replace(config, out_dir / f"{model_path.stem}.required_operators.config")
        os.replace(produced, target)
    return target, None


def convert_to_ort(model_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path | None:
    """Path of the `.ort` file written to `out_dir`, or None (the reason is logged as a warning)."""
    path, reason = convert_to_ort_with_reason(model_path, out_dir)
    if path is None:
        logger.warning("%s: ORT-format conversion failed: %s", model_path, reason)
    return path


def mobile_report(model_path: str | os.PathLike, check_usability: bool = True) -> dict[str, Any]:
    """Operators plus (optionally, it takes a few seconds) ORT's mobile usability verdict."""
    if Path(model_path).suffix.lower() == ".ort":  # already converted: a flatbuffer, not a ModelProto
        return {"operators": None, "usability": None, "reason": "ORT-format model: checks apply to the .onnx"}
    return {"operators": operator_summary(model_path),
            "usability": check_mobile_usability(model_path) if check_usability else None}
