"""Latency on ONNX Runtime as something compression can aim at: export torch models to ONNX in a scratch
folder, optionally make a quick static int8 of them, and time them interleaved with a reference model.

Used by latency-target pruning (`prune.target_latency_ms` / `target_speedup`), by `prune.round_to: auto`
and by the student choice (`student.candidates`). The timing itself is the runtime's harness
(`edgekd.runtime.timing.interleaved_benchmark`): sessions pinned to the budgets' thread count, round-robin
chunks so machine noise hits every model alike; a ratio is the median over several such rounds.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("edgekd")

CALIBRATION_SAMPLES = 64  # a handful of batches: enough for int8 *latency* (accuracy is the quantize stage's job)
ROUND_SECONDS = 0.4  # steady-state samples per model and round add up to about this


@dataclass(frozen=True)
class LatencySettings:
    """Where latency is measured: the budgets' thread count and batch, the precision that ships."""

    threads: int = 1
    batch: int = 1
    precision: str = "fp32"  # fp32 | int8
    rounds: int = 3
    """Interleaved rounds per measurement; the ratio reported is their median."""
    iterations: int | None = None
    """Samples per model and round; None: as many as fit in ~0.4 s (20 to 400)."""
    opset: int = 17

    def view(self) -> dict[str, Any]:
        return {"threads": self.threads, "batch": self.batch, "precision": self.precision,
                "rounds": self.rounds, "iterations": self.iterations, "opset": self.opset}


class LatencyProbe:
    """Exports models to `folder` and times them on ONNX Runtime at the settings' threads and batch.

    `calibration` (normalized float32 images) is needed for int8; a few dozen are enough for timing.
    """

    def __init__(self, input_shape: Sequence[int], settings: LatencySettings, folder: Path,
                 calibration: np.ndarray | None = None) -> None:
        if settings.precision == "int8" and (calibration is None or len(calibration) == 0):
            raise ValueError("int8 latency needs calibration images")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.settings, self.folder = settings, Path(folder)
        self.calibration = None if calibration is None else np.asarray(calibration[:CALIBRATION_SAMPLES], np.float32)
        self.exported = 0
        rng = np.random.default_rng(0)
        self.inputs = rng.standard_normal((settings.batch, *self.input_shape)).astype(np.float32)
        self._iterations: dict[Path, int] = {}

    def onnx(self, model: Any, name: str | None = None) -> Path:
        """`model` exported (and quantized for int8) to a new file in the folder; returns its path."""
        import torch

        from edgekd.stages.export.exporter import export_onnx

        self.exported += 1
        stem = name or f"candidate{self.exported}"
        fp32 = self.folder / f"{stem}.onnx"
        example = torch.zeros(1, *self.input_shape)
        # a copy: the exporter moves its model to the CPU and switches it to eval mode
        export_onnx(copy.deepcopy(model).cpu().eval(), example, fp32, opset=self.settings.opset, name=stem)
        if self.settings.precision != "int8":
            return fp32
        return quick_int8(fp32, self.folder / f"{stem}.int8.onnx", self.calibration)

    def _iterations_for(self, paths: Mapping[str, Path]) -> int:
        if self.settings.iterations is not None:
            return self.settings.iterations
        from edgekd.runtime.session import open_session
        from edgekd.runtime.timing import time_session

        slowest = 0.0
        for path in paths.values():
            if path not in self._iterations:  # a short solo run sizes the rounds to the model's latency
                session = open_session(path, threads=self.settings.threads)
                stats = time_session(session, self.inputs, warmup=3, iterations=10).stats
                self._iterations[path] = int(min(400, max(20, ROUND_SECONDS * 1e3 / max(stats.p50, 1e-3))))
            slowest = max(slowest, 1.0 / self._iterations[path])
        return max(20, int(round(1.0 / slowest)))

    def _chunk(self, iterations: int) -> int:
        """Runs per model before switching: 10 for sub-millisecond models; 1 for slow ones, whose chunks of 10
        would last long enough for a neighbour's load to hit one model and not the other."""
        return 10 if iterations >= 200 else 1

    def timings(self, paths: Mapping[str, Path]) -> list[dict[str, dict[str, float]]]:
        """One dict label -> {p50, p90} (ms) per round, every model timed interleaved with the others."""
        from edgekd.runtime.timing import interleaved_benchmark

        iterations = self._iterations_for(paths)
        rounds = []
        for _ in range(self.settings.rounds):
            rows = interleaved_benchmark({k: str(v) for k, v in paths.items()}, {self.settings.batch: self.inputs},
                                         [self.settings.threads], warmup=10 if iterations >= 200 else 3,
                                         iterations=iterations, chunk=self._chunk(iterations))
            rounds.append({label: {"p50": float(r[0]["p50"]), "p90": float(r[0]["p90"])} for label, r in rows.items()})
        return rounds

    def p50s(self, paths: Mapping[str, Path]) -> list[dict[str, float]]:
        """One dict label -> p50 (ms) per round, every model timed interleaved with the others in each round."""
        return [{label: row["p50"] for label, row in r.items()} for r in self.timings(paths)]

    def fractions(self, candidates: Mapping[str, Path], reference: Path) -> dict[str, dict[str, float]]:
        """label -> {fraction: median over rounds of p50(candidate) / p50(reference), p50_ms, reference_p50_ms}."""
        rounds = self.p50s({"__reference__": reference, **candidates})
        out = {}
        for label in candidates:
            out[label] = {
                "fraction": statistics.median(r[label] / r["__reference__"] for r in rounds),
                "p50_ms": statistics.median(r[label] for r in rounds),
                "reference_p50_ms": statistics.median(r["__reference__"] for r in rounds),
            }
        return out


def quick_int8(fp32: Path, target: Path, calibration: np.ndarray | None) -> Path:
    """A static int8 QDQ model with the quantize stage's CPU-aware defaults (u8 activations, per-channel s8
    weights, 7-bit on x86 without VNNI), calibrated on a few images: what the int8 will cost, in seconds."""
    from edgekd.stages.quantize import quantization as qz

    act, reduce, _ = qz.choose_for_cpu("auto", "auto", "int8", qz.cpu_features())
    settings = qz.QuantSettings(mode="static", per_channel=True, reduce_range=reduce, activation_type=act,
                                label="latency probe")
    pre = target.with_suffix(".pre.onnx")
    with contextlib.redirect_stdout(io.StringIO()):
        qz.preprocess(fp32, pre)
        qz.quantize_model(pre, target, settings, qz.ArrayCalibrationReader(calibration, batch_size=16))
    pre.unlink(missing_ok=True)
    return target
