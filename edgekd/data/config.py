"""The `data:` section of pipeline.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

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


class DataConfig(Section):
    dataset: Literal["mnist5k", "digits", "synthetic", "imagefolder", "cifar10"] = "mnist5k"
    """mnist5k (bundled, offline) | digits (sklearn 8x8, offline) | synthetic | imagefolder | cifar10."""
    root: Path | None = None
    """Folder for imagefolder (one sub-folder per class, each with at least one image: an empty class folder is
    refused, as it would be a label no model output predicts) and cifar10 (torchvision on-disk format)."""
    val_root: Path | None = None
    """imagefolder only: a separate validation folder; without it the split comes from `root`."""
    download: bool = False
    """cifar10 only: download into `root` when missing (needs internet)."""
    image_size: int | None = Field(None, ge=4)
    """imagefolder: resize images to this square size (default 32)."""
    channels: Literal[1, 3] | None = None
    """imagefolder: convert images to 1 or 3 channels (default: as the first image is, 1 for grey, 3 for colour)."""
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

    @model_validator(mode="after")
    def _check_fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction must be < 0.9 (got {self.val_fraction} + {self.test_fraction})"
            )
        if self.dataset in ("imagefolder", "cifar10") and self.root is None:
            raise ValueError(f"root: required for dataset '{self.dataset}'")
        return self
