"""The preprocessing contract (preprocess.json / ONNX metadata `preprocess`): image file -> model input.

numpy + Pillow only (Pillow imported on first use, so the rest of the runtime works without it); never torch.
This is the app-side reference implementation; edgekd's eval/export path uses the same PIL operations, so a
Python app gets bit-identical inputs. deploy/js and deploy/cpp implement the same steps:

1. decode; `ImageOps.exif_transpose`; 16-bit grey ("I;16"/"I") is scaled to 8 bits by `>> 8`; then PIL's plain
   `convert(color)` ("RGB" or "L"; alpha is dropped, not composited; CMYK uses PIL's CMYK -> RGB).
2. resize: `resize` an int -> shorter side to `resize`, longer side `int(resize * long / short)` (truncated, as
   torchvision's Resize(int)); `resize` null -> straight to width x height. `Image.resize(size, BILINEAR)`
   (PIL's bilinear antialiases when reducing); skipped when the size is already equal.
3. center crop [ch, cw] when `crop` is not null: top = round((H - ch) / 2), left = round((W - cw) / 2)
   (Python's round, half to even, as torchvision's center_crop).
4. float32 CHW, x = (pixel * scale - mean[c]) / std[c], batch axis added -> (1, C, H, W).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import RuntimeInputError

PREPROCESS_FORMAT = "edgekd-preprocess/2"
FORMULA = "input = (pixel * scale - mean[c]) / std[c]"
_COLOR_CHANNELS = {"RGB": 3, "L": 1}


def _pil() -> tuple[Any, Any]:
    """(PIL.Image, PIL.ImageOps), or a one-line error: decoding image files is the only use of Pillow."""
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:
        raise RuntimeInputError(f"reading image files needs Pillow ({exc}): pip install pillow") from None
    return Image, ImageOps


def _size_pair(value: Any, key: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise RuntimeInputError(f"preprocess: {key} must be an integer or [height, width] (got {value!r})")
    pair = [value, value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                for v in pair):
        raise RuntimeInputError(f"preprocess: {key} must be a positive integer or [height, width] (got {value!r})")
    return pair


def load_preprocess(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """preprocess.json (a path, or the already-parsed object) -> the contract's fields, completed.

    Reads `edgekd-preprocess/2` and the earlier format without "format" (layout/channels/height/width/
    scale/mean/std: no resize or crop, the image is resized straight to height x width). Raises
    RuntimeInputError naming the field at fault."""
    if isinstance(source, Mapping):
        raw, where = dict(source), "preprocess"
    else:
        where = str(source)
        try:
            raw = json.loads(Path(source).read_text(encoding="utf-8"))
        except OSError as exc:
            raise RuntimeInputError(f"{where}: cannot read ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            raise RuntimeInputError(f"{where}: not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise RuntimeInputError(f"{where}: expected a JSON object")
    fmt = raw.get("format")
    if fmt not in (None, PREPROCESS_FORMAT):
        raise RuntimeInputError(f"{where}: format {fmt!r} is not supported (this runtime reads {PREPROCESS_FORMAT})")
    missing = [k for k in ("channels", "height", "width", "mean", "std") if k not in raw]
    if missing:
        raise RuntimeInputError(f"{where}: missing {', '.join(missing)}")
    channels = raw["channels"]
    color = raw.get("color") or {1: "L", 3: "RGB"}.get(channels)
    if color not in _COLOR_CHANNELS or _COLOR_CHANNELS[color] != channels:
        raise RuntimeInputError(f"{where}: color {raw.get('color')!r} with channels {channels!r} is not supported "
                                "(RGB with 3 channels or L with 1)")
    layout = raw.get("layout", "NCHW")
    if layout != "NCHW":
        raise RuntimeInputError(f"{where}: layout {layout!r} is not supported (NCHW)")
    height, width = _size_pair([raw["height"], raw["width"]], "height/width")
    resize = raw.get("resize")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize <= 0):
        raise RuntimeInputError(f"{where}: resize must be a positive integer or null (got {resize!r})")
    crop = _size_pair(raw.get("crop"), "crop")
    if crop is not None and crop != [height, width]:
        raise RuntimeInputError(f"{where}: crop {crop} differs from the model input [height, width] = "
                                f"{[height, width]}")
    if resize is not None and crop is not None and max(crop) > resize:
        raise RuntimeInputError(f"{where}: crop {crop} is larger than resize {resize} (images are never padded)")
    mean, std = [float(v) for v in raw["mean"]], [float(v) for v in raw["std"]]
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise RuntimeInputError(f"{where}: mean and std need {channels} values each, std > 0 "
                                f"(got mean {raw['mean']}, std {raw['std']})")
    interpolation = raw.get("interpolation", "bilinear")
    if interpolation != "bilinear" or raw.get("antialias", True) is not True:
        raise RuntimeInputError(f"{where}: only interpolation 'bilinear' with antialias is supported "
                                f"(got {interpolation!r}, antialias {raw.get('antialias')!r})")
    return {
        "format": PREPROCESS_FORMAT, "input_name": raw.get("input_name", "input"),
        "output_name": raw.get("output_name", "logits"), "layout": "NCHW", "color": color, "channels": channels,
        "resize": resize, "crop": crop, "height": height, "width": width, "interpolation": "bilinear",
        "antialias": True, "scale": float(raw.get("scale", 1 / 255)), "mean": mean, "std": std, "formula": FORMULA,
    }


def preprocess_from_metadata(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The contract from an ONNX model's metadata_props (key `preprocess`, a JSON string), or None."""
    text = metadata.get("preprocess")
    if not text:
        return None
    try:
        return load_preprocess(json.loads(text))
    except json.JSONDecodeError as exc:
        raise RuntimeInputError(f"ONNX metadata 'preprocess' is not JSON ({exc})") from None


def decode_image(path: str | os.PathLike, color: str) -> Any:
    """Step 1: the file as a PIL image in `color` ("RGB" or "L")."""
    Image, ImageOps = _pil()
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)  # a copy with the EXIF orientation applied (and removed)
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RuntimeInputError(f"{path}: not a readable image ({exc})") from None
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: PIL's convert would clip to 255; the contract keeps the high byte, as 16-bit RGB decodes.
        high = np.right_shift(np.asarray(image).astype(np.int64), 8)
        image = Image.fromarray(np.clip(high, 0, 255).astype(np.uint8), "L")
    return image if image.mode == color else image.convert(color)


def resized_size(width: int, height: int, spec: Mapping[str, Any]) -> tuple[int, int]:
    """Step 2's target (width, height): shorter side to `resize` (longer side truncated), or the model size."""
    resize = spec["resize"]
    if resize is None:
        return spec["width"], spec["height"]
    short, long = min(width, height), max(width, height)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, crop_h: int, crop_w: int) -> tuple[int, int, int, int]:
    """Step 3: (left, top, right, bottom) of the centred crop; Python's round is half to even."""
    if crop_h > height or crop_w > width:
        raise RuntimeInputError(f"crop {crop_h}x{crop_w} is larger than the resized image {height}x{width}")
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return left, top, left + crop_w, top + crop_h


def transform_image(image: Any, spec: Mapping[str, Any]) -> np.ndarray:
    """Steps 2-3 on a decoded PIL image -> uint8 array (H, W) or (H, W, 3) of the model's size."""
    Image, _ = _pil()
    size = resized_size(*image.size, spec)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    if spec["crop"] is not None:
        image = image.crop(center_crop_box(*image.size, *spec["crop"]))
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.shape[:2] != (spec["height"], spec["width"]):
        raise RuntimeInputError(f"preprocessing gives {pixels.shape[0]}x{pixels.shape[1]}, the model takes "
                                f"{spec['height']}x{spec['width']} (resize {spec['resize']} needs a crop)")
    return pixels


def normalize(pixels: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """Step 4: uint8 (H, W) or (H, W, C) -> float32 (1, C, H, W), x = (pixel * scale - mean[c]) / std[c]."""
    chw = (pixels[:, :, None] if pixels.ndim == 2 else pixels).transpose(2, 0, 1).astype(np.float32)
    mean = np.asarray(spec["mean"], np.float32)[:, None, None]
    std = np.asarray(spec["std"], np.float32)[:, None, None]
    return ((chw * np.float32(spec["scale"]) - mean) / std)[None].astype(np.float32)


def image_to_input(path: str | os.PathLike, spec: Mapping[str, Any]) -> np.ndarray:
    """An image file -> the model input (1, C, H, W) float32, exactly as the contract says."""
    spec = spec if spec.get("format") == PREPROCESS_FORMAT and "color" in spec else load_preprocess(spec)
    return normalize(transform_image(decode_image(path, spec["color"]), spec), spec)
