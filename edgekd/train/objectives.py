"""Training objectives. Each returns (total loss, dict of named parts) so CE and KD parts are logged apart.

`make_kd_objective` is the one place a KD objective is built from its settings (`KDConfig`); the distill
stage and the prune stage's recovery fine-tuning both use it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # keep `import edgekd.train.objectives` free of pydantic/data imports
    from edgekd.data.bundle import DataBundle
    from edgekd.train.config import KDConfig
    from edgekd.train.hints import FeatureHint



def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hinton et al.: alpha*CE(student, y) + (1-alpha)*T^2*KL(softmax(teacher/T) || softmax(student/T)).

    kl_div takes the student's log-probabilities as input and the teacher's probabilities as target;
    "batchmean" is the mathematically correct KL ("mean" would also divide by the number of classes).
    T^2 keeps the soft-target gradients on the scale of the hard-label ones. The returned "kd" part already
    includes T^2 (it is what the total weighs with 1-alpha).
    """
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    soft_student = F.log_softmax(student_logits / temperature, dim=1)
    soft_teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    kd = F.kl_div(soft_student, soft_teacher, reduction="batchmean") * temperature**2
    return alpha * ce + (1 - alpha) * kd, {"ce": ce, "kd": kd}


class Objective:
    """What the shared training loop minimises."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable tensors besides the model's own (e.g. hint adapters)."""
        return []

    def close(self) -> None:
        """Release hooks or caches once training is over (no-op by default)."""

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

    The logits live in a numpy memmap on disk (`folder`: the run directory's work folder; a private temporary
    folder otherwise), so the cache scales with the dataset without holding it in memory: only a bit per
    sample says which rows are filled. Valid only for un-augmented inputs of a frozen teacher: an augmented
    image is a different input, and the caller (DistillationObjective) bypasses the cache for those. The
    teacher is in eval mode, so running it on only the missing part of a batch gives the same logits as on the
    whole batch.
    """

    FILE = "teacher_logits.npy"

    def __init__(self, num_samples: int, num_classes: int, folder: Path | None = None) -> None:
        self._own_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="edgekd-teacher-logits-")) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / self.FILE
        self.logits = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32,
                                                shape=(num_samples, num_classes))
        self.filled = torch.zeros(num_samples, dtype=torch.bool)
        self.hits = 0
        self.misses = 0

    def get(self, teacher: nn.Module, inputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        indices = indices.cpu()
        missing = ~self.filled[indices]
        count_missing = int(missing.sum())
        if count_missing:
            batch = inputs if count_missing == len(indices) else inputs[missing.to(inputs.device)]
            with torch.no_grad():
                fresh = teacher(batch).float()
            self.logits[indices[missing].numpy()] = fresh.cpu().numpy()
            self.filled[indices[missing]] = True
        self.misses += count_missing
        self.hits += len(indices) - count_missing
        return torch.from_numpy(self.logits[indices.numpy()]).to(inputs.device)

    def close(self) -> None:
        """Drop the memmap and its file (the logits are only valid for this training)."""
        self.logits = np.zeros((0, self.logits.shape[1]), np.float32)
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)

    @property
    def hit_rate(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None

    def stats(self) -> dict[str, Any]:
        rate = self.hit_rate
        return {"hits": self.hits, "misses": self.misses, "hit_rate": None if rate is None else round(rate, 6)}


class DistillationObjective(Objective):
    """KD from a frozen teacher (eval mode, no gradients), optionally with cached teacher logits and a
    FitNets feature hint (which needs the teacher's features, so it runs the teacher on every batch)."""

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float,
        alpha: float,
        cache: TeacherLogitCache | None = None,
        hint: FeatureHint | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {temperature})")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] (got {alpha})")
        self.teacher = teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha
        self.cache = None if hint is not None else cache  # cached logits would skip the forward the hint needs
        self.hint = hint
        self.label_smoothing = label_smoothing

    def extra_parameters(self) -> list[nn.Parameter]:
        return self.hint.parameters() if self.hint is not None else []

    def close(self) -> None:
        if self.hint is not None:
            self.hint.close()
        if self.cache is not None:
            self.cache.close()

    def teacher_logits(self, inputs: torch.Tensor, indices: torch.Tensor, augmented: bool) -> torch.Tensor:
        self.teacher.eval()  # the training loop's model.train() must never reach the teacher's BatchNorm
        if self.cache is not None and not augmented:
            return self.cache.get(self.teacher, inputs, indices)
        with torch.no_grad():  # live (augmented inputs); under the loop's autocast on CUDA, in mixed precision
            return self.teacher(inputs).float()

    def __call__(self, model, inputs, labels, indices, augmented):  # noqa: ANN001, ANN204
        if self.hint is None:
            teacher_logits = self.teacher_logits(inputs, indices, augmented)
            return kd_loss(model(inputs).float(), teacher_logits, labels, self.temperature, self.alpha, self.label_smoothing)
        with self.hint.capturing():
            teacher_logits = self.teacher_logits(inputs, indices, augmented)
            student_logits = model(inputs).float()
        loss, parts = kd_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha, self.label_smoothing)
        hint = self.hint.loss()
        parts["hint"] = hint
        return loss + self.hint.weight * hint, parts


def make_kd_objective(
    kd: KDConfig,
    teacher: nn.Module,
    data: DataBundle,
    device: torch.device,
    *,
    augment: bool,
    hint: FeatureHint | None = None,
    cache_dir: Path | None = None,
) -> DistillationObjective:
    """The KD objective: temperature, alpha, label smoothing and caching from `kd`.

    `augment` is whether the training this objective serves augments its inputs. The teacher-logit cache is
    allocated only when it can be hit: augmentation off, `kd.cache_teacher_logits` on, and no hint.
    One objective may serve several `fit` calls (e.g. iterative pruning steps): the cache stays valid as
    long as the teacher and the training split do not change. `cache_dir`: where the memmap lives (the run
    directory's work folder); a temporary folder when None. `close()` removes it.
    """
    cache = None
    if kd.cache_teacher_logits and not augment and hint is None:
        cache = TeacherLogitCache(len(data.train), data.meta.num_classes, cache_dir)
    return DistillationObjective(
        teacher, kd.temperature, kd.alpha, cache=cache, hint=hint, label_smoothing=kd.label_smoothing
    )
