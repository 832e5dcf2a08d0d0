"""The `quantize:` section of pipeline.yaml, what the quantize stage's run() receives, and the names of what
it writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edgekd.validation import Section, distinct_names

ARTIFACT = "model.int8.onnx"
# The artifact's name in the benchmark and report, per quantize.mode.
MODELS = {"static": "int8", "dynamic": "int8_dynamic"}


class CalibrationConfig(Section):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    """minmax | entropy | percentile (entropy/percentile keep all activation histograms in memory)."""
    samples: int = Field(512, gt=0, le=20000)
    """Training images used for calibration (never test images)."""
    percentile: float = Field(99.999, gt=90, le=100)
    """percentile method: the percentile kept."""

    @model_validator(mode="after")
    def _bound_histogram_methods(self) -> CalibrationConfig:
        if self.method != "minmax" and self.samples > 4096:
            raise ValueError(
                f"samples: at most 4096 with method '{self.method}' (histograms of every activation stay in memory; got {self.samples})"
            )
        return self


class QuantizeConfig(Section):
    mode: Literal["static", "dynamic"] = "static"
    """static (calibrated int8) | dynamic (weights int8, activations quantized at run time). `quantize: null` switches the stage off."""
    format: Literal["qdq", "qoperator"] = "qdq"
    """Quantized graph format."""
    per_channel: bool = True
    """Per-channel weight scales."""
    reduce_range: bool | Literal["auto"] = "auto"
    """7-bit weights; auto = on for CPUs without VNNI, where uint8 x int8 can saturate."""
    activation_type: Literal["uint8", "int8", "auto"] = "auto"
    """Activation type; auto picks from the CPU's flags."""
    weight_type: Literal["int8", "uint8"] = "int8"
    """Weight type."""
    calibration: CalibrationConfig = CalibrationConfig()
    """Static calibration."""
    exclude_nodes: list[str] = []
    """Node names kept in float (validated against the pre-processed graph)."""
    exclude_op_types: list[str] = []
    """Operator types kept in float (e.g. [Softmax])."""
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)
    """Largest validation accuracy drop of int8 vs its fp32 source that is accepted."""
    fallback: bool = True
    """When int8 drops more than allowed, keep the fp32 model as the deployable candidate."""
    search: bool = True
    """When int8 is not faster than fp32, also try the other sensible settings and keep the best."""
    bias_correction: bool = True
    """Fast bias correction after static QDQ quantization: layer by layer, each int8 Conv/Gemm's bias absorbs the
    mean per-channel error of its output vs fp32 on calibration images (the pruned default student: test logit
    error vs fp32 0.163 -> 0.044, benchmarks/RESULTS.md). Ignored for dynamic and QOperator int8."""
    mixed_precision: Literal["off", "auto"] = "off"
    """auto: measure each weighted layer's int8 sensitivity (validation split) and time gain (per-op profile),
    then keep in float the layers int8 makes slower and those costing the most accuracy per microsecond gained,
    until max_accuracy_drop (and min_agreement) hold at the lowest measured latency; the weight range (7-bit or
    8-bit) is chosen per layer too. Static mode only."""
    min_agreement: float | None = Field(None, gt=0, le=1)
    """Agreement floor with the fp32 source's validation predictions for mixed_precision: auto (null: none)."""
    mixed_precision_steps: int = Field(24, ge=1, le=500)
    """Most candidate graphs the mixed-precision search quantizes and times (each takes seconds)."""
    source: Literal["auto", "pruned", "student", "teacher"] = "auto"
    """Model quantized; auto = the last model of the chain (pruned, else student, else teacher)."""

    # Node names depend on the exporter, so they are matched against the graph in the quantize stage (before
    # anything is quantized); here only what no graph can contain.
    _names = field_validator("exclude_nodes", "exclude_op_types")(distinct_names)

    @model_validator(mode="after")
    def _mixed_precision_needs_static(self) -> QuantizeConfig:
        if self.mixed_precision == "auto" and self.mode != "static":
            raise ValueError("mixed_precision: auto needs mode: static (dynamic int8 has no calibrated "
                             "activations to keep in float or not)")
        if self.min_agreement is not None and self.mixed_precision != "auto":
            raise ValueError("min_agreement: only used by mixed_precision: auto; set it too, or remove min_agreement")
        return self


@dataclass(frozen=True)
class QuantizeJob:
    quantize: QuantizeConfig
    ort_format: bool
    """export.ort_format: also write a .ort copy of the int8 model."""
