"""The `export:` section of pipeline.yaml."""

from __future__ import annotations

from pydantic import Field

from edgekd.validation import Section


class ExportConfig(Section):
    opset: int = Field(17, ge=11, le=25)
    """ONNX opset requested; the opset actually written is read back and recorded."""
    dynamo: bool = False
    """Use the torch.export-based exporter (True) or the TorchScript one (False; stable for CNNs, deterministic)."""
    dynamic_batch: bool = True
    """Export with a dynamic batch axis."""
    parity_atol: float = Field(1e-4, gt=0)
    """Max |ORT - PyTorch| on logits allowed; beyond it the stage fails (exit 3)."""
    parity_batch_sizes: list[int] = [1, 7, 64]
    """Batch sizes checked for parity (not only the traced one)."""
    ort_format: bool = True
    """Also write an ONNX Runtime Mobile `.ort` copy of the deployable model."""
