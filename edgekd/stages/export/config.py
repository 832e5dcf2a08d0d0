"""The `export:` section of pipeline.yaml and the names of what the export stage writes."""

from __future__ import annotations

from typing import Any, Literal

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


# Export targets: the file suffix each writes, and the optional extra (pip install "edgekd[extra]") and the
# importable module it needs. ONNX is always there: quantize, benchmark and the device runner read it.
Target = Literal["onnx", "tflite", "pte"]
TARGET_EXTRAS: dict[str, tuple[str, str, str]] = {
    # target: (extra, module checked before any training, what it is)
    "tflite": ("litert", "litert_torch", "LiteRT (.tflite) export"),
    "pte": ("executorch", "executorch", "ExecuTorch (.pte) export"),
}


def check_targets(value: list[str]) -> list[str]:
    """export.targets: no repeats, onnx listed (the other stages read the ONNX files)."""
    repeated = sorted({t for t in value if value.count(t) > 1})
    if repeated:
        raise ValueError(f"{repeated[0]!r} is listed twice")
    if "onnx" not in value:
        raise ValueError(f"must include 'onnx' (quantize, benchmark and the device runner read the ONNX files; "
                         f"got {value}); e.g. [onnx, {', '.join(value) or 'tflite'}]")
    return value


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
    targets: list[Target] = ["onnx"]
    """Runtimes the last model of the chain is exported for: onnx (always), tflite (LiteRT via litert-torch,
    needs the `litert` extra), pte (ExecuTorch with XNNPACK, needs the `executorch` extra). Each extra target
    gets an fp32 file and, when quantize is on, an int8 one made by that runtime's own quantizer on the
    quantize stage's calibration images; all are benchmarked and gated like the ONNX artifacts."""

    _sizes = field_validator("parity_batch_sizes")(positive_ints)

    def view(self) -> dict[str, Any]:
        # The extra targets are the mobile stage's business (its own view): adding one must not re-export ONNX.
        view = super().view()
        view.pop("targets", None)
        return view

    _targets = field_validator("targets")(check_targets)
