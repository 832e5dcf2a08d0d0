"""The `data:` section of pipeline.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edgekd.validation import Section


class SyntheticConfig(Section):
    num_samples: int = Field(2000, gt=0)
    """Images generated (class-dependent patterns plus noise; learnable, for fast tests)."""
    num_classes: int = Field(4, ge=2)
    """Number of classes."""
    image_size: int = Field(16, ge=4)
    """Height and width."""
    channels: Literal[1, 3] = 1
    """1 (grey) or 3 (RGB)."""
    noise: float = Field(0.5, ge=0)
    """Standard deviation of the Gaussian noise added to the class pattern."""


class AugmentConfig(Section):
    """Training augmentation of image files (imagefolder / filelist) when the training section's `augment` is on.
    Bundled datasets keep their own (shifts of up to 2 pixels, plus flips for cifar10)."""

    random_resized_crop: bool = True
    """RandomResizedCrop(crop) instead of the eval resize + center crop."""
    scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop: range of the cropped area as a fraction of the image."""
    horizontal_flip: bool = True
    """Random horizontal flips (p = 0.5)."""
    policy: Literal["none", "trivialaugment", "randaugment"] = "none"
    """Extra automatic augmentation: TrivialAugmentWide or RandAugment (torchvision)."""
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    """RandAugment magnitude."""
    mixup_alpha: float = Field(0.0, ge=0)
    """Mixup of batch pairs with a Beta(alpha, alpha) weight (0: off); the targets become soft labels."""
    cutmix_alpha: float = Field(0.0, ge=0)
    """CutMix of batch pairs with a Beta(alpha, alpha) area (0: off); with mixup on too, one of them per batch."""

    @model_validator(mode="after")
    def _check_scale(self) -> AugmentConfig:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale: needs 0 < low <= high <= 1 (got [{low}, {high}])")
        return self


LIST_SUFFIXES = (".csv", ".jsonl")


class DataConfig(Section):
    dataset: Literal["mnist5k", "digits", "synthetic", "imagefolder", "filelist", "cifar10"] = "mnist5k"
    """mnist5k (bundled, offline) | digits (sklearn 8x8, offline) | synthetic | imagefolder (a folder of class
    folders, or of train/val/test folders of class folders) | filelist (a .csv or .jsonl list of path,label) |
    cifar10."""
    root: Path | None = None
    """imagefolder: `root/<class>/<image>` or `root/{train,val,test}/<class>/<image>` (each class folder with at
    least one image: an empty one is refused, as it would be a label no model output predicts); filelist: the
    .csv (header `path,label`) or .jsonl (`{"path": ..., "label": ...}` per line) file, paths relative to it,
    labels as class names; cifar10: torchvision's on-disk format."""
    val_root: Path | None = None
    """imagefolder / filelist: a separate validation folder or list; without it the split comes from `root`."""
    download: bool = False
    """cifar10 only: download into `root` when missing (needs internet)."""
    image_size: int | None = Field(None, ge=4)
    """imagefolder / filelist, legacy: squash every image to this square size (no aspect ratio kept, no crop);
    use `resize` + `crop` for photos. Default when none of them is set: 32."""
    resize: int | None = Field(None, ge=4)
    """imagefolder / filelist: resize the shorter side to this many pixels, aspect ratio kept (PIL bilinear with
    antialias); default: `crop`'s larger side, or the pretrained weights' own value."""
    crop: int | tuple[int, int] | None = None
    """imagefolder / filelist: center crop after the resize, an int or [height, width]; it is the model's input
    size (default: `resize` square, or the pretrained weights' own value). Must fit inside `resize`."""
    mean: list[float] | None = None
    """Per-channel mean of the input normalization (default: the pretrained weights', else measured on a sample
    of the training split; mnist5k and cifar10 use their usual values)."""
    std: list[float] | None = None
    """Per-channel standard deviation of the input normalization (defaults as `mean`)."""
    channels: Literal[1, 3] | None = None
    """imagefolder: convert images to 1 or 3 channels (default: as the first image is, 1 for grey, 3 for colour)."""
    augment: AugmentConfig = AugmentConfig()
    """Training augmentation of image files (used when the training section's `augment` is true)."""
    num_workers: int | Literal["auto"] = "auto"
    """imagefolder / filelist: DataLoader worker processes decoding images (auto: the cores this process may
    use; 0: decode in the training process). Does not change results: augmentation is seeded per sample."""
    prefetch_factor: int = Field(4, ge=1)
    """Batches each worker prepares ahead."""
    on_bad_image: Literal["error", "skip"] = "error"
    """An image that cannot be decoded: error (stop, naming the file) | skip (leave it out; counted in the log
    and report)."""
    val_fraction: float = Field(0.1, gt=0, lt=1)
    """Fraction of the data held out for validation (model selection, quantization checks)."""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Fraction held out for the final test accuracy; never used for training, calibration or selection."""
    batch_size: int = Field(128, gt=0)
    """Training batch size (per process under torchrun: the global batch is batch_size x world size)."""
    eval_batch_size: int = Field(512, gt=0)
    """Batch size for evaluation."""
    limit: int | None = Field(None, gt=0)
    """Use at most this many samples in total (quick experiments)."""
    synthetic: SyntheticConfig = SyntheticConfig()
    """Settings of the synthetic dataset."""

    @field_validator("num_workers")
    @classmethod
    def _check_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"must be >= 0 or auto (got {value})")
        return value

    @field_validator("crop")
    @classmethod
    def _check_crop(cls, value: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        sizes = [value] if isinstance(value, int) else list(value or [])
        if any(size < 4 for size in sizes):
            raise ValueError(f"must be >= 4 pixels (got {value})")
        return value

    def view(self) -> dict:
        """The section in the fingerprint: loader knobs that never change results are left out."""
        view = super().view()
        for knob in ("num_workers", "prefetch_factor"):
            view.pop(knob, None)
        return view

    @property
    def crop_size(self) -> tuple[int, int] | None:
        """`crop` as (height, width)."""
        if self.crop is None:
            return None
        return (self.crop, self.crop) if isinstance(self.crop, int) else (int(self.crop[0]), int(self.crop[1]))

    @model_validator(mode="after")
    def _check_fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction must be < 0.9 (got {self.val_fraction} + {self.test_fraction})"
            )
        if self.dataset in ("imagefolder", "filelist", "cifar10") and self.root is None:
            raise ValueError(f"root: required for dataset '{self.dataset}'")
        if self.dataset == "filelist":
            for key, path in (("root", self.root), ("val_root", self.val_root)):
                if path is not None and Path(path).suffix.lower() not in LIST_SUFFIXES:
                    raise ValueError(f"{key}: a filelist is a .csv or .jsonl file (got {Path(path).name})")
        if self.image_size is not None and (self.resize is not None or self.crop is not None):
            raise ValueError("image_size: squashes to a square; it cannot be combined with resize/crop (drop it)")
        crop = self.crop_size
        if crop is not None and self.resize is not None and max(crop) > self.resize:
            # the shorter side is `resize`: a larger crop would need padding, which no app reproduces
            raise ValueError(f"crop: {list(crop)} does not fit in resize {self.resize} (crop <= resize)")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and self.channels is not None and len(values) != self.channels:
                raise ValueError(f"{key}: {len(values)} values for {self.channels} channel(s)")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError(f"std: must be > 0 (got {self.std})")
        return self
