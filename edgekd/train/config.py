"""Training settings shared by every stage that trains (teacher, distill, prune recovery): the optimizer
and schedule (`TrainConfig`), the knowledge-distillation objective (`KDConfig`) and the FitNets hint."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgekd.validation import Section


class TrainConfig(Section):
    epochs: int = Field(5, ge=0)
    """Training epochs."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate (for the global batch)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw | sgd (with Nesterov momentum)."""
    weight_decay: float = Field(1e-4, ge=0)
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    schedule: Literal["cosine", "onecycle", "constant"] = "onecycle"
    """Learning-rate schedule, stepped per batch."""
    warmup_fraction: float = Field(0.15, ge=0, lt=1)
    """onecycle: fraction of the steps spent warming up."""
    augment: bool = True
    """Light augmentation: random shifts of up to 2 pixels (plus horizontal flips for natural images)."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Label smoothing of the hard-label cross-entropy."""
    grad_clip: float | None = Field(None, gt=0)
    """Clip the gradient norm to this value."""
    amp: bool = True
    """Mixed precision (bfloat16/float16 autocast) on CUDA; ignored on CPU."""
    channels_last: bool = False
    """Train in channels_last memory format (faster convolutions on recent GPUs)."""
    freeze_backbone_epochs: int = Field(0, ge=0)
    """Train only the classifier head for this many first epochs (the backbone's weights and BatchNorm statistics
    stay as they are), then everything: the usual start of fine-tuning from pretrained weights."""
    bn_recalibration_batches: int = Field(10, ge=0)
    """After each epoch, recompute BatchNorm running statistics over this many training batches (0: off) and keep
    them when they validate at least as well as the moving average, so validation, best-epoch selection and the
    exported model use statistics that match the weights."""


class KDConfig(Section):
    """Hinton knowledge distillation; its defaults also drive pruning recovery when `distill` is off."""

    temperature: float = Field(4.0, gt=0)
    """Softmax temperature T of the soft targets."""
    alpha: float = Field(0.1, ge=0, le=1)
    """Weight of the hard-label CE term: loss = alpha*CE + (1-alpha)*T^2*KL."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Label smoothing of the hard-label cross-entropy."""
    cache_teacher_logits: bool = True
    """Compute teacher logits once per sample and reuse them (only when augment is false)."""


class HintConfig(Section):
    teacher_layer: str
    """Name of the teacher module whose output is the hint (as in model.named_modules())."""
    student_layer: str
    """Name of the student module that is trained to match it (through a learned 1x1 adapter)."""
    weight: float = Field(1.0, ge=0)
    """beta: weight of the hint (MSE) term."""
