"""PyTorch -> LiteRT (`.tflite`) with litert-torch (no TensorFlow): fp32, and int8 with litert-torch's own
PT2E quantizer (symmetric int8, per-channel weights; XNNPACK's int8 kernels run it on a phone's CPU).

The int8 file is *full* int8: its input and output tensors are int8 with (scale, zero_point) that an app
applies itself (edgekd.runtime.tflite does the same). Batch is fixed at 1, as apps call it.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgekd import atomic


@contextlib.contextmanager
def _quiet():
    """litert-torch prints a progress tree and the converter logs through absl: keep edgekd's log readable."""
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    os.environ.setdefault("LITERT_TORCH_SILENCE_TORCH_LOGS", "y")
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def export_fp32(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    import litert_torch

    with _quiet(), torch.no_grad():
        edge = litert_torch.convert(model.eval().cpu(), (example[:1].float(),))
        with atomic.atomic_path(path) as temp:
            edge.export(str(temp))


def export_int8(model: nn.Module, example: torch.Tensor, calibration: Iterable[np.ndarray], path: Path) -> None:
    """PT2E static int8 (litert_torch.quantize): observe `calibration` (normalized images, one at a time),
    convert, lower."""
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    sample = (example[:1].float(),)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    with _quiet(), torch.no_grad():
        graph = torch.export.export(model.eval().cpu(), sample).module()
        prepared = prepare_pt2e(graph, quantizer)
        move_exported_model_to_eval(prepared)  # observe only: BatchNorm statistics stay as trained
        for image in calibration:
            prepared(torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.float32)))
        converted = convert_pt2e(prepared, fold_quantize=False)
        move_exported_model_to_eval(converted)  # BatchNorm/dropout in inference form, as exported
        edge = litert_torch.convert(converted, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        with atomic.atomic_path(path) as temp:
            edge.export(str(temp))
