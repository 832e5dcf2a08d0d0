"""Training objectives. Each returns (total loss, dict of named parts) so CE and KD parts are logged apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hinton et al.: alpha*CE(student, y) + (1-alpha)*T^2*KL(softmax(teacher/T) || softmax(student/T)).

    kl_div takes the student's log-probabilities as input and the teacher's probabilities as target;
    "batchmean" is the mathematically correct KL ("mean" would also divide by the number of classes).
    T^2 keeps the soft-target gradients on the scale of the hard-label ones.
    """
    ce = F.cross_entropy(student_logits, labels)
    soft_student = F.log_softmax(student_logits / temperature, dim=1)
    soft_teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    kd = F.kl_div(soft_student, soft_teacher, reduction="batchmean") * temperature**2
    return alpha * ce + (1 - alpha) * kd, {"ce": ce, "kd": kd}


class Objective:
    """What the shared training loop minimises."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable tensors besides the model's own (e.g. hint adapters)."""
        return []

    def __call__(
        self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, augmented: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class CrossEntropyObjective(Objective):
    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, model, inputs, labels, indices, augmented):  # noqa: ANN001, ANN204
        ce = F.cross_entropy(model(inputs), labels, label_smoothing=self.label_smoothing)
        return ce, {"ce": ce}


class TeacherLogitCache:
    """Teacher logits per training-sample index, filled on first sight and reused on later epochs.

    Valid only for un-augmented inputs: an augmented image is a different input for the teacher.
    """

    def __init__(self, num_samples: int, num_classes: int, device: torch.device) -> None:
        self.logits = torch.zeros(num_samples, num_classes, device=device)
        self.filled = torch.zeros(num_samples, dtype=torch.bool, device=device)
        self.hits = 0
        self.misses = 0

    def get(self, teacher: nn.Module, inputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        indices = indices.to(self.filled.device)
        missing = ~self.filled[indices]
        if missing.any():
            with torch.inference_mode():
                self.logits[indices[missing]] = teacher(inputs[missing.to(inputs.device)]).float().to(self.logits.device)
            self.filled[indices[missing]] = True
        self.misses += int(missing.sum())
        self.hits += int((~missing).sum())
        return self.logits[indices].to(inputs.device)


class DistillationObjective(Objective):
    """KD from a frozen teacher (eval mode, no gradients), optionally with cached teacher logits."""

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float,
        alpha: float,
        cache: TeacherLogitCache | None = None,
    ) -> None:
        self.teacher = teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha
        self.cache = cache

    def teacher_logits(self, inputs: torch.Tensor, indices: torch.Tensor, augmented: bool) -> torch.Tensor:
        self.teacher.eval()  # the training loop's model.train() must never reach the teacher's BatchNorm
        if self.cache is not None and not augmented:
            return self.cache.get(self.teacher, inputs, indices)
        with torch.no_grad():
            return self.teacher(inputs).float()

    def __call__(self, model, inputs, labels, indices, augmented):  # noqa: ANN001, ANN204
        teacher_logits = self.teacher_logits(inputs, indices, augmented)
        return kd_loss(model(inputs).float(), teacher_logits, labels, self.temperature, self.alpha)
