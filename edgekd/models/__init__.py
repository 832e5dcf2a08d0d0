"""Model registry: the built-in CNN family, `torchvision:<name>`, and `pkg.module:factory` for user code.

`create_model(spec, num_classes=..., in_channels=..., input_size=...)` is the one public factory.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Collection
from typing import Any

from torch import nn

from edgekd.errors import InputError
from edgekd.models.cnn import CNN_PRESETS, EdgeCNN

__all__ = ["available_models", "create_model", "count_parameters", "classifier_name"]


def available_models() -> list[str]:
    return ["cnn", *CNN_PRESETS, "torchvision:<name>", "<pkg.module>:<factory>"]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def create_model(
    spec: str,
    *,
    num_classes: int,
    in_channels: int,
    input_size: int,
    kwargs: dict[str, Any] | None = None,
    field: str = "model",
) -> nn.Module:
    """Build a model by registry name, `torchvision:<name>` or `pkg.module:factory`.

    `field` names the config key in error messages (e.g. 'teacher.model').
    """
    kwargs = dict(kwargs or {})
    if spec == "cnn" or spec in CNN_PRESETS:
        options = {**CNN_PRESETS.get(spec, {}), **kwargs}
        try:
            return EdgeCNN(num_classes, in_channels, input_size, **options)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{field}: {spec}: {exc}") from None
    if spec.startswith("torchvision:"):
        from edgekd.models.tv import create_torchvision

        return create_torchvision(spec.split(":", 1)[1], num_classes, in_channels, input_size, kwargs, field)
    if ":" in spec:
        return _from_factory(spec, num_classes, in_channels, input_size, kwargs, field)
    raise InputError(f"{field}: unknown model '{spec}' (available: {', '.join(available_models())})")


def _from_factory(spec: str, num_classes: int, in_channels: int, input_size: int, kwargs: dict, field: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure of user code is the user's input
        raise InputError(f"{field}: cannot import '{module_name}' ({type(exc).__name__}: {exc})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise InputError(f"{field}: '{module_name}' has no callable '{attribute}'")
    offered = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
    try:
        parameters = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        accepted = {k: v for k, v in offered.items() if takes_any or k in parameters}
    except (TypeError, ValueError):
        accepted = offered
    try:
        model = factory(**accepted, **kwargs)
    except Exception as exc:  # noqa: BLE001 - user code
        raise InputError(f"{field}: factory {spec} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"{field}: factory {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


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


def model_meta(spec: str, kwargs: dict[str, Any] | None, role: str) -> dict[str, Any]:
    """What a checkpoint records so `load_model` can rebuild the architecture."""
    return {"model": spec, "model_kwargs": dict(kwargs or {}), "role": role}


def is_user_factory(spec: str) -> bool:
    """True for a `pkg.module:factory` spec (user code that is imported and called)."""
    return ":" in spec and not spec.startswith("torchvision:")


def load_model(path, *, num_classes: int, in_channels: int, input_size: int,  # noqa: ANN001
               factories: Collection[str] = ()) -> nn.Module:
    """Rebuild a model saved by edgekd (architecture from the checkpoint's meta, pruned structure
    re-applied when present) and load its weights with weights_only=True.

    A checkpoint never chooses which code runs: a `pkg.module:factory` recorded in its meta is imported only
    when it is one of `factories` (the specs the caller's config names); built-in and torchvision names are
    always allowed.
    """
    from edgekd.models.checkpoint import load_into, read_checkpoint

    state, meta = read_checkpoint(path)
    if not isinstance(meta.get("model"), str) or not isinstance(meta.get("model_kwargs") or {}, dict):
        raise InputError(f"{path}: not an edgekd checkpoint (no architecture recorded)")
    if is_user_factory(meta["model"]) and meta["model"] not in factories:
        raise InputError(
            f"{path}: the checkpoint names the model factory '{meta['model']}', which the config does not "
            "(teacher.model / student.model); refusing to import code that a checkpoint chooses"
        )
    model = create_model(
        meta["model"], num_classes=num_classes, in_channels=in_channels, input_size=input_size,
        kwargs=meta.get("model_kwargs"), field=f"{path}",
    )
    if meta.get("structure"):
        from edgekd.models.structure import apply_structure

        apply_structure(model, meta["structure"])
    return load_into(model, state, str(path)).eval()
