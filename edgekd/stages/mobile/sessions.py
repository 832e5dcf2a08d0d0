"""One way for the torch side (benchmark, mobile stages) to open any artifact edgekd measures: `.onnx`/`.ort`
on ONNX Runtime and `.tflite` on LiteRT (both through the torch-free edgekd.runtime), `.pte` on ExecuTorch
(its Python runtime needs torch, so it lives here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def is_pte(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".pte"


def open_artifact(path: str | Path, threads: int = 1, providers: Sequence[str] | None = None,
                  stop_spinning_after_run: bool = False) -> Any:
    if is_pte(path):
        from edgekd.stages.mobile.executorch_export import PteSession

        return PteSession(path, threads)
    from edgekd.runtime.session import open_session

    return open_session(path, threads, providers, stop_spinning_after_run=stop_spinning_after_run)
