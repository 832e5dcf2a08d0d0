"""Hardware-aware student choice (`student.candidates`, `student.model: auto`): every untrained candidate is
exported and timed on ONNX Runtime in fp32 and in a quick int8, at the budgets' threads and batch, interleaved
with the teacher; those that miss the latency budgets even in their faster precision are dropped, and the one
with the most capacity (MACs or params) among the rest is distilled.

Timing untrained models is honest here: latency depends on the graph, not the weights. `choose` is pure (the
measured rows in, the decision out), so the decision rule is tested with injected timings.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgekd.errors import InputError

log = logging.getLogger("edgekd")


@dataclass(frozen=True)
class ChoiceSettings:
    """What the choice is judged on: the budgets' latency limits, and where latency is measured."""

    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    min_speedup: float | None = None
    capacity: str = "macs"
    latency: Any = None  # edgekd.stages.prune.latency.LatencySettings (fp32; int8 is made from it)
    budgets_view: dict[str, Any] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        return {"budgets": self.budgets_view, "capacity": self.capacity,
                "latency": self.latency.view() if self.latency is not None else None}


def limits(settings: ChoiceSettings, teacher_p50_ms: float | None) -> dict[str, float]:
    """Budget name -> the most a candidate's p50 / p90 may be (min_speedup turns into a p50 limit through the
    teacher's p50 measured in the same rounds)."""
    out: dict[str, float] = {}
    if settings.latency_p50_ms is not None:
        out["p50"] = settings.latency_p50_ms
    if settings.min_speedup is not None and teacher_p50_ms is not None:
        by_speedup = teacher_p50_ms / settings.min_speedup
        out["p50"] = min(out.get("p50", by_speedup), by_speedup)
    if settings.latency_p90_ms is not None:
        out["p90"] = settings.latency_p90_ms
    return out


def choose(rows: list[dict[str, Any]], settings: ChoiceSettings, teacher_p50_ms: float | None) -> dict[str, Any]:
    """Mark each row `fits` (its fp32 or its int8 meets every limit) and return the decision:
    {chosen: label, precision, reason, limits}. No row fits: InputError naming the fastest and the limit."""
    bounds = limits(settings, teacher_p50_ms)
    for row in rows:
        fits = {}
        for precision in ("fp32", "int8"):
            fits[precision] = all(row[f"{precision}_{stat}_ms"] <= limit for stat, limit in bounds.items())
        row["fits"] = fits["fp32"] or fits["int8"]
        row["fits_in"] = [p for p in ("int8", "fp32") if fits[p]]
    fitting = [r for r in rows if r["fits"]]
    if not fitting:
        fastest = min(rows, key=lambda r: min(r["fp32_p50_ms"], r["int8_p50_ms"]))
        needs = ", ".join(f"{stat} <= {limit:.3f} ms" for stat, limit in bounds.items())
        raise InputError(
            f"student.candidates: none of the {len(rows)} candidates meets the latency budget ({needs}) even in "
            f"int8; the fastest, {fastest['label']}, runs at p50 {min(fastest['fp32_p50_ms'], fastest['int8_p50_ms']):.3f} ms "
            "here (add smaller candidates, or relax budgets.latency_* / min_speedup)")
    key = settings.capacity
    other = "params" if key == "macs" else "macs"
    best = max(fitting, key=lambda r: (r[key], r[other]))
    precision = "int8" if "int8" in best["fits_in"] else "fp32"
    dropped = [r["label"] for r in rows if not r["fits"]]
    larger = [r for r in fitting if r is not best]
    reason = (f"{best['label']}: the most {key} ({best[key]:,}) of the {len(fitting)} candidate(s) that meet "
              f"{', '.join(f'{s} <= {v:.3f} ms' for s, v in bounds.items())} "
              f"(in {precision}: p50 {best[f'{precision}_p50_ms']:.3f} ms, p90 {best[f'{precision}_p90_ms']:.3f} ms)")
    if dropped:
        reason += f"; too slow even in int8: {', '.join(dropped)}"
    margin = min(limit / best[f"{precision}_{stat}_ms"] for stat, limit in bounds.items()) - 1
    ranked = sorted(fitting, key=lambda r: (r[key], r[other]), reverse=True)
    return {"chosen": best["label"], "model": best["model"], "model_kwargs": best["model_kwargs"],
            "ranked": [{"label": r["label"], "model": r["model"], "model_kwargs": r["model_kwargs"]} for r in ranked],
            "precision": precision, "reason": reason, "limits_ms": {k: round(v, 6) for k, v in bounds.items()},
            "margin": round(margin, 4), "others_fitting": [r["label"] for r in larger]}


def measure_candidates(candidates: list[Any], build: Callable[[str, dict[str, Any]], Any], teacher: Any | None,
                       input_shape: tuple[int, ...], settings: ChoiceSettings, calibration: Any,
                       folder: Path) -> tuple[list[dict[str, Any]], float | None]:
    """One row per candidate (label, model spec, params, MACs, fp32 and int8 p50/p90), all timed interleaved with
    the teacher (fp32) in the same rounds; returns the rows and the teacher's p50 (None without a teacher)."""
    import torch

    from edgekd.models import count_parameters
    from edgekd.stages.prune.latency import LatencyProbe, quick_int8
    from edgekd.stages.prune.pruning import measure

    probe = LatencyProbe(input_shape, settings.latency, folder, calibration)
    example = torch.zeros(1, *input_shape)
    paths: dict[str, Path] = {}
    rows = []
    for index, candidate in enumerate(candidates):
        model = build(candidate.model, dict(candidate.model_kwargs)).eval()
        macs, _ = measure(model, example)
        fp32 = probe.onnx(model, name=f"candidate{index}")
        paths[f"{index}/fp32"] = fp32
        paths[f"{index}/int8"] = quick_int8(fp32, folder / f"candidate{index}.int8.onnx", probe.calibration)
        rows.append({"label": candidate.label(), "model": candidate.model, "model_kwargs": dict(candidate.model_kwargs),
                     "params": count_parameters(model), "macs": int(macs)})
    if teacher is not None:
        paths["teacher"] = probe.onnx(teacher, name="teacher")
    rounds = probe.timings(paths)

    def median(label: str, stat: str) -> float:
        return round(statistics.median(r[label][stat] for r in rounds), 6)

    for index, row in enumerate(rows):
        for precision in ("fp32", "int8"):
            for stat in ("p50", "p90"):
                row[f"{precision}_{stat}_ms"] = median(f"{index}/{precision}", stat)
    return rows, (median("teacher", "p50") if teacher is not None else None)
