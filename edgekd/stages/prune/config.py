"""The `prune:` section of pipeline.yaml, what the prune stage's run() receives, and the name of what it writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edgekd.train.config import KDConfig, TrainConfig
from edgekd.validation import Section, distinct_names

TARGETS = ("ratio", "target_macs", "target_params", "target_latency_ms", "target_speedup")
MODEL = "pruned"
ARTIFACT = f"{MODEL}.pt"


class PruneConfig(Section):
    source: Literal["student", "teacher"] = "student"
    """Which model is pruned: the distilled student, or the teacher (a second student route)."""
    importance: Literal["l1", "l2", "taylor", "bn_scale"] = "l2"
    """Channel importance: weight magnitude (l1/l2), first-order Taylor (gradients), or BatchNorm scale."""
    ratio: float | None = Field(None, gt=0, lt=1)
    """Fraction of CHANNELS removed per prunable layer (0.5 keeps ~25% of a conv's parameters)."""
    target_macs: float | None = Field(None, gt=0)
    """MACs to keep: a fraction of the original when <= 1, else an absolute count."""
    target_params: float | None = Field(None, gt=0)
    """Parameters to keep: a fraction of the original when <= 1, else an absolute count."""
    target_latency_ms: float | None = Field(None, gt=0)
    """p50 latency to reach on ONNX Runtime at the budgets' latency_threads / latency_batch, measured in the loop
    (each pruning trial exported and timed interleaved with the unpruned model); stops within 10 %."""
    target_speedup: float | None = Field(None, gt=1, le=100)
    """p50 speed-up over the unpruned model to reach, measured like target_latency_ms (e.g. 1.5)."""
    latency_precision: Literal["auto", "fp32", "int8"] = "auto"
    """Precision timed for latency targets and round_to: auto = int8 when the quantize stage is on (static; a
    quick int8 of each trial, calibrated on 64 training images), else fp32."""
    latency_rounds: int = Field(3, ge=1, le=20)
    """Interleaved timing rounds per latency measurement; their median ratio counts."""
    global_pruning: bool = Field(False, alias="global")
    """Rank channels across layers (global) instead of per layer."""
    steps: int = Field(1, ge=1)
    """Prune iteratively in this many steps, with recovery fine-tuning after each."""
    round_to: int | Literal["auto"] | None = None
    """Keep channel counts a multiple of this (SIMD-friendly widths, e.g. 8); auto = measured here: the model is
    pruned at the first step's ratio with round_to 1, 4, 8 and 16, each timed on ONNX Runtime, and the one
    delivering the most MACs per millisecond is used (the measurements are in the stage's metrics)."""
    ignore: list[str] = []
    """Module names never pruned (the classifier head is always ignored)."""
    taylor_batches: int = Field(4, ge=1)
    """Batches of training data used to estimate Taylor importance."""
    finetune: TrainConfig = TrainConfig(epochs=3, lr=1e-3)
    """Recovery fine-tuning with KD from the teacher (temperature/alpha from `distill`, or its defaults when distill is off)."""

    _names = field_validator("ignore")(distinct_names)

    @field_validator("round_to", mode="before")
    @classmethod
    def _round_to(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, int) and value < 1):
            raise ValueError(f"must be a positive integer or auto (got {value})")
        if isinstance(value, str) and value != "auto":
            raise ValueError(f"must be a positive integer or auto (got {value!r})")
        return value

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        targets = [n for n in TARGETS if getattr(self, n) is not None]
        if len(targets) > 1:
            raise ValueError(f"set only one of {', '.join(TARGETS)} (got {', '.join(targets)})")
        if not targets:
            self.ratio = 0.3
        return self

    @property
    def measures_latency(self) -> bool:
        """True when the stage times models on ONNX Runtime (a latency target, or round_to: auto)."""
        return self.target_latency_ms is not None or self.target_speedup is not None or self.round_to == "auto"


@dataclass(frozen=True)
class PruneJob:
    prune: PruneConfig
    kd: KDConfig
    """Recovery fine-tuning's KD settings: the distill section's, or their defaults when distill is off."""
    model: str
    """Spec of the pruned model (the student's or the teacher's)."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    """The pruned model's pretrained weights setting (recorded: it decides the architecture checkpoints fit)."""
    pretrained: bool = False
    latency: Any = None
    """LatencySettings (threads and batch from the budgets, precision, export opset) when the stage measures
    latency, else None."""
