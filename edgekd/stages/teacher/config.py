"""The `teacher:` section of pipeline.yaml, and the name of the model the stage writes (every report row and
gate refers to the reference model by it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import field_validator, model_validator

from edgekd.train.config import TrainConfig
from edgekd.validation import Section

MODEL = "teacher"
ARTIFACT = f"{MODEL}.pt"
ONNX_ARTIFACT = f"given_{MODEL}.onnx"
"""With `teacher.onnx`, the teacher stage's copy of the given file (the export stage writes no teacher then). Not
`teacher.onnx`: that name belongs to the export stage, which deletes its own earlier files when it reruns (a run
directory that had a PyTorch teacher before)."""


def check_weights_name(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must be DEFAULT or a weights name such as IMAGENET1K_V1 (got an empty string)")
    return value


def check_pretrained_source(section: Section) -> None:
    """`weights` is torchvision's, `pretrained` timm's: the one spelling each library has."""
    model, weights, pretrained = section.model, section.weights, section.pretrained  # type: ignore[attr-defined]
    if weights is not None and not model.startswith("torchvision:"):
        hint = "; timm models take pretrained: true" if model.startswith("timm:") else ""
        raise ValueError(f"weights: only torchvision:<name> models take weights (model is '{model}'{hint})")
    if pretrained and not model.startswith("timm:"):
        hint = "; torchvision models take weights: DEFAULT" if model.startswith("torchvision:") else ""
        raise ValueError(f"pretrained: only timm:<name> models take pretrained: true (model is '{model}'{hint})")


class TeacherConfig(Section):
    model: str = "cnn_large"
    """Registry name (see `edgekd models`), `torchvision:<name>`, or `pkg.module:factory`."""
    model_kwargs: dict[str, Any] = {}
    """Keyword arguments for the model factory (e.g. {widths: [32, 64, 128], blocks: 1}; `edgekd models` lists the built-in cnn's)."""
    weights: str | None = None
    """torchvision:<name> only: start from these pretrained weights (DEFAULT or an enum name such as IMAGENET1K_V1),
    read from the local torch hub cache (nothing is downloaded); the head is replaced for the data's classes and
    the teacher is fine-tuned with `train` (a 1-channel dataset gets the first convolution's RGB filters summed)."""
    pretrained: bool = False
    """timm:<name> only: start from timm's pretrained weights (from the local cache), fine-tuned with `train`."""
    checkpoint: Path | None = None
    """A state_dict file (.pt/.pth/.safetensors-free torch.save); when absent the teacher is trained here."""
    onnx: Path | None = None
    """A teacher from any framework: an ONNX file (one image input, one logits or softmax output), e.g. a Keras
    model converted with tf2onnx. Soft targets come from ONNX Runtime; the benchmark measures this file. Replaces
    model / weights / checkpoint / train; hint losses need a PyTorch teacher."""
    train: TrainConfig = TrainConfig(epochs=8)
    """How the teacher is trained (or fine-tuned from pretrained weights) when no checkpoint is given."""

    _weights = field_validator("weights")(check_weights_name)

    @model_validator(mode="after")
    def _sources(self) -> TeacherConfig:
        check_pretrained_source(self)
        if self.onnx is not None:
            others = [key for key in ("checkpoint", "weights") if getattr(self, key) is not None]
            others += ["pretrained"] if self.pretrained else []
            others += [key for key in ("model", "model_kwargs", "train") if key in self.model_fields_set]
            if others:
                raise ValueError(f"onnx: the teacher is the ONNX file; remove teacher.{', teacher.'.join(others)}")
        if self.checkpoint is not None and (self.weights is not None or self.pretrained):
            key = "weights" if self.weights is not None else "pretrained"
            raise ValueError(f"{key}: a teacher.checkpoint replaces every weight; set one of checkpoint and {key}")
        return self
