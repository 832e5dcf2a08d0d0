"""Image files to model inputs, exactly as the preprocessing contract (`preprocess.json`, format
edgekd-preprocess/2) says, with PIL: decode, EXIF orientation, colour conversion, resize, center crop.

The eval path (and so the exported model's expected input) is `EvalTransform.apply`; apps written in Python
that call PIL the same way get bit-identical pixels. Torch-free: the DataLoader workers call it, and so can
anything that only has numpy and PIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import InputError

PREPROCESS_FORMAT = "edgekd-preprocess/2"
FORMULA = "input = (pixel * scale - mean[c]) / std[c]"
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class BadImage(InputError):
    """An image file that cannot be decoded (the message names the file)."""


def open_image(path: str | Path) -> Any:
    """Image.open with PIL's decompression-bomb guard as a one-line error naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except Image.DecompressionBombError as exc:  # not an OSError: PIL raises it for > 2x MAX_IMAGE_PIXELS
        raise BadImage(f"{path}: refused: image too large, a decompression bomb? ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadImage(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None


def bands_to_color(bands: int) -> str:
    """The colour an image is read with when data.channels is not set: L / LA -> grey, else RGB."""
    return "L" if bands in (1, 2) else "RGB"


def decode(path: str | Path, color: str) -> Any:
    """The file as a PIL image in `color` ("L" or "RGB"): EXIF orientation applied, 16-bit samples scaled to
    8 bits (>> 8), then PIL's plain `convert` (alpha dropped, CMYK and palettes converted by PIL)."""
    from PIL import Image, ImageOps

    with open_image(path) as image:
        try:
            image = ImageOps.exif_transpose(image)  # a loaded copy
            if image.mode in _SIXTEEN_BIT:
                wide = np.asarray(image, dtype=np.int64) >> 8
                image = Image.fromarray(wide.clip(0, 255).astype(np.uint8), "L")
            return image.convert(color)
        except (OSError, ValueError, SyntaxError) as exc:  # SyntaxError: some truncated formats (PIL's choice)
            raise BadImage(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) with the shorter side `resize`, the longer truncated as torchvision's Resize(int) does."""
    short, long = min(width, height), max(width, height)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, crop_h: int, crop_w: int) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of torchvision's center_crop (Python round: half to even)."""
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return left, top, left + crop_w, top + crop_h


@dataclass(frozen=True)
class EvalTransform:
    """Decode + resize + center crop of the contract; `resize` None squashes to (width, height)."""

    color: str  # "L" or "RGB"
    height: int
    width: int
    resize: int | None = None
    crop: tuple[int, int] | None = None  # (h, w)

    @property
    def channels(self) -> int:
        return 1 if self.color == "L" else 3

    def resize_image(self, image: Any) -> Any:
        from PIL import Image

        size = (self.width, self.height) if self.resize is None else resized_size(*image.size, self.resize)
        return image if image.size == size else image.resize(size, Image.BILINEAR)

    def crop_image(self, image: Any) -> Any:
        if self.crop is None:
            return image
        width, height = image.size
        crop_h, crop_w = self.crop
        if crop_h > height or crop_w > width:  # cannot happen with crop <= resize; never padded
            raise InputError(f"data.crop: {list(self.crop)} larger than the resized image {height}x{width}")
        return image.crop(center_crop_box(width, height, crop_h, crop_w))

    def apply(self, image: Any) -> Any:
        """A decoded PIL image -> the model-sized PIL image."""
        return self.crop_image(self.resize_image(image))

    def load(self, path: str | Path) -> np.ndarray:
        """A file -> uint8 (C, H, W)."""
        return to_chw(self.apply(decode(path, self.color)))


def to_chw(image: Any) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def preprocess_record(*, color: str, height: int, width: int, resize: int | None, crop: tuple[int, int] | None,
                      mean: list[float], std: list[float]) -> dict[str, Any]:
    """The preprocessing contract's object (preprocess.json and the ONNX metadata key `preprocess`)."""
    return {
        "format": PREPROCESS_FORMAT,
        "input_name": "input",
        "output_name": "logits",
        "layout": "NCHW",
        "color": color,
        "channels": 1 if color == "L" else 3,
        "resize": resize,
        "crop": list(crop) if crop is not None else None,
        "height": height,
        "width": width,
        "interpolation": "bilinear",
        "antialias": True,
        "scale": 1 / 255,
        "mean": list(mean),
        "std": list(std),
        "formula": FORMULA,
    }


def reference_input(path: str | Path, record: dict[str, Any]) -> np.ndarray:
    """A file -> the float32 (1, C, H, W) model input a preprocess record describes (numpy + PIL only)."""
    crop = record["crop"]
    transform = EvalTransform(record["color"], record["height"], record["width"], record["resize"],
                              tuple(crop) if crop is not None else None)
    pixels = transform.load(path).astype(np.float32)
    mean = np.asarray(record["mean"], np.float32).reshape(-1, 1, 1)
    std = np.asarray(record["std"], np.float32).reshape(-1, 1, 1)
    return ((pixels * np.float32(record["scale"]) - mean) / std)[None]
