"""What the benchmark stage measures, kept apart from the stage so it can be tested on plain files.

ONNX work goes through the torch-free `edgekd.runtime`; torch is imported only inside
`torch_reference_rows` (the PyTorch eager reference), so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.stages.export.config import MODEL_ORDER

logger = logging.getLogger("edgekd")

LATENCY_KEYS = ("threads", "batch", "p50", "p90", "p99", "mean", "std", "min", "max", "iterations", "throughput_ips")
SAMPLE_DIGITS = 4  # 0.1 us: plenty for a distribution plot, keeps the manifest small


@dataclass
class Artifact:
    """One ONNX model to measure. `file` is relative to the run directory (what the report shows)."""

    name: str
    kind: str  # "fp32" | "int8"
    file: str
    path: Path
    params: int | None
    macs: int | None
    runtime: str = "onnxruntime"  # onnxruntime | litert | executorch


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def collect_artifacts(export_metrics: Mapping[str, Any], quantize_metrics: Mapping[str, Any] | None,
                      resolve: Callable[[str], Path]) -> list[Artifact]:
    """The ONNX artifacts of a run, teacher first. `resolve(file)` gives an existing path (or raises).

    The int8 model inherits params/MACs from its source: quantization changes bytes per weight, not counts.
    """
    entries: Mapping[str, Mapping[str, Any]] = export_metrics.get("models") or {}
    order = [n for n in MODEL_ORDER if n in entries] + sorted(n for n in entries if n not in MODEL_ORDER)
    artifacts: list[Artifact] = []
    for name in order:
        info = entries[name]
        file = str(info["path"])
        artifacts.append(Artifact(name, "fp32", file, resolve(file), _int_or_none(info.get("params")),
                                  _int_or_none(info.get("macs"))))
    if quantize_metrics:
        name, file = str(quantize_metrics["artifact_name"]), str(quantize_metrics["path"])
        source = entries.get(str(quantize_metrics.get("source") or ""), {})
        artifacts.append(Artifact(name, "int8", file, resolve(file), _int_or_none(source.get("params")),
                                  _int_or_none(source.get("macs"))))
    return artifacts


def mobile_artifacts(export_metrics: Mapping[str, Any], mobile_metrics: Mapping[str, Any] | None,
                     resolve: Callable[[str], Path]) -> list[Artifact]:
    """The mobile stage's .tflite / .pte files (those it wrote), with their source's params/MACs."""
    if not mobile_metrics:
        return []
    source = (export_metrics.get("models") or {}).get(str(mobile_metrics.get("source") or ""), {})
    return [Artifact(str(row["name"]), str(row["kind"]), str(row["path"]), resolve(str(row["path"])),
                     _int_or_none(source.get("params")), _int_or_none(source.get("macs")), str(row["runtime"]))
            for row in mobile_metrics.get("artifacts") or [] if row.get("error") is None]


def batch_inputs(inputs: np.ndarray, batches: Sequence[int]) -> dict[int, np.ndarray]:
    """Real test images per batch size (cycled when the test split is smaller than a batch)."""
    return {b: np.ascontiguousarray(inputs[np.resize(np.arange(inputs.shape[0]), b)]) for b in dict.fromkeys(batches)}


def evaluate_artifacts(artifacts: Sequence[Artifact], data: Any, threads: int,
                       providers: Sequence[str] | None, open_artifact: Callable[..., Any] | None = None,
                       ) -> dict[str, dict[str, Any]]:
    """Accuracy, agreement with the teacher and the number of classes predicted per artifact, on the whole
    eval set (`collapsed`: the gate's reason when one class is predicted for every image).

    Agreement is against the teacher ONNX model's own predictions here (same runtime, same inputs), so
    the teacher agrees with itself exactly; without a teacher row, the eval file's teacher predictions.
    `open_artifact(path, threads, providers)` opens any artifact (default: edgekd.runtime's open_session).
    """
    from edgekd.gate.accuracy import collapse_reason
    from edgekd.runtime.evaluate import accuracy, agreement, predict_logits
    from edgekd.runtime.session import open_session

    opener = open_artifact or open_session
    predictions = {}
    for artifact in artifacts:
        session = opener(artifact.path, threads, providers)
        predictions[artifact.name] = predict_logits(session, data.inputs).argmax(axis=-1)
        del session
    reference = predictions.get("teacher", data.teacher_predictions)
    return {name: {"accuracy": accuracy(preds, data.labels),
                   "agreement": None if reference is None else agreement(preds, reference),
                   "classes_predicted": int(len(np.unique(preds))),
                   "collapsed": collapse_reason(preds, data.labels, what="test images"),
                   "samples": len(data)} for name, preds in predictions.items()}


def evaluate_artifacts_streamed(artifacts: Sequence[Artifact], batches: Any, threads: int,
                                providers: Sequence[str] | None, open_artifact: Callable[..., Any] | None = None,
                                ) -> dict[str, dict[str, Any]]:
    """As evaluate_artifacts, over (inputs, labels) numpy batches of a split too large for one array (image
    files decoded batch by batch): every artifact's session sees each batch once, memory stays one batch."""
    from edgekd.gate.accuracy import collapse_reason
    from edgekd.runtime.evaluate import accuracy, agreement, predict_logits
    from edgekd.runtime.session import open_session

    opener = open_artifact or open_session
    sessions = {artifact.name: opener(artifact.path, threads, providers) for artifact in artifacts}
    predictions: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    labels: list[np.ndarray] = []
    for inputs, batch_labels in batches:
        labels.append(batch_labels)
        for name, session in sessions.items():
            predictions[name].append(predict_logits(session, inputs).argmax(axis=-1))
    del sessions
    truth = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    merged = {name: np.concatenate(parts) if parts else np.zeros(0, np.int64) for name, parts in predictions.items()}
    reference = merged.get("teacher")
    return {name: {"accuracy": accuracy(preds, truth),
                   "agreement": None if reference is None else agreement(preds, reference),
                   "classes_predicted": int(len(np.unique(preds))),
                   "collapsed": collapse_reason(preds, truth, what="test images"),
                   "samples": int(len(truth))} for name, preds in merged.items()}


def measure_peaks(threads: Sequence[int]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """(peak GFLOP/s used for the compute-bound floor, raw measurements), keyed by thread count ("1": x).

    The floor uses the running maximum over thread counts: N threads can always do what fewer threads
    did, so a 2-thread figure below the 1-thread one (a busy neighbour during calibration) must not raise
    the "lower bound". None where calibration fails (no bound is shown).
    """
    from edgekd.runtime.peak import measure_peak_gflops

    raw: dict[str, float | None] = {}
    for count in sorted(set(threads)):
        try:
            raw[str(count)] = round(measure_peak_gflops(count), 3)
        except Exception as exc:  # noqa: BLE001 - the floor is context, not a result to fail on
            logger.warning("  peak GFLOP/s with %d thread(s) not measured: %s", count, exc)
            raw[str(count)] = None
    envelope: dict[str, float | None] = {}
    best: float | None = None
    for key, value in raw.items():
        best = value if best is None or (value is not None and value > best) else best
        envelope[key] = value if value is None else best
    return envelope, raw


def _bound(macs: int | None, batch: int, peak: float | None) -> float | None:
    from edgekd.runtime.peak import compute_bound_ms

    return None if not macs or not peak else compute_bound_ms(macs, batch, peak)


def _find(rows: Sequence[Mapping[str, Any]], threads: int, batch: int) -> Mapping[str, Any] | None:
    return next((r for r in rows if r["threads"] == threads and r["batch"] == batch), None)


def artifact_row(artifact: Artifact, timing_rows: Sequence[Mapping[str, Any]], evaluation: Mapping[str, Any],
                 peaks: Mapping[str, float | None], budget_threads: int, budget_batch: int,
                 peak_memory: int | None) -> dict[str, Any]:
    """One `artifacts` row of the benchmark metrics (the report.json contract) from raw timing rows."""
    from edgekd.atomic import sha256_file

    latency = []
    for raw in timing_rows:
        row = {key: raw[key] for key in LATENCY_KEYS}
        bound = _bound(artifact.macs, raw["batch"], peaks.get(str(raw["threads"])))
        row["compute_bound_ms"] = bound
        row["overhead_factor"] = None if bound is None else raw["p50"] / bound
        latency.append(row)
    at_budget = [r for r in timing_rows if r["threads"] == budget_threads]
    # The distribution plot wants batch 1; a run that never measures batch 1 gets the budget batch.
    sampled = _find(timing_rows, budget_threads, 1) or _find(timing_rows, budget_threads, budget_batch)
    largest = max(at_budget, key=lambda r: r["batch"], default=None)
    bound_1 = _bound(artifact.macs, 1, peaks.get(str(budget_threads)))
    single = _find(timing_rows, budget_threads, 1)
    reference = sampled or (timing_rows[0] if timing_rows else {})
    return {
        "name": artifact.name, "kind": artifact.kind, "runtime": artifact.runtime, "path": artifact.file,
        "sha256": sha256_file(artifact.path),
        "params": artifact.params, "macs": artifact.macs, "size_bytes": artifact.path.stat().st_size,
        "accuracy": evaluation.get("accuracy"), "agreement": evaluation.get("agreement"),
        "classes_predicted": evaluation.get("classes_predicted"), "collapsed": evaluation.get("collapsed"),
        "latency_ms": latency,
        "throughput_ips": None if largest is None else largest["throughput_ips"],
        "peak_memory_bytes": peak_memory,
        "compute_bound_ms": bound_1,
        "overhead_factor": None if bound_1 is None or single is None else single["p50"] / bound_1,
        "latency_samples_ms": [round(s, SAMPLE_DIGITS) for s in (sampled or {}).get("samples_ms", [])],
        "latency_samples_setting": None if sampled is None else {"threads": budget_threads, "batch": sampled["batch"]},
        "session_create_ms": reference.get("session_create_ms"),
        "first_run_ms": reference.get("first_run_ms"),
        "providers": list(reference.get("providers") or []),
    }


def peak_memory(artifact: Artifact, threads: int, batch: int, providers: Sequence[str] | None) -> int | None:
    """Peak RSS of a fresh process that loads and runs the model (None when the probe fails)."""
    from edgekd.runtime.memory import memory_profile

    try:
        return memory_profile(artifact.path, threads=threads, batch=batch, providers=providers)["peak_bytes"]
    except Exception as exc:  # noqa: BLE001 - an unreadable RSS must not fail the benchmark
        logger.warning("  peak memory of %s not measured: %s", artifact.name, exc)
        return None


PROFILE_NODES = 40  # slowest nodes kept per model in the manifest (op-type totals cover all of them)


def operator_profiles(artifacts: Sequence[Artifact], inputs: np.ndarray, threads: int, warmup: int, runs: int,
                      providers: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """edgekd.runtime.profile.profile_model of each artifact (name -> profile, slowest nodes only); a model
    the profiler cannot run gets {"error": ...} instead of failing the stage."""
    from edgekd.runtime.profile import profile_model

    profiles: dict[str, dict[str, Any]] = {}
    for artifact in artifacts:
        try:
            profile = profile_model(artifact.path, inputs, threads=threads, warmup=warmup, runs=runs,
                                    providers=providers)
        except Exception as exc:  # noqa: BLE001 - an explanation, not a gate: the timings above stand
            profiles[artifact.name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            continue
        profile["nodes"] = profile["nodes"][:PROFILE_NODES]
        profiles[artifact.name] = profile
    return profiles


def mobile_candidates(artifacts: Sequence[Artifact]) -> list[Artifact]:
    """Every int8 model plus the smallest fp32 one: the models an app would ship (bounds the run time)."""
    onnx = [a for a in artifacts if a.runtime == "onnxruntime"]  # the checks read ONNX graphs
    fp32 = [a for a in onnx if a.kind == "fp32"]
    chosen = [a for a in onnx if a.kind == "int8"]
    if fp32:
        chosen.insert(0, min(fp32, key=lambda a: a.path.stat().st_size))
    return chosen


def mobile_readiness(artifact: Artifact) -> dict[str, Any]:
    """Operators, ORT's mobile usability verdict and whether ORT-format conversion works (into a temp dir)."""
    from edgekd.runtime.mobile import convert_to_ort_with_reason, mobile_report

    report = mobile_report(artifact.path, check_usability=True)
    with tempfile.TemporaryDirectory(prefix="edgekd-ort-") as out_dir:
        converted, reason = convert_to_ort_with_reason(artifact.path, out_dir)
        report["ort_conversion"] = {"ok": converted is not None, "reason": reason,
                                    "size_bytes": None if converted is None else converted.stat().st_size}
    return report


class _EagerSession:
    """A PyTorch eager module behind the small part of ONNX Runtime's session API the timing loop uses, so
    eager rows come from the very same interleaved loop as the ONNX Runtime rows."""

    def __init__(self, model: Any, input_shape: Sequence[int]) -> None:
        self.model, self.input_shape = model, tuple(input_shape)

    def get_inputs(self) -> list[Any]:
        from types import SimpleNamespace

        return [SimpleNamespace(name="input", shape=[None, *self.input_shape], type="tensor(float)")]

    def run(self, output_names: Any, feed: Mapping[str, np.ndarray]) -> list[Any]:
        import torch

        with torch.inference_mode():
            return [self.model(torch.from_numpy(feed["input"]))]


def torch_reference_rows(models: Mapping[str, Any], inputs_by_batch: Mapping[int, np.ndarray],
                         threads_list: Sequence[int], warmup: int, iterations: int,
                         chunk: int = 10) -> list[dict[str, Any]]:
    """PyTorch eager latency (inference_mode, torch.set_num_threads) on the same inputs as ONNX Runtime,
    measured by the same interleaved loop (warm-up apart, then models alternate in chunks)."""
    import torch

    from edgekd.runtime.timing import interleaved_benchmark

    input_shape = next(iter(inputs_by_batch.values())).shape[1:]

    def eager_session(label: str, threads: int, providers: Any) -> _EagerSession:
        torch.set_num_threads(threads)
        return _EagerSession(models[label], input_shape)

    previous = torch.get_num_threads()
    try:
        timings = interleaved_benchmark({name: name for name in models}, inputs_by_batch, threads_list, warmup,
                                        iterations, chunk=chunk, session_factory=eager_session)
    finally:
        torch.set_num_threads(previous)
    return [{"name": name, "threads": row["threads"], "batch": row["batch"], "p50": row["p50"], "p90": row["p90"],
             "p99": row["p99"], "mean": row["mean"], "iterations": row["iterations"]}
            for name, rows in timings.items() for row in rows]
