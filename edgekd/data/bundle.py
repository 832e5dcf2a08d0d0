"""Datasets: bundled (mnist5k, digits), synthetic, imagefolder, cifar10 (torchvision on-disk format).

Every dataset is decoded once into uint8 tensors (N, C, H, W) and split deterministically from the seed into
train / val / test; batches are normalized on the fly. The test split is never used for training,
calibration or model selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from edgekd.data.config import DataConfig
from edgekd.errors import InputError

if TYPE_CHECKING:
    from edgekd.data.sources import Loaded

# Normalization is computed on the training split; a few datasets use the statistics everyone quotes.
_KNOWN_STATS = {
    "mnist5k": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


@dataclass
class Split:
    """One split held in memory: uint8 images (N, C, H, W) and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DataMeta:
    dataset: str
    num_classes: int
    channels: int
    height: int
    width: int
    mean: list[float]
    std: list[float]
    labels: list[str]
    natural_images: bool = False  # horizontal flips are a valid augmentation (not for digits)
    split_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def preprocess(self) -> dict:
        """What an app needs to turn an image into the model's input (preprocess.json)."""
        return {
            "layout": "NCHW",
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "scale": 1 / 255,
            "mean": self.mean,
            "std": self.std,
            "formula": "input = (pixel * scale - mean[c]) / std[c]",
            "input_name": "input",
            "output_name": "logits",
        }


@dataclass
class DataBundle:
    train: Split
    val: Split
    test: Split
    meta: DataMeta

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalized float32, on the images' device."""
        mean = torch.tensor(self.meta.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.meta.std, device=images.device).view(1, -1, 1, 1)
        return (images.float().div_(255.0) - mean) / std

    def normalized(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """A whole split as (float32 NCHW normalized inputs, int64 labels) numpy arrays."""
        part: Split = getattr(self, split)
        return self.normalize(part.images).numpy(), part.labels.numpy().astype(np.int64)


def _split_indices(n: int, cfg: DataConfig, seed: int, with_test: bool = True) -> tuple[np.ndarray, ...]:
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * cfg.test_fraction)) if with_test else 0
    n_val = int(round(n * cfg.val_fraction))
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


def _check_classes(labels: np.ndarray, loaded: Loaded) -> int:
    """The model's output count: one per class name (labels.json lists exactly these), whatever data.limit keeps."""
    classes = np.unique(labels)
    if len(classes) < 2:
        raise InputError(f"{loaded.source}: needs at least 2 classes (found {len(classes)})")
    if int(labels.max()) >= len(loaded.class_names):
        raise InputError(f"{loaded.source}: label {int(labels.max())} but only {len(loaded.class_names)} classes")
    return len(loaded.class_names)


def _stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    pixels = images.float().div(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    std = pixels.std(dim=1).clamp_min(1e-3)
    return [round(v, 4) for v in pixels.mean(dim=1).tolist()], [round(v, 4) for v in std.tolist()]


def _limit(images: np.ndarray, labels: np.ndarray, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if limit is None or limit >= len(labels):
        return images, labels
    keep = np.sort(np.random.default_rng(seed + 1).permutation(len(labels))[:limit])
    return images[keep], labels[keep]


def load_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Load, split and describe the configured dataset."""
    from edgekd.data import sources

    loaded = sources.load_source(cfg, seed)
    images, labels = _limit(loaded.images, loaded.labels, cfg.limit, seed)
    num_classes = _check_classes(labels, loaded)
    if loaded.separate_test is not None:
        test_images, test_labels = _limit(*loaded.separate_test, cfg.limit, seed)
        train_idx, val_idx, _ = _split_indices(len(labels), cfg, seed, with_test=False)
        test = Split(torch.from_numpy(test_images), torch.from_numpy(test_labels))
    else:
        train_idx, val_idx, test_idx = _split_indices(len(labels), cfg, seed)
        test = Split(torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx]))
    if loaded.separate_val is not None:
        train_idx = np.concatenate([train_idx, val_idx])
        val = Split(torch.from_numpy(loaded.separate_val[0]), torch.from_numpy(loaded.separate_val[1]))
    else:
        val = Split(torch.from_numpy(images[val_idx]), torch.from_numpy(labels[val_idx]))
    train = Split(torch.from_numpy(images[np.sort(train_idx)]), torch.from_numpy(labels[np.sort(train_idx)]))
    for name, part in (("train", train), ("val", val), ("test", test)):
        if len(part) == 0:
            raise InputError(f"{loaded.source}: the {name} split is empty ({len(labels)} samples); use more data")
    mean, std = _KNOWN_STATS.get(cfg.dataset) or _stats(train.images)
    _, channels, height, width = train.images.shape
    meta = DataMeta(
        dataset=cfg.dataset,
        num_classes=num_classes,
        channels=int(channels),
        height=int(height),
        width=int(width),
        mean=list(mean),
        std=list(std),
        labels=list(loaded.class_names),
        natural_images=loaded.natural_images,
        split_sizes={"train": len(train), "val": len(val), "test": len(test)},
    )
    return DataBundle(train=train, val=val, test=test, meta=meta)
