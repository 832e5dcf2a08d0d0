"""Model registry: the built-in CNN family, `torchvision:<name>`, `timm:<name>` (the optional `timm` extra),
and `pkg.module:factory` for user code.

`create_model(spec, num_classes=..., in_channels=..., input_size=...)` is the one public factory; pretrained
weights (`weights=` for torchvision, `pretrained=True` for timm) come from the local cache only
(`edgekd.models.pretrained`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Collection
from typing import Any

from torch import nn

from edgekd.errors import InputError
from edgekd.models.cnn import CNN_PRESETS, EdgeCNN
from edgekd.models.heads import classifier_name

__all__ = ["available_models", "create_model", "count_parameters", "classifier_name"]


def available_models() -> list[str]:
    return ["cnn", *CNN_PRESETS, "torchvision:<name>", "timm:<name>", "<pkg.module>:<factory>"]

# Libraries whose models are named `<library>:<name>` (everything else with a colon is a user factory).
LIBRARY_PREFIXES = ("torchvision:", "timm:")


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
    weights: str | None = None,
    pretrained: bool = False,
    load_weights: bool = True,
) -> nn.Module:
    """Build a model by registry name, `torchvision:<name>`, `timm:<name>` or `pkg.module:factory`.

    `field` names the config key in error messages (e.g. 'teacher.model'). `weights` (torchvision enum name or
    DEFAULT) / `pretrained` (timm) start from pretrained weights with the head replaced for `num_classes`;
    `load_weights=False` builds the same architecture without reading them (a checkpoint is loaded next).
    """
    kwargs = dict(kwargs or {})
    if weights is not None and not spec.startswith("torchvision:"):
        raise InputError(f"{field.replace('.model', '.weights')}: weights are for torchvision:<name> models "
                         f"(got model '{spec}'; timm models take pretrained: true)")
    if pretrained and not spec.startswith("timm:"):
        raise InputError(f"{field.replace('.model', '.pretrained')}: pretrained is for timm:<name> models "
                         f"(got model '{spec}'; torchvision models take weights: DEFAULT)")
    if spec.startswith("timm:"):
        from edgekd.models.pretrained import create_timm

        return create_timm(spec.split(":", 1)[1], num_classes, in_channels, kwargs, field, pretrained, load_weights)
    if spec == "cnn" or spec in CNN_PRESETS:
        options = {**CNN_PRESETS.get(spec, {}), **kwargs}
        try:
            return EdgeCNN(num_classes, in_channels, input_size, **options)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{field}: {spec}: {exc}") from None
    if spec.startswith("torchvision:"):
        from edgekd.models.tv import create_torchvision

        name = spec.split(":", 1)[1]
        if weights is not None:
            from edgekd.models.pretrained import create_torchvision_pretrained

            return create_torchvision_pretrained(name, weights, num_classes, in_channels, kwargs, field, load_weights)
        return create_torchvision(name, num_classes, in_channels, input_size, kwargs, field)
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


def model_meta(spec: str, kwargs: dict[str, Any] | None, role: str, *, weights: str | None = None,
               pretrained: bool = False) -> dict[str, Any]:
    """What a checkpoint records so `load_model` can rebuild the architecture (a pretrained model's differs:
    the architecture its weights were trained for, see `models.pretrained`)."""
    meta: dict[str, Any] = {"model": spec, "model_kwargs": dict(kwargs or {}), "role": role}
    if weights is not None:
        meta["weights"] = weights
    if pretrained:
        meta["pretrained"] = True
    return meta


def is_user_factory(spec: str) -> bool:
    """True for a `pkg.module:factory` spec (user code that is imported and called)."""
    return ":" in spec and not spec.startswith(LIBRARY_PREFIXES)


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
        kwargs=meta.get("model_kwargs"), field=f"{path}", weights=meta.get("weights"),
        pretrained=bool(meta.get("pretrained")), load_weights=False,
    )
    if meta.get("structure"):
        from edgekd.models.structure import apply_structure

        apply_structure(model, meta["structure"])
    return load_into(model, state, str(path)).eval()
