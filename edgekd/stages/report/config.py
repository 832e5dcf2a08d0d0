"""The `report:` section of pipeline.yaml."""

from __future__ import annotations

from typing import Literal

from edgekd.validation import Section

# report.deploy_runtime (an export target) -> the runtime name benchmark rows carry.
DEPLOY_RUNTIMES = {"onnx": "onnxruntime", "tflite": "litert", "pte": "executorch"}


class ReportConfig(Section):
    html: bool = True
    """Write report.html (self-contained, plots inlined)."""
    plots: bool = True
    """Draw plots (matplotlib)."""
    deploy_runtime: Literal["onnx", "tflite", "pte"] = "onnx"
    """Runtime whose artifacts may be deployed: onnx (ONNX Runtime, deploy/model.onnx), tflite (LiteRT,
    deploy/model.tflite) or pte (ExecuTorch, deploy/model.pte); must be one of export.targets. The other
    runtimes' artifacts are measured and compared in the report, never deployed. Within the runtime the
    usual rule picks fp32 or int8 (fastest meeting the budgets; an int8 file the accuracy gate refused never)."""
