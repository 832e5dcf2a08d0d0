"""FitNets-style feature hints: a student module is trained to match a teacher module's output.

Forward hooks capture both outputs during the objective's forward passes; a learned adapter (1x1 conv for
feature maps, linear for vectors) maps the student's channels onto the teacher's, and the spatial sizes are
reconciled by average-pooling the larger map down to the smaller one (pooling commutes with a 1x1 conv, so
the adapter runs on the small map).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.errors import InputError

if TYPE_CHECKING:
    from edgekd.data.bundle import DataBundle
    from edgekd.train.config import HintConfig

MAX_LISTED = 40  # a ResNet has hundreds of modules: list the first ones, the message stays readable


def find_module(model: nn.Module, name: str, field: str, role: str) -> nn.Module:
    """The module called `name` in `model`, or InputError naming the config key and the valid names."""
    modules = dict(model.named_modules())
    modules.pop("", None)  # the model itself is not a hint layer
    if name in modules:
        return modules[name]
    names = list(modules)
    listed = ", ".join(names[:MAX_LISTED]) + (f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")
    raise InputError(f"{field}: no module '{name}' in the {role} (valid: {listed})")


def _reduce(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring both features to the same layout: vectors when either is one, else the smaller spatial size."""
    if student.dim() == 4 and teacher.dim() == 2:
        student = student.mean(dim=(2, 3))
    elif student.dim() == 2 and teacher.dim() == 4:
        teacher = teacher.mean(dim=(2, 3))
    if student.dim() == 4:
        size = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))
        if tuple(student.shape[2:]) != size:
            student = F.adaptive_avg_pool2d(student, size)
        if tuple(teacher.shape[2:]) != size:
            teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


class FeatureHint:
    """Hooks on one teacher and one student module, an adapter, and the weighted MSE between them."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        teacher_layer: str,
        student_layer: str,
        weight: float,
        probe: torch.Tensor,
        field: str = "distill.hint",
    ) -> None:
        teacher_module = find_module(teacher, teacher_layer, f"{field}.teacher_layer", "teacher")
        student_module = find_module(student, student_layer, f"{field}.student_layer", "student")
        self.weight = weight
        self.layers = {"teacher": teacher_layer, "student": student_layer}
        self._active = False
        self._features: dict[str, torch.Tensor] = {}
        self._handles = [
            teacher_module.register_forward_hook(self._hook("teacher")),
            student_module.register_forward_hook(self._hook("student")),
        ]
        try:
            self.adapter = self._build_adapter(teacher, student, probe)
        except BaseException:
            self.close()
            raise

    def _hook(self, role: str) -> Any:
        def capture(module: nn.Module, args: Any, output: Any) -> None:
            if not self._active:
                return  # validation passes and other users of the model pay nothing
            if not isinstance(output, torch.Tensor) or output.dim() not in (2, 4):
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise InputError(
                    f"distill.hint.{role}_layer: '{self.layers[role]}' outputs {shape}; "
                    "a hint layer must output (N, C, H, W) or (N, D)"
                )
            # clone: a following in-place ReLU would otherwise overwrite the captured feature
            self._features[role] = output.clone()

        return capture

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Capture features during the forward passes inside this block."""
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def _build_adapter(self, teacher: nn.Module, student: nn.Module, probe: torch.Tensor) -> nn.Module:
        was_training = student.training
        teacher.eval()
        student.eval()  # eval: the probe must not touch BatchNorm statistics
        try:
            with torch.no_grad(), self.capturing():
                teacher(probe)
                student(probe)
        finally:
            student.train(was_training)
        student_feature, teacher_feature = _reduce(self._features.pop("student"), self._features.pop("teacher"))
        self.shapes = {"teacher": list(teacher_feature.shape[1:]), "student": list(student_feature.shape[1:])}
        in_channels, out_channels = student_feature.shape[1], teacher_feature.shape[1]
        adapter: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1) if student_feature.dim() == 4 else nn.Linear(in_channels, out_channels)
        )
        return adapter.to(probe.device)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.adapter.parameters())

    def loss(self) -> torch.Tensor:
        """MSE between the adapted student feature and the (detached) teacher feature of the last forward."""
        try:
            student, teacher = self._features.pop("student"), self._features.pop("teacher")
        except KeyError as exc:
            raise RuntimeError(f"hint layer {exc} did not run in the forward pass") from None
        student, teacher = _reduce(student, teacher.detach())
        return F.mse_loss(self.adapter(student).float(), teacher.float())

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._features.clear()


def build_hint(
    settings: HintConfig | None, teacher: nn.Module, student: nn.Module, data: DataBundle, device: torch.device
) -> FeatureHint | None:
    """The configured hint (layer names validated against both models), or None when there is none.

    Both models must already be on `device`; two training images probe the feature shapes.
    """
    if settings is None:
        return None
    if settings.weight == 0:  # switched off, but a wrong name is still reported
        find_module(teacher, settings.teacher_layer, "distill.hint.teacher_layer", "teacher")
        find_module(student, settings.student_layer, "distill.hint.student_layer", "student")
        return None
    probe = data.sample(data.train, [0, 1]).to(device)
    return FeatureHint(teacher, student, settings.teacher_layer, settings.student_layer, settings.weight, probe)
