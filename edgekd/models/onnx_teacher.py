"""A teacher from any framework: an ONNX file run by ONNX Runtime behind a torch `nn.Module`.

`OnnxTeacher(batch)` returns float32 logits on the batch's device without gradients, so distillation, the
teacher-logit cache and pruning recovery use it exactly like a PyTorch teacher. `inspect_onnx_teacher` checks the
file against the data before any work (one image input, one output of one score per class, the data's channels
and size) and reads how to feed it:

- layout: NCHW, or NHWC (TensorFlow/Keras exports): an NHWC model gets the batch transposed, and the copy the
  benchmark measures gets the same Transpose node in front, so it takes edgekd's NCHW inputs;
- output: logits, or probabilities from a final Softmax (Keras classifiers end with one): their log is used as
  logits (log-probabilities differ from logits by a per-sample constant, which the softmax of KD ignores).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd.errors import InputError

log = logging.getLogger("edgekd")

FIELD = "teacher.onnx"


@dataclass(frozen=True)
class OnnxTeacherInfo:
    input_name: str
    output_name: str
    layout: str
    """NCHW, or NHWC (the batch is transposed before it is fed)."""
    output_kind: str
    """logits | probabilities (a final Softmax: log is applied) | log_probabilities (a final LogSoftmax)."""
    fixed_batch: int | None
    """The input's fixed batch size, None when dynamic."""
    input_shape: tuple[Any, ...]

    def adaptations(self) -> list[str]:
        """What edgekd does to feed the file and read its output, in words (log and metrics)."""
        notes = []
        if self.layout == "NHWC":
            notes.append("NHWC input: the NCHW batch is transposed to NHWC")
        if self.output_kind == "probabilities":
            notes.append("softmax output: log-probabilities are used as logits")
        return notes


def _dim(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def _show(shape: tuple[Any, ...]) -> str:
    return "[" + ", ".join(str(d) if _dim(d) else (str(d) if d else "?") for d in shape) + "]"


def _producer(graph: Any, output: str) -> str | None:
    """The op type of the node that writes `output`, looking through Identity nodes (tf2onnx adds them)."""
    producers = {name: node for node in graph.node for name in node.output}
    node = producers.get(output)
    while node is not None and node.op_type == "Identity" and node.input:
        node = producers.get(node.input[0])
    return None if node is None else node.op_type


def inspect_onnx_teacher(path: str | Path, *, channels: int, height: int, width: int, num_classes: int,
                         size_keys: str = "data.crop (or data.image_size)") -> OnnxTeacherInfo:
    """How to run the ONNX teacher on the data's (N, channels, height, width) batches; InputError (one line,
    `teacher.onnx: ...`) when it cannot be: several inputs or outputs, not one score per class, other
    channels or another input size than the data's preprocessing gives (`size_keys` names those settings)."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - ORT and onnx raise many kinds for a file that is not a model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(f"{FIELD}: {path}: not a usable ONNX model ({first})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        names = ", ".join(f"{i.name} {_show(tuple(i.shape))}" for i in inputs)
        raise InputError(f"{FIELD}: {path.name} has {len(inputs)} inputs ({names}); a teacher takes one image batch "
                         "(re-export it with the image as its only input)")
    if len(outputs) != 1:
        names = ", ".join(o.name for o in outputs)
        raise InputError(f"{FIELD}: {path.name} has {len(outputs)} outputs ({names}); a teacher gives one tensor "
                         "of class scores (re-export it with the logits as its only output)")
    source, target = inputs[0], outputs[0]
    if source.type not in ("tensor(float)", "tensor(float16)", "tensor(double)"):
        raise InputError(f"{FIELD}: {path.name}'s input '{source.name}' is {source.type}; a teacher takes float "
                         "images (normalized as the data section says)")
    out_shape = tuple(target.shape or ())
    if len(out_shape) != 2 or (_dim(out_shape[1]) is not None and out_shape[1] != num_classes):
        raise InputError(f"{FIELD}: {path.name}'s output '{target.name}' is {_show(out_shape)}; a teacher gives "
                         f"logits [batch, {num_classes}] (one score per class of the data)")
    shape = tuple(source.shape or ())
    if len(shape) != 4:
        raise InputError(f"{FIELD}: {path.name}'s input '{source.name}' is {_show(shape)}; a teacher takes image "
                         f"batches [batch, {channels}, {height}, {width}] (NCHW) or [batch, {height}, {width}, "
                         f"{channels}] (NHWC)")
    layout = _layout(shape, channels, height, width, path.name, source.name, size_keys)
    kind = {"Softmax": "probabilities", "LogSoftmax": "log_probabilities"}.get(
        _producer(proto.graph, target.name) or "", "logits")
    return OnnxTeacherInfo(source.name, target.name, layout, kind, _dim(shape[0]), shape)


def _layout(shape: tuple[Any, ...], channels: int, height: int, width: int, file: str, name: str,
            size_keys: str) -> str:
    """NCHW or NHWC from the input's fixed dims against the data's; unknown dims fit anything, and when
    both layouts fit (everything dynamic) the model is taken as NCHW (PyTorch's, and the ONNX convention)."""

    def fits(dims: tuple[Any, ...], want: tuple[int, ...]) -> bool:
        return all(_dim(d) is None or d == w for d, w in zip(dims, want))

    nchw, nhwc = shape[1:], (shape[3], shape[1], shape[2])  # both as (C, H, W)
    if fits(nchw, (channels, height, width)):
        return "NCHW"
    if fits(nhwc, (channels, height, width)) and _dim(shape[3]) == channels:
        log.info("  teacher.onnx: %s takes NHWC input %s: each NCHW batch is transposed to NHWC", file, _show(shape))
        return "NHWC"
    # Neither layout fits: say which dims differ, in the layout the channel axis points at.
    channels_last = _dim(shape[3]) in (1, 3) and _dim(shape[1]) not in (1, 3)
    got_c, got_h, got_w = nhwc if channels_last else nchw
    layout = "NHWC" if channels_last else "NCHW"
    if _dim(got_c) is not None and got_c != channels:
        raise InputError(f"{FIELD}: {file}'s input '{name}' {_show(shape)} ({layout}) takes {got_c} channel(s), the "
                         f"data has {channels} (set the data's channels to match, or re-export the teacher)")
    raise InputError(f"{FIELD}: {file}'s input '{name}' {_show(shape)} ({layout}) takes {got_h}x{got_w} images, the "
                     f"data's preprocessing gives {height}x{width}: set {size_keys} to {got_h}x{got_w}, "
                     "or re-export the teacher for that size")


class OnnxTeacher(nn.Module):
    """Runs an ONNX teacher on torch batches (N, C, H, W): float32 logits on the batch's device, no gradients.

    No parameters: `.eval()`, `.to()` and `requires_grad_` are no-ops, so every teacher code path takes it.
    """

    def __init__(self, path: str | Path, info: OnnxTeacherInfo, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path, self.info = Path(path), info
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self._session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        self._dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(
            self._session.get_inputs()[0].type, np.float32)
        self.num_parameters = onnx_parameters(self.path)
        """Weights in the graph's initializers (what count_parameters gives a PyTorch teacher)."""

    def _run(self, batch: np.ndarray) -> np.ndarray:
        fixed = self.info.fixed_batch
        if fixed is None or len(batch) == fixed:
            return self._session.run([self.info.output_name], {self.info.input_name: batch})[0]
        chunks = []  # a fixed-batch export: whole chunks of its size, the last one padded
        for start in range(0, len(batch), fixed):
            chunk = batch[start:start + fixed]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - len(chunk), axis=0)]) if len(chunk) < fixed else chunk
            chunks.append(self._session.run([self.info.output_name], {self.info.input_name: padded})[0][:len(chunk)])
        return np.concatenate(chunks)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        batch = inputs.detach().float().cpu()
        if self.info.layout == "NHWC":
            batch = batch.permute(0, 2, 3, 1)
        array = np.ascontiguousarray(batch.numpy(), dtype=self._dtype)
        logits = torch.from_numpy(np.asarray(self._run(array), dtype=np.float32))
        if self.info.output_kind == "probabilities":
            logits = torch.log(logits.clamp_min(1e-12))  # log(0) would be -inf: KD's softmax needs finite values
        return logits.to(inputs.device)

    def extra_repr(self) -> str:
        return f"{self.path.name}, {self.info.layout}, {self.info.output_kind}"


def onnx_parameters(path: str | Path) -> int:
    """Number of weights stored in an ONNX file's initializers."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(tensor.dims)) for tensor in proto.graph.initializer)


def nchw_copy(source: str | Path, target: str | Path, info: OnnxTeacherInfo) -> None:
    """Write `source` to `target` (atomically) as a model that takes NCHW input: unchanged for an NCHW model;
    an NHWC model gets a Transpose node in front of its graph (input renamed `<name>_nchw`), so the benchmark,
    the export's agreement check and an app can feed it what they feed every other model of the run."""
    import shutil

    import onnx
    from onnx import helper

    from edgekd import atomic

    if info.layout == "NCHW":
        with atomic.atomic_path(target) as temp:
            shutil.copyfile(source, temp)
        return
    proto = onnx.load(str(source))
    graph = proto.graph
    old = next(i for i in graph.input if i.name == info.input_name)
    n, h, w, c = old.type.tensor_type.shape.dim
    new = helper.make_tensor_value_info(f"{info.input_name}_nchw", old.type.tensor_type.elem_type, None)
    for dim in (n, c, h, w):
        new.type.tensor_type.shape.dim.add().CopyFrom(dim)
    transpose = helper.make_node("Transpose", [new.name], [info.input_name], perm=[0, 2, 3, 1],
                                 name="edgekd_nchw_to_nhwc")
    graph.node.insert(0, transpose)
    position = list(graph.input).index(old)
    graph.input.remove(old)
    graph.input.insert(position, new)
    onnx.checker.check_model(proto)
    with atomic.atomic_path(target) as temp:
        onnx.save_model(proto, str(temp))
