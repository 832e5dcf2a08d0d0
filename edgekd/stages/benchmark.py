"""Stage 6: every ONNX artifact measured side by side with ONNX Runtime on the same real test images.

Latency (interleaved across models, per thread count and batch size), accuracy and agreement with the
teacher on the full eval.npz, peak memory in a fresh process, the compute-bound floor from measured peak
GFLOP/s, mobile readiness, and a PyTorch eager reference. Writes no files: everything goes to metrics
(the report stage reads them; see docs/architecture.md and the report.json contract).
"""

from __future__ import annotations

from typing import Any

from edgekd.config import PipelineConfig
from edgekd.pipeline import RunContext, StageResult, log
from edgekd.stages import model_factories, section

NAME = "benchmark"
EVAL_FILE = "eval.npz"


def enabled(cfg: PipelineConfig) -> bool:
    return True  # the teacher row is always there to compare against


def depends_on(cfg: PipelineConfig) -> list[str]:
    return ["export"] + (["quantize"] if cfg.quantize_enabled else [])


def config_view(cfg: PipelineConfig) -> dict[str, Any]:
    budgets = {"latency_threads": cfg.budgets.latency_threads, "latency_batch": cfg.budgets.latency_batch}
    return {"benchmark": section(cfg.benchmark), "budgets": budgets}


def run(cfg: PipelineConfig, ctx: RunContext) -> StageResult:
    import torch

    from edgekd import benchmarking as bm
    from edgekd.runtime.cpu import cpu_info, describe, environment_fingerprint
    from edgekd.runtime.evaluate import load_eval_npz
    from edgekd.runtime.timing import interleaved_benchmark

    bench = cfg.benchmark
    threads, batches = list(dict.fromkeys(bench.threads)), list(dict.fromkeys(bench.batch_sizes))
    budget_threads, budget_batch = cfg.budgets.latency_threads, cfg.budgets.latency_batch
    providers = _providers(bench.providers)
    quantize = _quantized(cfg, ctx)
    artifacts = bm.collect_artifacts(_exported(ctx), quantize, ctx.artifact)
    if not artifacts:
        from edgekd.errors import StageFailed

        raise StageFailed("stage benchmark: the export stage recorded no models; rerun `edgekd run --from export`")
    data = load_eval_npz(ctx.artifact(EVAL_FILE))
    log.info("  %d artifacts (%s) on %d test images", len(artifacts), ", ".join(a.name for a in artifacts), len(data))

    evaluations = bm.evaluate_artifacts(artifacts, data, budget_threads, providers)
    inputs_by_batch = bm.batch_inputs(data.inputs, batches)
    log.info("  timing threads %s x batch %s: %d warm-up + %d runs, interleaved in chunks of %d",
             threads, batches, bench.warmup, bench.iterations, bench.chunk)
    timings = interleaved_benchmark({a.name: a.path for a in artifacts}, inputs_by_batch, threads, bench.warmup,
                                    bench.iterations, chunk=bench.chunk, providers=providers, keep_samples=True)
    peaks, measured_peaks = bm.measure_peaks(threads)
    rows = []
    for artifact in artifacts:
        memory = bm.peak_memory(artifact, budget_threads, budget_batch, providers) if bench.memory else None
        rows.append(bm.artifact_row(artifact, timings[artifact.name], evaluations[artifact.name], peaks,
                                    budget_threads, budget_batch, memory))

    mobile = {}
    for artifact in bm.mobile_candidates(artifacts):
        log.info("  mobile readiness of %s", artifact.name)
        mobile[artifact.name] = bm.mobile_readiness(artifact)

    torch_rows: list[dict[str, Any]] = []
    if bench.torch_reference:
        models = _torch_models(ctx)
        if models:
            log.info("  PyTorch eager reference: %s", ", ".join(models))
            torch_rows = bm.torch_reference_rows(models, inputs_by_batch, threads, bench.warmup, bench.iterations,
                                                 bench.chunk)

    info = cpu_info()
    environment = {**info, "description": describe(info), "torch": torch.__version__, "peak_gflops": peaks,
                   "peak_gflops_measured": measured_peaks,
                   "fingerprint": environment_fingerprint(info), "threads_measured": threads}
    metrics = {"environment": environment, "artifacts": rows, "torch_reference": torch_rows, "mobile": mobile,
               "budget_setting": {"threads": budget_threads, "batch": budget_batch}}
    return StageResult([], metrics, _summary(rows, budget_threads, budget_batch))


def _providers(requested: list[str]) -> list[str] | None:
    """benchmark.providers checked against this onnxruntime up front: a typo is bad input (exit 2), not a
    stage failure halfway through the measurements."""
    from edgekd.errors import InputError
    from edgekd.runtime.errors import RuntimeInputError
    from edgekd.runtime.session import resolve_providers

    try:
        return resolve_providers(requested) if requested else None
    except RuntimeInputError as exc:
        raise InputError(f"benchmark.providers: {exc}") from None


def _exported(ctx: RunContext) -> dict[str, Any]:
    """The export metrics; when they list no models, the .onnx files the export stage recorded."""
    metrics = dict(ctx.metrics("export"))
    if not metrics.get("models"):
        files = ctx.manifest.get("stages", {}).get("export", {}).get("artifacts") or {}
        metrics["models"] = {name[: -len(".onnx")]: {"path": name} for name in files if name.endswith(".onnx")}
    return metrics


def _quantized(cfg: PipelineConfig, ctx: RunContext) -> dict[str, Any] | None:
    """The quantize stage's metrics when it wrote an int8 model (a stage that kept no model has no row)."""
    from edgekd.benchmarking import INT8_FILE

    if not cfg.quantize_enabled or not ctx.has_stage("quantize"):
        return None
    metrics = ctx.metrics("quantize")
    written = ctx.manifest["stages"]["quantize"].get("artifacts") or {}
    file = metrics.get("path") or metrics.get("artifact") or INT8_FILE
    if written and file not in written:
        log.info("  no int8 row: the quantize stage wrote no %s", file)
        return None
    return metrics


def _torch_models(ctx: RunContext) -> dict[str, Any]:
    """Teacher and student as PyTorch eager modules on the CPU (the ONNX models' sources)."""
    from edgekd.models import load_model

    shape_info = ctx.metrics("teacher").get("data") or {}
    if shape_info.get("num_classes") and len(shape_info.get("input_shape") or []) == 3:
        num_classes, (channels, height, _) = int(shape_info["num_classes"]), shape_info["input_shape"]
    else:  # older manifests: ask the data (slower, loads the dataset)
        meta = ctx.data.meta
        num_classes, channels, height = meta.num_classes, meta.channels, meta.height
    models = {}
    for name in ("teacher", "student"):
        path = ctx.path(f"{name}.pt")
        if path.is_file():
            models[name] = load_model(path, num_classes=num_classes, in_channels=int(channels),
                                      input_size=int(height), factories=model_factories(ctx.cfg)).cpu().eval()
    return models


def _summary(rows: list[dict[str, Any]], threads: int, batch: int) -> str:
    parts = []
    for row in rows:
        entry = next((r for r in row["latency_ms"] if r["threads"] == threads and r["batch"] == batch), None)
        latency = f"{entry['p50']:.3f} ms" if entry else "n/a"
        parts.append(f"{row['name']} {latency} acc {row['accuracy']:.4f}")
    return f"p50 at {threads} thread(s), batch {batch}: " + "; ".join(parts)
