"""The `student:` and `distill:` sections of pipeline.yaml, what the distill stage's run() receives, and the
names of the models it writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from edgekd.train.config import HintConfig, KDConfig, TrainConfig
from edgekd.stages.teacher.config import check_pretrained_source, check_weights_name
from edgekd.validation import Section

STUDENT_MODEL, BASELINE_MODEL = "student", "student_baseline"
STUDENT, BASELINE = f"{STUDENT_MODEL}.pt", f"{BASELINE_MODEL}.pt"


AUTO = "auto"
# student.model: auto — the built-in family the choice draws from: the CNN widths and depths measured in
# benchmarks/RESULTS.md's student frontier, from 2M to 30M MACs on 28x28 inputs.
AUTO_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"model": "cnn", "model_kwargs": {"widths": [16, 32, 64], "blocks": 1}},
    {"model": "cnn", "model_kwargs": {"widths": [24, 48, 96], "blocks": 1}},
    {"model": "cnn", "model_kwargs": {"widths": [32, 64, 128], "blocks": 1}},
    {"model": "cnn", "model_kwargs": {"widths": [48, 96, 192], "blocks": 1}},
    {"model": "cnn", "model_kwargs": {"widths": [16, 32, 64], "blocks": 2}},
    {"model": "cnn", "model_kwargs": {"widths": [32, 64, 128], "blocks": 2}},
)


class CandidateConfig(Section):
    model: str
    """Registry name, `torchvision:<name>`, `timm:<name>`, or `pkg.module:factory`."""
    model_kwargs: dict[str, Any] = {}
    """Keyword arguments for the model factory."""

    def label(self) -> str:
        if not self.model_kwargs:
            return self.model
        return f"{self.model}({', '.join(f'{k}={v}' for k, v in self.model_kwargs.items())})"


class StudentConfig(Section):
    model: str = "cnn_small"
    """Registry name, `torchvision:<name>`, `timm:<name>`, `pkg.module:factory`, or auto: choose from the built-in
    CNN family by measured latency (needs a latency budget; see candidates)."""
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

    candidates: list[CandidateConfig] | None = None
    """Students to choose from (each a model spec or {model, model_kwargs}): before distilling, each untrained
    candidate is exported and timed here in fp32 and int8 at the budgets' threads and batch; those that miss the
    latency budgets (latency_p50_ms / latency_p90_ms, min_speedup against the teacher timed alongside) even in
    int8 are dropped, and the one with the most capacity left is distilled. Leave student.model out (or auto).
    The candidates, budgets and timing settings are the distill stage's fingerprint inputs: a rerun of the same
    config skips the stage and never re-times; `--force distill` re-times, and warns when the chosen student is
    within 10 % of the budget (a re-timing could then choose another; pin it with student.model)."""
    capacity: Literal["macs", "params"] = "macs"
    """What 'most capacity' means when choosing among candidates."""
    top_k: int = Field(1, ge=1, le=5)
    """Distil this many of the fitting candidates (most capacity first) and keep the best by validation accuracy
    (k times the distillation time; the no-KD baseline is trained for the kept one only)."""

    @field_validator("candidates", mode="before")
    @classmethod
    def _specs(cls, value: Any) -> Any:
        if isinstance(value, list):  # a bare spec string is the common case
            return [{"model": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _sources(self) -> StudentConfig:
        check_pretrained_source(self)
        return self

    @model_validator(mode="after")
    def _one_way(self) -> StudentConfig:
        if self.chooses:
            given = [k for k in ("weights", "pretrained", "checkpoint") if getattr(self, k)]
            if given:
                raise ValueError(f"{given[0]}: applies to a named student, not to one chosen by latency "
                                 "(student.candidates / student.model: auto)")
        if self.candidates is not None:
            if not self.candidates:
                raise ValueError("candidates: give at least one model spec (or leave the key out)")
            if "model" in self.model_fields_set and self.model != AUTO:
                raise ValueError(f"set candidates or model, not both (got model '{self.model}'; model: auto goes "
                                 "with candidates)")
            labels = [c.label() for c in self.candidates]
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            if repeated:
                raise ValueError(f"candidates: listed twice: {', '.join(repeated)}")
        if self.top_k > 1 and not self.chooses:
            raise ValueError(f"top_k: {self.top_k} needs student.candidates or student.model: auto")
        if self.model == AUTO and self.model_kwargs:
            raise ValueError("model_kwargs: not used with student.model: auto (the candidates carry their own)")
        return self

    @property
    def chooses(self) -> bool:
        """True when the student is chosen by measured latency (candidates, or model: auto)."""
        return self.candidates is not None or self.model == AUTO

    def candidate_list(self) -> list[CandidateConfig]:
        if self.candidates is not None:
            return list(self.candidates)
        return [CandidateConfig.model_validate(c) for c in AUTO_CANDIDATES]

    def specs(self) -> tuple[str, ...]:
        """Every model spec this section may build."""
        return tuple(c.model for c in self.candidate_list()) if self.chooses else (self.model,)


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
    choice: Any = None
    """StudentChoice settings (budgets, latency settings) when the student is chosen by latency, else None."""
