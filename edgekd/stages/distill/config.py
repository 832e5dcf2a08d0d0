"""The `student:` and `distill:` sections of pipeline.yaml, what the distill stage's run() receives, and the
names of the models it writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from edgekd.train.config import HintConfig, KDConfig, TrainConfig
from edgekd.validation import Section

STUDENT_MODEL, BASELINE_MODEL = "student", "student_baseline"
STUDENT, BASELINE = f"{STUDENT_MODEL}.pt", f"{BASELINE_MODEL}.pt"


class StudentConfig(Section):
    model: str = "cnn_small"
    """Registry name, `torchvision:<name>`, or `pkg.module:factory`."""
    model_kwargs: dict[str, Any] = {}
    """Keyword arguments for the model factory."""


class DistillConfig(TrainConfig, KDConfig):
    epochs: int = Field(10, ge=1)
    """Distillation epochs."""
    hint: HintConfig | None = None
    """Optional FitNets-style feature hint."""
    baseline: bool = True
    """Also train the same student without KD (same schedule, seed, data) to show the KD gain."""

    def kd(self) -> KDConfig:
        """The KD objective's settings (also used by pruning recovery)."""
        return KDConfig(**{name: getattr(self, name) for name in KDConfig.model_fields})


@dataclass(frozen=True)
class DistillJob:
    distill: DistillConfig
    student: StudentConfig
