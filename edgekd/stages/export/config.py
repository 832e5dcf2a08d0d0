"""The `export:` section of pipeline.yaml and the names of what the export stage writes."""

from __future__ import annotations

from pydantic import Field, field_validator

from edgekd.stages.distill.config import BASELINE_MODEL, STUDENT_MODEL
from edgekd.stages.prune.config import MODEL as PRUNED_MODEL
from edgekd.stages.teacher.config import MODEL as TEACHER_MODEL
from edgekd.validation import Section, positive_ints

EVAL_ARTIFACT = "eval.npz"
VAL_ARTIFACT = "val.npz"
# The fp32 models a run can have, in report order: the reference first, then each compression step.
MODEL_ORDER = (TEACHER_MODEL, BASELINE_MODEL, STUDENT_MODEL, PRUNED_MODEL)


def onnx_name(model: str) -> str:
    return f"{model}.onnx"


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

    _sizes = field_validator("parity_batch_sizes")(positive_ints)
