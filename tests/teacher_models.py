"""ONNX teachers exported from small torch models, as users bring them: NCHW (PyTorch), NHWC with a softmax
output (what tf2onnx makes of a Keras classifier), and the malformed ones edgekd must refuse."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


class NHWCInput(nn.Module):
    """Takes [N, H, W, C] like a TensorFlow model: the export starts with a Transpose node."""

    def __init__(self, inner: nn.Module, softmax: bool = False) -> None:
        super().__init__()
        self.inner, self.softmax = inner, softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x.permute(0, 3, 1, 2))
        return logits.softmax(dim=1) if self.softmax else logits


class TwoInputs(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.inner(x * mask)


class Features(nn.Module):
    """Returns the feature map (rank 4), not logits."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.stage1(x)


def export(model: nn.Module, path: Path, example: torch.Tensor | tuple[torch.Tensor, ...],
           dynamic_batch: bool = True) -> Path:
    """torch.onnx.export (TorchScript exporter) with every input's and the output's batch axis dynamic."""
    examples = example if isinstance(example, tuple) else (example,)
    names = ["image", "mask"][: len(examples)]
    axes = {name: {0: "batch"} for name in [*names, "scores"]} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is legacy
        torch.onnx.export(model.eval(), examples, str(path), input_names=names, output_names=["scores"],
                          dynamic_axes=axes, opset_version=17, dynamo=False, external_data=False)
    return path
