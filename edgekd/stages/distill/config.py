"""The `student:` and `distill:` sections of pipeline.yaml, what the distill stage's run() receives, and the
names of the models it writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from edgekd.train.config import HintConfig, KDConfig, TrainConfig
from edgekd.stages.teacher.config import check_pretrained_source, check_weights_name
from edgekd.validation import Section

STUDENT_MODEL, BASELINE_MODEL = "student", "student_baseline"
STUDENT, BASELINE = f"{STUDENT_MODEL}.pt", f"{BASELINE_MODEL}.pt"


class StudentConfig(Section):
    model: str = "cnn_small"
    """Registry name, `torchvision:<name>`, `timm:<name>`, or `pkg.module:factory`."""
    model_kwargs: dict[str, Any] = {}
    """Keyword arguments for the model factory."""
    weights: str | None = None
    """torchvision:<name> only: start from these pretrained weights (DEFAULT or an enum name), read from the local
    torch hub cache; the head is replaced for the data's classes."""
    pretrained: bool = False
    """timm:<name> only: start from timm's pretrained weights (from the local cache); the head is replaced."""
    checkpoint: Path | None = None
    """A state_dict to start the student (and its no-KD baseline) from; it must fit `model` as built for the data
    (with `weights`/`pretrained` set, the pretrained architecture; their weights are then not read)."""

    _weights = field_validator("weights")(check_weights_name)

    @model_validator(mode="after")
    def _sources(self) -> StudentConfig:
        check_pretrained_source(self)
        return self


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
