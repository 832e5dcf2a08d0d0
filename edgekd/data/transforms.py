"""What the image-file datasets' pixels go through: the eval geometry (resize, crop, input size) resolved from
the config and the pretrained weights' defaults, and the training augmentation (torchvision transforms on PIL
images, run in the DataLoader workers)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgekd.data.config import AugmentConfig, DataConfig
from edgekd.errors import InputError

LEGACY_SIZE = 32  # imagefolder's square size when nothing says otherwise (edgekd 0.1 behaviour)


@dataclass(frozen=True)
class Geometry:
    resize: int | None  # None: squash to (height, width)
    crop: tuple[int, int] | None
    height: int
    width: int

    @property
    def squash(self) -> bool:
        return self.resize is None


def _as_pair(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


def resolve_geometry(cfg: DataConfig, defaults: Mapping[str, Any] | None = None) -> Geometry:
    """The config's resize/crop, else the pretrained weights' (`defaults`), else the legacy square.

    `image_size` (legacy) squashes to a square; `resize` alone crops a square of that size; `crop` alone
    resizes the shorter side to the crop's larger side.
    """
    defaults = defaults or {}
    if cfg.image_size is not None:
        return Geometry(None, None, cfg.image_size, cfg.image_size)
    resize = cfg.resize if cfg.resize is not None else defaults.get("resize")
    crop = cfg.crop_size if cfg.crop is not None else _as_pair(defaults.get("crop"))
    if resize is None and crop is None:
        return Geometry(None, None, LEGACY_SIZE, LEGACY_SIZE)
    if crop is None:
        crop = (int(resize), int(resize))
    if resize is None:
        resize = max(crop)
    if max(crop) > resize:
        raise InputError(f"data.crop: {list(crop)} does not fit in data.resize {resize} (crop <= resize; the "
                         "pretrained weights' defaults apply to whichever of the two is not set)")
    return Geometry(int(resize), crop, crop[0], crop[1])


def resolve_statistics(cfg: DataConfig, defaults: Mapping[str, Any] | None,
                       channels: int) -> tuple[list[float], list[float]] | None:
    """Explicit mean/std, else the pretrained weights' (averaged to one value for grey input), else None
    (measured on the data)."""
    defaults = defaults or {}
    mean = cfg.mean if cfg.mean is not None else defaults.get("mean")
    std = cfg.std if cfg.std is not None else defaults.get("std")
    if mean is None or std is None:
        return None
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if channels == 1 and len(mean) == 3 and cfg.mean is None:  # RGB weights' statistics on grey input
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    for key, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise InputError(f"data.{key}: {len(values)} values for {channels} channel(s)")
    return mean, std


def train_transform(geometry: Geometry, augment: AugmentConfig) -> Callable[[Any], Any] | None:
    """The training augmentation on decoded PIL images (RandomResizedCrop, flips, TrivialAugment/RandAugment),
    or None where the eval transform is used and the batch is augmented as a tensor (legacy squashed sizes:
    shifts + flips, as before)."""
    if geometry.squash:
        return None
    from torchvision import transforms as T

    steps: list[Any] = []
    if augment.random_resized_crop:
        steps.append(T.RandomResizedCrop((geometry.height, geometry.width), scale=tuple(augment.scale),
                                         interpolation=T.InterpolationMode.BILINEAR, antialias=True))
    else:
        steps += [T.Resize(geometry.resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                  T.CenterCrop((geometry.height, geometry.width))]
    if augment.horizontal_flip:
        steps.append(T.RandomHorizontalFlip())
    if augment.policy == "trivialaugment":
        steps.append(T.TrivialAugmentWide(interpolation=T.InterpolationMode.BILINEAR))
    elif augment.policy == "randaugment":
        steps.append(T.RandAugment(magnitude=augment.randaugment_magnitude,
                                   interpolation=T.InterpolationMode.BILINEAR))
    return T.Compose(steps)
