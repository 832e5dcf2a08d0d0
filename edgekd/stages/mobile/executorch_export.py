"""PyTorch -> ExecuTorch (`.pte`) lowered to the XNNPACK backend: fp32, and int8 with ExecuTorch's
XNNPACKQuantizer (PT2E, symmetric int8, per-channel weights). Input and output stay float32 (the
quantize/dequantize nodes are inside the program). Batch is fixed at 1, as apps call it.

Running a `.pte` from Python needs ExecuTorch's runtime, which imports torch: timing lives here, on the
torch side (`PteSession`), never in edgekd.runtime (which must run on a device without torch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd import atomic

PROVIDER = "ExecuTorch-XNNPACK"


def _lower(program: torch.export.ExportedProgram, path: Path) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    buffer = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    with atomic.atomic_path(path) as temp:
        Path(temp).write_bytes(buffer)


def export_fp32(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with torch.no_grad():
        _lower(torch.export.export(model.eval().cpu(), (example[:1].float(),)), path)


def export_int8(model: nn.Module, example: torch.Tensor, calibration: Iterable[np.ndarray], path: Path) -> None:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    sample = (example[:1].float(),)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    with torch.no_grad():
        prepared = prepare_pt2e(torch.export.export(model.eval().cpu(), sample).module(), quantizer)
        move_exported_model_to_eval(prepared)  # observe only: BatchNorm statistics stay as trained
        for image in calibration:
            prepared(torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.float32)))
        converted = convert_pt2e(prepared)
        move_exported_model_to_eval(converted)  # BatchNorm/dropout in inference form, as exported
        _lower(torch.export.export(converted, sample), path)


def set_threads(threads: int) -> None:
    """ExecuTorch's XNNPACK work runs on one process-wide thread pool: size it per session."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


class PteSession:
    """A `.pte` program's `forward` behind the part of ONNX Runtime's session API edgekd's timing and
    accuracy code uses (get_inputs, run, get_providers)."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        from executorch.runtime import Runtime

        from edgekd.runtime.errors import RuntimeInputError

        path = Path(path)
        if not path.is_file():
            raise RuntimeInputError(f"{path}: not a .pte program (file not found)")
        set_threads(threads)
        self.threads = threads
        try:
            self.method = Runtime.get().load_program(path).load_method("forward")
        except Exception as exc:  # noqa: BLE001 - the pybind layer raises plain RuntimeError/ValueError
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RuntimeInputError(f"{path}: ExecuTorch could not load the program ({first})") from None
        meta = self.method.metadata.input_tensor_meta(0)
        self.input_shape = [int(d) for d in meta.sizes()]

    def get_inputs(self) -> list[Any]:
        return [SimpleNamespace(name="input", shape=list(self.input_shape), type="tensor(float)")]

    def get_providers(self) -> list[str]:
        return [PROVIDER]

    def run(self, output_names: Any, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        set_threads(self.threads)  # interleaved with other sessions: the pool is shared
        values = torch.from_numpy(np.ascontiguousarray(next(iter(feed.values())), dtype=np.float32))
        return [self.method.execute([values])[0].numpy()]
