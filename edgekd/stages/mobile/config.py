"""What the mobile stage's run() receives and the names of what it writes. The stage has no section of its
own: `export.targets` says which runtimes, and the int8 files follow the `quantize:` section (the same
calibration images, the same accuracy limit) so every runtime's int8 model is made and gated alike."""

from __future__ import annotations

from dataclasses import dataclass

from edgekd.stages.quantize.config import QuantizeConfig

# target -> (runtime name in the report, file suffix)
RUNTIMES = {"onnx": "onnxruntime", "tflite": "litert", "pte": "executorch"}
SUFFIXES = {"tflite": ".tflite", "pte": ".pte"}


def artifact_name(target: str, kind: str) -> str:
    """The benchmark/report name of a mobile artifact: tflite, tflite_int8, pte, pte_int8."""
    return target if kind == "fp32" else f"{target}_{kind}"


def file_name(source: str, target: str, kind: str) -> str:
    """pruned.tflite, pruned.int8.tflite, pruned.pte, pruned.int8.pte."""
    return f"{source}{'' if kind == 'fp32' else '.' + kind}{SUFFIXES[target]}"


@dataclass(frozen=True)
class MobileJob:
    targets: tuple[str, ...]
    """export.targets other than onnx, in the order given."""
    quantize: QuantizeConfig | None
    """The quantize section: int8 files are made only when it is on (calibration samples, accuracy limit)."""
    parity_atol: float
    """export.parity_atol: the fp32 files must match PyTorch as closely as the ONNX files do."""
