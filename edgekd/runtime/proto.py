"""A tiny, read-only ONNX ModelProto reader (protobuf wire format), so the runtime needs no `onnx` package.

Why hand-written: onnxruntime has no graph-introspection API and a board only has `onnxruntime numpy`;
importing `onnx` lazily would silently drop the operator list exactly where it matters (on the device).
The ONNX schema is stable, and we read only a handful of fields:
  ModelProto: ir_version=1, producer_name=2, graph=7, opset_import=8 (OperatorSetIdProto: domain=1, version=2)
  GraphProto: node=1, initializer=5       NodeProto: op_type=4, attribute=5, domain=7
  AttributeProto: g=6, graphs=11 (subgraphs of If/Loop/Scan)
  TensorProto: name=8, external_data=13 (StringStringEntryProto key=1 value=2), data_location=14
Big fields (weights) are skipped by slicing a memoryview over an mmap, so a 500 MB model costs no copy.
"""

from __future__ import annotations

import mmap
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_EXTERNAL_DATA_LOCATION = 1  # TensorProto.DataLocation.EXTERNAL


class ProtoError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass
class ModelSummary:
    ir_version: int | None = None
    producer: str = ""
    opsets: dict[str, int] = field(default_factory=dict)  # domain ("" = ai.onnx) -> version
    op_counts: Counter = field(default_factory=Counter)  # "Conv" or "com.microsoft:QLinearConv" -> count
    external_data: list[str] = field(default_factory=list)  # `location` of each externally stored tensor

    @property
    def node_count(self) -> int:
        return sum(self.op_counts.values())


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ProtoError("truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def iter_fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield (field_number, wire_type, value) for each field; value is an int or a memoryview slice."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtoError("field number 0")
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
            value, pos = buf[pos:pos + size], pos + size
        elif wire == _LENGTH:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:  # groups (3, 4) are not used by ONNX
            raise ProtoError(f"unsupported wire type {wire}")
        if pos > end:
            raise ProtoError("truncated message")
        yield number, wire, value


def _text(value) -> str:
    return bytes(value).decode("utf-8", errors="replace")


def _read_graph(buf: memoryview, summary: ModelSummary) -> None:
    for number, wire, value in iter_fields(buf):
        if number == 1 and wire == _LENGTH:
            _read_node(value, summary)
        elif number == 5 and wire == _LENGTH:
            _read_tensor(value, summary)


def _read_node(buf: memoryview, summary: ModelSummary) -> None:
    op_type, domain = "", ""
    for number, wire, value in iter_fields(buf):
        if wire != _LENGTH:
            continue
        if number == 4:
            op_type = _text(value)
        elif number == 7:
            domain = _text(value)
        elif number == 5:  # attribute: may hold subgraphs (If/Loop/Scan bodies)
            for a_number, a_wire, a_value in iter_fields(value):
                if a_wire == _LENGTH and a_number in (6, 11):
                    _read_graph(a_value, summary)
    key = op_type if domain in ("", "ai.onnx") else f"{domain}:{op_type}"
    summary.op_counts[key] += 1


def _read_tensor(buf: memoryview, summary: ModelSummary) -> None:
    external, location = False, None
    for number, wire, value in iter_fields(buf):
        if number == 14 and wire == _VARINT:
            external = value == _EXTERNAL_DATA_LOCATION
        elif number == 13 and wire == _LENGTH:
            entry = {k: _text(v) for k, w, v in iter_fields(value) if w == _LENGTH}
            if entry.get(1) == "location":
                location = entry.get(2)
    if external and location is not None:
        summary.external_data.append(location)


def parse_model_bytes(data: bytes | memoryview) -> ModelSummary:
    """Summarize a serialized ModelProto. Raises ProtoError when the bytes are not one."""
    buf = memoryview(data)
    summary, has_graph = ModelSummary(), False
    for number, wire, value in iter_fields(buf):
        if number == 1 and wire == _VARINT:
            summary.ir_version = value
        elif number == 2 and wire == _LENGTH:
            summary.producer = _text(value)
        elif number == 7 and wire == _LENGTH:
            has_graph = True
            _read_graph(value, summary)
        elif number == 8 and wire == _LENGTH:
            domain, version = "", 0
            for o_number, o_wire, o_value in iter_fields(value):
                if o_number == 1 and o_wire == _LENGTH:
                    domain = _text(o_value)
                elif o_number == 2 and o_wire == _VARINT:
                    version = o_value
            summary.opsets["" if domain == "ai.onnx" else domain] = version
    if summary.ir_version is None or not has_graph:
        raise ProtoError("no ir_version or graph: not an ONNX ModelProto")
    return summary


def read_model_summary(path: str | os.PathLike) -> ModelSummary:
    """Summarize an .onnx file without loading its weights into memory. Raises ProtoError or OSError."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise ProtoError("empty file")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            error = _summarize_mapped(mapped)
    if isinstance(error, str):
        raise ProtoError(error)
    return error


def _summarize_mapped(mapped: mmap.mmap) -> ModelSummary | str:
    # Returns the error as text instead of raising: a live traceback would keep memoryview slices of
    # the mmap alive and make closing it fail with BufferError.
    with memoryview(mapped) as view:
        try:
            return parse_model_bytes(view)
        except ProtoError as exc:
            return str(exc)
