"""Pretrained weights for `torchvision:<name>` (`weights: DEFAULT | <enum name>`) and `timm:<name>`
(`pretrained: true`), strictly offline: nothing is downloaded during a run.

The weights file is looked up in the library's own cache BEFORE the library is called (torchvision: torch
hub's `checkpoints/<file name of the weights' URL>`; timm: the Hugging Face hub cache, or torch hub's for
URL-only weights), so a missing file is one exit-2 line naming the model, the cache path and the one command
that fetches it, never a network timeout. torchvision's loader unpickles the cache file with
`weights_only=False`; the file is read with `weights_only=True` first, so only plain tensors are ever loaded.

`weights_preprocessing` gives the eval transform the weights were trained with (resize, crop, mean, std), the
data side's defaults when pretrained weights are used.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from edgekd.errors import InputError

# torchvision builders that set architecture arguments themselves when given weights (and whose state_dict
# only fits with them): the architecture-only build (weights not loaded: a checkpoint follows) repeats them.
_TORCHVISION_WEIGHTS_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"transform_input": True, "aux_logits": False, "init_weights": False},
    "inception_v3": {"transform_input": True, "aux_logits": False, "init_weights": False},
}


def on_meta_device() -> bool:
    """True inside `with torch.device("meta")` (pre-flight builds): shapes only, no weights are read."""
    return torch.get_default_device().type == "meta"


# --------------------------------------------------------------------------------------------------
# torchvision


def torchvision_weights(name: str, weights: str, field: str) -> Any:
    """The weights enum member for `weights` ('DEFAULT', 'IMAGENET1K_V1' or 'ResNet18_Weights.IMAGENET1K_V1')."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (KeyError, ValueError):
        raise InputError(f"{field}: torchvision has no pretrained weights for '{name}'") from None
    short = weights.split(".", 1)[1] if weights.startswith(f"{enum.__name__}.") else weights
    if short not in enum.__members__:
        valid = ", ".join(["DEFAULT", *(n for n in enum.__members__ if n != "DEFAULT")])
        raise InputError(f"{field}: '{weights}' is not a weights name of torchvision:{name} (valid: {valid})")
    return enum[short]


def torchvision_cache_file(weights: Any) -> Path:
    """Where torch hub keeps (and torchvision's builders read) this weights enum member's file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def fetch_command(spec: str, weights: str | bool) -> str:
    """The one command that puts the weights of `spec` into the local cache (run where there is a network)."""
    library, _, name = spec.partition(":")
    if library == "timm":
        return f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
    return f"python -c \"import torchvision; torchvision.models.get_model('{name}', weights='{weights}')\""


def _missing(spec: str, weights: str | bool, where: str, field: str) -> InputError:
    label = f"{spec} (weights {weights})" if isinstance(weights, str) else f"{spec} (pretrained)"
    return InputError(f"{field}: the pretrained weights of {label} are not in the local cache ({where}); edgekd "
                      f"downloads nothing during a run: fetch them once with: {fetch_command(spec, weights)}")


def _check_plain_tensors(path: Path, field: str) -> None:
    """Read the cache file with weights_only=True: torchvision's own loader would unpickle anything."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{field}: {path}: refused to load: not a plain weights file") from None
    except Exception as exc:  # noqa: BLE001 - a truncated download fails in many ways
        raise InputError(f"{field}: {path}: corrupt or truncated weights file ({type(exc).__name__}: "
                         f"{str(exc)[:120]}); delete it and fetch it again") from None


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def replace_head(model: nn.Module, num_classes: int) -> str | None:
    """Swap the classifier (the last Linear, or the last Conv2d where there is none, e.g. SqueezeNet) for a
    freshly initialised one with `num_classes` outputs; every other weight stays. Returns its name."""
    from edgekd.models.heads import classifier_name

    name = classifier_name(model)
    if name is None:
        return None
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, stride=old.stride, padding=old.padding,
                        bias=old.bias is not None)
    _replace_module(model, name, new.to(old.weight.device))
    return name


def adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Make the first convolution take `in_channels` while keeping its pretrained filters: for 1 channel the
    RGB filters are summed (a grey image is R = G = B, so the response is unchanged); otherwise they are
    tiled and scaled by 3 / in_channels (timm's `adapt_input_conv` rule)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            if module.groups != 1:
                raise InputError(f"cannot adapt the grouped first convolution '{name}' to {in_channels} channels")
            weight = module.weight.detach()
            if in_channels == 1:
                adapted = weight.sum(dim=1, keepdim=True)
            else:
                repeats = -(-in_channels // weight.shape[1])
                adapted = weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation, bias=module.bias is not None,
                            padding_mode=module.padding_mode).to(weight.device)
            with torch.no_grad():
                new.weight.copy_(adapted)
                if module.bias is not None:
                    new.bias.copy_(module.bias)
            _replace_module(model, name, new)
            return


def create_torchvision_pretrained(name: str, weights: str, num_classes: int, in_channels: int,
                                  kwargs: dict[str, Any], field: str, load: bool = True) -> nn.Module:
    """torchvision `name` with pretrained `weights` (loaded from the local cache when `load`), the head replaced
    for `num_classes` and the first convolution adapted to `in_channels`. The architecture is the one the
    weights were trained for (no small-input stem change), so `load=False` builds exactly what a checkpoint
    of the loaded model fits."""
    import torchvision

    member = torchvision_weights(name, weights, field.replace(".model", ".weights"))
    if "num_classes" in kwargs:
        raise InputError(f"{field}: model_kwargs.num_classes is set from the data with pretrained weights; remove it")
    cache = torchvision_cache_file(member)
    if load and not cache.is_file():  # pre-flight (meta device) checks it too: found before any work
        raise _missing(f"torchvision:{name}", weights, str(cache), field.replace(".model", ".weights"))
    try:
        if load and not on_meta_device():
            _check_plain_tensors(cache, field.replace(".model", ".weights"))
            model = torchvision.models.get_model(name, weights=member, **kwargs)
        else:
            arch = {**_TORCHVISION_WEIGHTS_KWARGS.get(name, {}), **kwargs}
            model = torchvision.models.get_model(name, weights=None, num_classes=len(member.meta["categories"]),
                                                 **arch)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{field}: torchvision:{name} (weights {weights}): {type(exc).__name__}: {exc}") from None
    replace_head(model, num_classes)
    adapt_first_conv(model, in_channels)
    return model


# --------------------------------------------------------------------------------------------------
# timm


def import_timm(field: str) -> Any:
    try:
        import timm
    except ImportError:
        raise InputError(f"{field}: timm models need timm, which is not installed: pip install 'edgekd[timm]'") from None
    return timm


def timm_cached_weights(timm: Any, name: str) -> tuple[Path | None, list[str]]:
    """(the cached weights file timm would load for `name`, the places looked at): the Hugging Face hub cache
    (model.safetensors, then pytorch_model.bin), then torch hub's checkpoints/ for URL-only weights."""
    cfg = timm.models.get_pretrained_cfg(name)
    looked: list[str] = []
    if cfg is None:
        return None, looked
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found), looked
        looked.append(f"{constants.HF_HUB_CACHE}/models--{repo.replace('/', '--')}")
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return path, looked
        looked.append(str(path))
    return None, looked


def create_timm(name: str, num_classes: int, in_channels: int, kwargs: dict[str, Any], field: str,
                pretrained: bool = False, load: bool = True) -> nn.Module:
    """timm `name` for the data (timm replaces the head and adapts the first convolution itself when it loads
    pretrained weights). Pretrained weights are read from the local cache file found here, never fetched."""
    timm = import_timm(field)
    if not timm.is_model(name):
        raise InputError(f"{field}: timm has no model '{name}' (e.g. mobilenetv3_small_100, efficientnet_b0)")
    options: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_channels, **kwargs}
    if pretrained:
        key = field.replace(".model", ".pretrained")
        if timm.models.get_pretrained_cfg(name) is None:
            raise InputError(f"{key}: timm has no pretrained weights for '{name}'")
        path, looked = timm_cached_weights(timm, name) if load else (None, [])
        if load and path is None:
            raise _missing(f"timm:{name}", True, " or ".join(looked), key)
        if load and path is not None and not on_meta_device():
            if path.suffix != ".safetensors":  # safetensors holds tensors only by design
                _check_plain_tensors(path, key)
            options.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    try:
        return timm.create_model(name, **options)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{field}: timm:{name}: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# The weights' own preprocessing


def weights_preprocessing(spec: str, weights: str | bool | None) -> dict[str, Any] | None:
    """{resize, crop, mean, std, interpolation} of the eval transform the pretrained weights were trained with,
    or None without pretrained weights. torchvision: `Weights.transforms()` (e.g. resize 256 or 232, crop
    224, ImageNet statistics); timm: `resolve_data_config` (resize = floor(crop / crop_pct)). Reads no
    weights file and downloads nothing. `interpolation` is the library's; the edgekd contract is bilinear."""
    import math

    if not weights:
        return None
    library, _, name = spec.partition(":")
    if library == "torchvision":
        transform = torchvision_weights(name, str(weights), "weights").transforms()
        crop = int(transform.crop_size[0])
        return {"resize": int(transform.resize_size[0]), "crop": [crop, crop],
                "mean": [float(v) for v in transform.mean], "std": [float(v) for v in transform.std],
                "interpolation": transform.interpolation.value}
    if library == "timm":
        timm = import_timm("model")
        from timm.data import resolve_data_config

        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None:
            return None
        data = resolve_data_config({}, pretrained_cfg=cfg.to_dict())
        _, height, width = data["input_size"]
        return {"resize": int(math.floor(min(height, width) / data["crop_pct"])), "crop": [int(height), int(width)],
                "mean": [float(v) for v in data["mean"]], "std": [float(v) for v in data["std"]],
                "interpolation": data["interpolation"]}
    return None


def preprocessing_defaults(*sections: Any) -> dict[str, Any] | None:
    """The eval transform of the run's pretrained weights: the first of `sections` (pass the teacher's, then the
    student's config section: the teacher's accuracy is the one to keep) that has `weights` / `pretrained` set.
    What the data side takes as defaults for the resize, crop, mean and std the config leaves unset."""
    for section in sections:
        weights = getattr(section, "weights", None) or getattr(section, "pretrained", False)
        if weights and getattr(section, "onnx", None) is None:
            return weights_preprocessing(section.model, weights)
    return None
