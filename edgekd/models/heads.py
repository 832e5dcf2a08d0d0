"""Where a classification network's head is (what pruning keeps, pretrained models replace, freezing spares)."""

from __future__ import annotations

from torch import nn


def classifier_name(model: nn.Module) -> str | None:
    """Name of the final classification layer (the last Linear, or last Conv when there is none)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                last = name
    return last
