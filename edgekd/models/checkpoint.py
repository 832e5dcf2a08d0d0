"""Checkpoints as plain state_dicts, always loaded with weights_only=True.

torch.load's default can be flipped back to full unpickling by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD; passing
weights_only=True explicitly keeps a malicious checkpoint from running code whatever the environment says.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd import atomic
from edgekd.errors import InputError


def save_checkpoint(model_or_state: nn.Module | dict, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write {"state_dict": ..., "meta": ...} atomically; tensors are moved to CPU."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    payload = {"state_dict": {k: v.detach().cpu() for k, v in state.items()}, "meta": meta or {}}
    # Serialized in memory, then written by Python: a full disk is then an OSError naming ENOSPC, where
    # torch's own file writer only reports "unexpected pos ...".
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic.write_bytes(path, buffer.getbuffer())
    return Path(path)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) of a checkpoint file; accepts plain state_dicts and {'state_dict'|'model': ...}."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the file is refused or loaded anyway
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a paragraph; keep the first line after "WeightsUnpickler error:" (on the same
        # line or, as for a file that is not a checkpoint at all, on one of the next ones)
        _, found, after = str(exc).partition("WeightsUnpickler error:")
        reason = next((line.strip() for line in after.splitlines() if line.strip()), "") if found else ""
        reason = reason or "unsafe or unknown content"
        raise InputError(f"{path}: refused to load: not a plain weights file ({reason[:160]})") from None
    except Exception as exc:  # noqa: BLE001 - torch.load fails on foreign bytes in many ways (KeyError: 101, ...)
        raise InputError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {str(exc)[:160]})") from None
    meta: dict[str, Any] = {}
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        meta = payload.get("meta") or {}
        payload = payload["state_dict"]
    elif isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        payload = payload["model"]
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise InputError(f"{path}: not a state_dict (expected a mapping of parameter names to tensors)")
    # DistributedDataParallel / torch.compile prefixes
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in payload.items()}
    return state, meta


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load a state_dict strictly; a mismatch names the first differing key and shapes."""
    check_fits(model, state, source)
    model.load_state_dict(state, strict=True)
    return model


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """InputError naming the first key or shape where `state` does not fit `model` (a meta-device model will do)."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise InputError(f"{source}: does not fit the architecture: missing key '{key}' {tuple(tensor.shape)}")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise InputError(
                f"{source}: does not fit the architecture: '{key}' has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(tensor.shape)}"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise InputError(f"{source}: does not fit the architecture: unexpected key '{extra[0]}'")
