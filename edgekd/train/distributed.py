"""torchrun / DistributedDataParallel support, without a home-made distribution layer.

`torchrun --nproc_per_node N -m edgekd run pipeline.yaml` starts N processes with RANK / WORLD_SIZE /
LOCAL_RANK set (`edgekd.runner.launch` joins the process group). Every rank walks the same stages; rank 0
decides which stages run (and broadcasts the decision), owns the run directory, the manifest, the log and
the report. The training stages (teacher, distill, prune recovery) run on every rank through `train.loop.fit`, which shards each epoch with
DistributedSampler and wraps the model in DDP; the other stages run on rank 0 while the rest wait at a
barrier. A rank that fails exits non-zero and torchrun tears the group down; collectives have a timeout
(EDGEKD_DIST_TIMEOUT_S, default 1800 s) so nothing hangs forever.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

_STATE: dict[str, Any] = {"initialized": False}


def check_environment() -> None:
    """InputError unless RANK / WORLD_SIZE / LOCAL_RANK describe a torchrun launch (or are absent).

    Left over in a shell (or set by another launcher), they would make a single process wait for peers that
    never come, or believe it is not rank 0 and write nothing.
    """
    from edgekd.errors import InputError

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    values: dict[str, int] = {}
    for name in names:
        text = os.environ.get(name)
        if text is None:
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise InputError(f"environment: {name}={text!r} is not an integer (set by torchrun; unset it)") from None
    if not values:
        return
    if "WORLD_SIZE" not in values or "RANK" not in values:
        given = ", ".join(f"{n}={os.environ[n]}" for n in names if n in values)
        raise InputError(f"environment: {given} without {'WORLD_SIZE' if 'WORLD_SIZE' not in values else 'RANK'}: "
                         "launch with torchrun, or unset them for a single process")
    size, rank_ = values["WORLD_SIZE"], values["RANK"]
    if size < 1 or not 0 <= rank_ < size:
        raise InputError(f"environment: RANK={rank_} with WORLD_SIZE={size} (needs 0 <= RANK < WORLD_SIZE)")
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if size > 1 and not os.environ.get(n)]
    if missing:
        raise InputError(f"environment: WORLD_SIZE={size} but {' and '.join(missing)} not set: launch with torchrun "
                         "(it sets them), or unset RANK and WORLD_SIZE for a single process")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    return _STATE["initialized"]


def is_main() -> bool:
    return rank() == 0


def init(device_name: str) -> str:
    """Join the process group (nccl on CUDA, gloo on CPU); returns the device this rank trains on."""
    import torch
    import torch.distributed as dist

    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank())
        device_name = f"cuda:{local_rank()}"
    timeout = datetime.timedelta(seconds=float(os.environ.get("EDGEKD_DIST_TIMEOUT_S", "1800")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
    _STATE["initialized"] = True
    return device_name


def shutdown() -> None:
    if _STATE["initialized"]:
        import torch.distributed as dist

        dist.destroy_process_group()
        _STATE["initialized"] = False


def barrier() -> None:
    if _STATE["initialized"]:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's value on every rank (pickled through the process group; small objects only)."""
    if not _STATE["initialized"]:
        return value
    import torch.distributed as dist

    holder = [value if is_main() else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_sums(sums: dict[str, float]) -> dict[str, float]:
    """Sum per-rank metric totals (loss x samples, sample counts) over all ranks."""
    if not _STATE["initialized"] or not sums:
        return sums
    import torch
    import torch.distributed as dist

    keys = sorted(sums)
    backend_cuda = dist.get_backend() == "nccl"
    tensor = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device="cuda" if backend_cuda else "cpu")
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def average_tensors(tensors: list[Any]) -> None:
    """Replace each tensor by its mean over all ranks, in place (e.g. BatchNorm statistics each rank estimated)."""
    if not _STATE["initialized"] or not tensors:
        return
    import torch.distributed as dist

    for tensor in tensors:
        dist.all_reduce(tensor)
        tensor /= world_size()


def wrap_model(model: Any, device: Any) -> Any:
    """DistributedDataParallel around the model when running under torchrun, else the model itself."""
    if not _STATE["initialized"]:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if getattr(device, "type", "cpu") == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def average_gradients(parameters: list[Any]) -> None:
    """Average gradients of tensors DDP does not manage (e.g. hint adapters living in the objective)."""
    if not _STATE["initialized"]:
        return
    import torch.distributed as dist

    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= world_size()


def share_module_from_main(module: Any) -> Any:
    """Give every rank rank 0's module: structure (e.g. after pruning) and weights, via broadcast."""
    if not _STATE["initialized"]:
        return module
    from edgekd.models.structure import apply_structure, record_structure

    payload = broadcast_object(
        {"structure": record_structure(module), "state": {k: v.cpu() for k, v in module.state_dict().items()}}
        if is_main() else None
    )
    if not is_main():
        apply_structure(module, payload["structure"])
        module.load_state_dict(payload["state"])
    return module
