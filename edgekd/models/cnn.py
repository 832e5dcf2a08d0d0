"""The built-in CNN family for small inputs (8x8 to 64x64): conv-BN-ReLU stages, global pooling, linear head.

Stages are named `stage1..stageN` and the classifier `head`, so hint layers and ignore lists read well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, separable: bool = False, stride: int = 1) -> nn.Sequential:
    if separable and in_channels > 1:
        # depthwise 3x3 then pointwise 1x1: MobileNet-style, far fewer MACs per output channel
        return nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class EdgeCNN(nn.Module):
    """widths[i] channels in stage i+1, `blocks` conv blocks per stage, 2x2 max-pool between stages.

    `stem_stride=2` makes the very first convolution downsample and drops the max-pool before stage 2, so
    the feature-map sizes of stages 2+ are unchanged while stage 1 runs on a quarter of the pixels. On CPUs
    this is the cheapest place to save time at batch 1: a 1- or 3-channel input convolution is a tiny-K GEMM
    over the full-resolution image, which int8 kernels handle especially badly.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        input_size: int = 28,
        widths: Sequence[int] = (32, 64, 128),
        blocks: int = 2,
        separable: bool = False,
        dropout: float = 0.0,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be positive integers (got {list(widths)})")
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1 (got {blocks})")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2 (got {stem_stride})")
        self.num_stages = len(widths)
        channels = in_channels
        size = input_size
        strided_stem = stem_stride == 2 and size >= 4
        if strided_stem:
            size = (size + 1) // 2
        for index, width in enumerate(widths):
            layers: list[nn.Module] = []
            # pool before every stage but the first (and the second after a strided stem), while the
            # feature map is still at least 2x2
            if index > (1 if strided_stem else 0) and size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            for block in range(blocks):
                stride = 2 if strided_stem and index == 0 and block == 0 else 1
                layers.append(conv_bn_relu(channels, int(width), separable, stride))
                channels = int(width)
            self.add_module(f"stage{index + 1}", nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in range(self.num_stages):
            x = getattr(self, f"stage{index + 1}")(x)
        return self.head(self.dropout(torch.flatten(self.pool(x), 1)))


# Members of the family: (widths, blocks, separable). Parameter counts are for 1-channel 28x28, 10 classes.
CNN_PRESETS: dict[str, dict] = {
    "cnn_large": {"widths": (32, 64, 128), "blocks": 2},  # ~287k params, ~29M MACs: a teacher
    "cnn_medium": {"widths": (16, 32, 64), "blocks": 2},  # ~72k params
    "cnn_small": {"widths": (8, 16, 32), "blocks": 1},  # ~6k params: a student
    "cnn_tiny": {"widths": (4, 8, 16), "blocks": 1},  # ~1.6k params
    "cnn_small_ds": {"widths": (16, 32, 64), "blocks": 1, "separable": True},  # depthwise-separable student
}
