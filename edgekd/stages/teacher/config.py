"""The `teacher:` section of pipeline.yaml, and the name of the model the stage writes (every report row and
gate refers to the reference model by it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd.train.config import TrainConfig
from edgekd.validation import Section

MODEL = "teacher"
ARTIFACT = f"{MODEL}.pt"


class TeacherConfig(Section):
    model: str = "cnn_large"
    """Registry name (see `edgekd models`), `torchvision:<name>`, or `pkg.module:factory`."""
    model_kwargs: dict[str, Any] = {}
    """Keyword arguments for the model factory (e.g. {widths: [32, 64, 128], blocks: 1}; `edgekd models` lists the built-in cnn's)."""
    checkpoint: Path | None = None
    """A state_dict file (.pt/.pth/.safetensors-free torch.save); when absent the teacher is trained here."""
    train: TrainConfig = TrainConfig(epochs=8)
    """How the teacher is trained when no checkpoint is given."""
