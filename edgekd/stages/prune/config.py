"""The `prune:` section of pipeline.yaml, what the prune stage's run() receives, and the name of what it writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edgekd.train.config import KDConfig, TrainConfig
from edgekd.validation import Section, distinct_names

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
    global_pruning: bool = Field(False, alias="global")
    """Rank channels across layers (global) instead of per layer."""
    steps: int = Field(1, ge=1)
    """Prune iteratively in this many steps, with recovery fine-tuning after each."""
    round_to: int | None = Field(None, ge=1)
    """Keep channel counts a multiple of this (SIMD-friendly widths, e.g. 8)."""
    ignore: list[str] = []
    """Module names never pruned (the classifier head is always ignored)."""
    taylor_batches: int = Field(4, ge=1)
    """Batches of training data used to estimate Taylor importance."""
    finetune: TrainConfig = TrainConfig(epochs=3, lr=1e-3)
    """Recovery fine-tuning with KD from the teacher (temperature/alpha from `distill`, or its defaults when distill is off)."""

    _names = field_validator("ignore")(distinct_names)

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        targets = [n for n in ("ratio", "target_macs", "target_params") if getattr(self, n) is not None]
        if len(targets) > 1:
            raise ValueError(f"set only one of ratio, target_macs, target_params (got {', '.join(targets)})")
        if not targets:
            self.ratio = 0.3
        return self


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
