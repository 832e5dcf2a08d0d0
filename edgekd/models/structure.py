"""The layer shapes of a (pruned) model as JSON, and their re-application to a freshly built model.

Structured pruning changes constructor arguments (channel counts, groups), so a plain state_dict no longer
fits the architecture its factory builds. torch-pruning's own save routes pickle whole modules, which
`torch.load(weights_only=True)` rightly refuses; instead a checkpoint carries this record in its meta and
`edgekd.models.load_model` resizes the fresh model's layers before loading the tensors.

Layers are resized in place (attributes plus empty parameters of the new shape) rather than rebuilt, so
subclasses of the standard layers, hooks and parent containers stay untouched; `load_state_dict` then
fills in the values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgekd.errors import InputError

STRUCTURE_VERSION = 1

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _shape_of(module: nn.Module) -> dict[str, Any] | None:
    """Constructor-relevant sizes of one layer, or None for layers without channel-dependent shapes."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return {"kind": "conv", "in_channels": module.in_channels, "out_channels": module.out_channels,
                "groups": module.groups}
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, _NORMS):
        return {"kind": "norm", "num_features": module.num_features}
    if isinstance(module, nn.GroupNorm):
        return {"kind": "groupnorm", "num_groups": module.num_groups, "num_channels": module.num_channels}
    if isinstance(module, nn.LayerNorm):
        return {"kind": "layernorm", "normalized_shape": list(module.normalized_shape)}
    if isinstance(module, nn.PReLU):
        return {"kind": "prelu", "num_parameters": module.num_parameters}
    if isinstance(module, nn.Embedding):
        return {"kind": "embedding", "num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim}
    return None


def record_structure(model: nn.Module) -> dict[str, Any]:
    """{"version": 1, "modules": {name: {kind, sizes...}}} for every layer whose shapes pruning can change."""
    modules = {}
    for name, module in model.named_modules():
        shape = _shape_of(module)
        if shape is not None:
            modules[name] = shape
    return {"version": STRUCTURE_VERSION, "modules": modules}


def _new_param(old: torch.Tensor | None, shape: tuple[int, ...]) -> nn.Parameter | None:
    if old is None:
        return None
    return nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad)


def _new_buffer(old: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    return None if old is None else torch.zeros(shape, dtype=old.dtype, device=old.device)


def _resize(module: nn.Module, want: dict[str, Any]) -> None:
    kind = want["kind"]
    if kind == "conv":
        module.in_channels, module.out_channels, module.groups = want["in_channels"], want["out_channels"], want["groups"]
        per_group_in = module.in_channels // module.groups
        if module.transposed:  # ConvTranspose weights are (in, out/groups, *k)
            shape = (module.in_channels, module.out_channels // module.groups, *module.kernel_size)
        else:
            shape = (module.out_channels, per_group_in, *module.kernel_size)
        module.weight = _new_param(module.weight, shape)
        module.bias = _new_param(module.bias, (module.out_channels,))
    elif kind == "linear":
        module.in_features, module.out_features = want["in_features"], want["out_features"]
        module.weight = _new_param(module.weight, (module.out_features, module.in_features))
        module.bias = _new_param(module.bias, (module.out_features,))
    elif kind == "norm":
        count = want["num_features"]
        module.num_features = count
        module.weight = _new_param(module.weight, (count,))
        module.bias = _new_param(module.bias, (count,))
        if getattr(module, "running_mean", None) is not None:
            module.running_mean = _new_buffer(module.running_mean, (count,))
            module.running_var = _new_buffer(module.running_var, (count,))
    elif kind == "groupnorm":
        module.num_groups, module.num_channels = want["num_groups"], want["num_channels"]
        module.weight = _new_param(module.weight, (module.num_channels,))
        module.bias = _new_param(module.bias, (module.num_channels,))
    elif kind == "layernorm":
        module.normalized_shape = tuple(want["normalized_shape"])
        module.weight = _new_param(module.weight, module.normalized_shape)
        module.bias = _new_param(module.bias, module.normalized_shape)
    elif kind == "prelu":
        module.num_parameters = want["num_parameters"]
        module.weight = _new_param(module.weight, (module.num_parameters,))
    elif kind == "embedding":
        module.num_embeddings, module.embedding_dim = want["num_embeddings"], want["embedding_dim"]
        module.weight = _new_param(module.weight, (module.num_embeddings, module.embedding_dim))


def apply_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    """Resize the layers of a freshly built `model` to the recorded shapes, so the pruned state_dict loads.

    Raises InputError when the record does not belong to this architecture (unknown layer, other kind).
    """
    if not isinstance(structure, dict) or not isinstance(structure.get("modules"), dict):
        raise InputError("checkpoint structure record is malformed (expected {'version', 'modules'})")
    if structure.get("version") != STRUCTURE_VERSION:
        raise InputError(f"checkpoint structure record has version {structure.get('version')}, expected {STRUCTURE_VERSION}")
    modules = dict(model.named_modules())
    for name, want in structure["modules"].items():
        module = modules.get(name)
        if module is None:
            raise InputError(f"checkpoint structure names layer '{name}', which this architecture does not have")
        have = _shape_of(module)
        if have is None or have["kind"] != want.get("kind"):
            raise InputError(
                f"checkpoint structure: layer '{name}' is a {want.get('kind')} there, a {type(module).__name__} here"
            )
        if have != want:
            _resize(module, want)
