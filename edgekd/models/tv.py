"""torchvision architectures (weights=None: nothing is downloaded) adapted to the dataset."""

from __future__ import annotations

from typing import Any

from torch import nn

from edgekd.errors import InputError


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d] | None:
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Conv2d):
                return module, child_name, child
    return None


def create_torchvision(
    name: str, num_classes: int, in_channels: int, input_size: int, kwargs: dict[str, Any], field: str
) -> nn.Module:
    import torchvision

    try:
        available = torchvision.models.list_models(module=torchvision.models)
    except Exception:  # noqa: BLE001 - older torchvision
        available = []
    if available and name not in available:
        raise InputError(f"{field}: torchvision has no model '{name}' (e.g. resnet18, mobilenet_v2, mobilenet_v3_small)")
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{field}: torchvision:{name}: {type(exc).__name__}: {exc}") from None
    small = input_size <= 64
    found = _first_conv(model)
    if found is not None:
        parent, child_name, conv = found
        if in_channels != conv.in_channels or small:
            # Small inputs: a 3x3 stride-1 stem instead of 7x7/2 (+ max-pool), the usual CIFAR adaptation.
            kernel, stride, padding = ((3, 3), 1, 1) if small else (conv.kernel_size, conv.stride, conv.padding)
            setattr(
                parent,
                child_name,
                nn.Conv2d(in_channels, conv.out_channels, kernel, stride=stride, padding=padding, bias=conv.bias is not None),
            )
    if small and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
    return model
