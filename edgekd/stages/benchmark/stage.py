"""The benchmark stage's run: every ONNX artifact of the run measured side by side (see `measure`)."""

from __future__ import annotations

import logging
from typing import Any

from edgekd.errors import InputError, StageFailed
from edgekd.runner.context import RunContext
from edgekd.runner.contract import StageResult
from edgekd.stages.benchmark.config import BenchmarkJob
from edgekd.stages.distill.config import STUDENT
from edgekd.stages.export.config import EVAL_ARTIFACT
from edgekd.stages.teacher.config import ARTIFACT as TEACHER

log = logging.getLogger("edgekd")


def benchmark_stage(job: BenchmarkJob, ctx: RunContext) -> StageResult:
    import torch

    from edgekd.runtime.cpu import cpu_info, describe, environment_fingerprint
    from edgekd.runtime.evaluate import load_eval_npz
    from edgekd.runtime.timing import interleaved_benchmark
    from edgekd.stages.benchmark import measure as bm

    bench = job.benchmark
    threads, batches = list(dict.fromkeys(bench.threads)), list(dict.fromkeys(bench.batch_sizes))
    budget_threads, budget_batch = job.latency_threads, job.latency_batch
    providers = _providers(bench.providers)
    quantized = ctx.manifest.metrics("quantize") if "quantize" in ctx.depends_on else None
    artifacts = bm.collect_artifacts(ctx.manifest.metrics("export"), quantized, ctx.artifact)
    mobile_metrics = ctx.manifest.metrics("mobile") if "mobile" in ctx.depends_on else None
    artifacts += bm.mobile_artifacts(ctx.manifest.metrics("export"), mobile_metrics, ctx.artifact)
    opener = _opener(artifacts)
    if not artifacts:
        raise StageFailed("stage benchmark: the export stage recorded no models; rerun `edgekd run --from export`")
    data = load_eval_npz(ctx.artifact(EVAL_ARTIFACT))
    log.info("  %d artifacts (%s) on %d test images", len(artifacts), ", ".join(a.name for a in artifacts), len(data))

    sampled = ctx.manifest.metrics("export").get("eval", {})
    if sampled.get("of", 0) > sampled.get("samples", 0):  # eval.npz holds a sample of a large test split
        log.info("  accuracy on the whole test split (%d images, decoded batch by batch; eval.npz holds %d)",
                 sampled["of"], sampled["samples"])
        evaluations = bm.evaluate_artifacts_streamed(
            artifacts, ctx.data.numpy_batches("test", ctx.data_config.eval_batch_size), budget_threads, providers, opener)
    else:
        evaluations = bm.evaluate_artifacts(artifacts, data, budget_threads, providers, opener)
    inputs_by_batch = bm.batch_inputs(data.inputs, batches)
    log.info("  timing threads %s x batch %s: %d warm-up + %d runs, interleaved in chunks of %d",
             threads, batches, bench.warmup, bench.iterations, bench.chunk)
    timings = interleaved_benchmark({a.name: a.path for a in artifacts}, inputs_by_batch, threads, bench.warmup,
                                    bench.iterations, chunk=bench.chunk, providers=providers, keep_samples=True,
                                    session_factory=opener)
    peaks, measured_peaks = bm.measure_peaks(threads)
    rows = []
    for artifact in artifacts:
        # The probe is a torch-free child process: ExecuTorch's runtime needs torch, so .pte gets none.
        measurable = bench.memory and artifact.runtime != "executorch"
        memory = bm.peak_memory(artifact, budget_threads, budget_batch, providers) if measurable else None
        rows.append(bm.artifact_row(artifact, timings[artifact.name], evaluations[artifact.name], peaks,
                                    budget_threads, budget_batch, memory))

    profiles = {}
    if bench.profile_runs and budget_batch in inputs_by_batch:
        log.info("  per-operator profile: %d runs per model at %d thread(s), batch %d", bench.profile_runs,
                 budget_threads, budget_batch)
        profiles = bm.operator_profiles(artifacts, inputs_by_batch[budget_batch], budget_threads, bench.warmup,
                                        bench.profile_runs, providers)

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
               "profile": profiles, "budget_setting": {"threads": budget_threads, "batch": budget_batch}}
    return StageResult([], metrics, _summary(rows, budget_threads, budget_batch))


def _opener(artifacts: list[Any]) -> Any:
    """The session factory for every artifact: ORT's (parking idle workers between interleaved models, see
    interleaved_benchmark), LiteRT's and ExecuTorch's behind the same API."""
    import functools

    from edgekd.stages.mobile.sessions import open_artifact

    return functools.partial(open_artifact, stop_spinning_after_run=len(artifacts) > 1)


def _providers(requested: list[str]) -> list[str] | None:
    """benchmark.providers checked against this onnxruntime up front: a typo is bad input (exit 2), not a
    stage failure halfway through the measurements."""
    from edgekd.runtime.errors import RuntimeInputError
    from edgekd.runtime.session import resolve_providers

    try:
        return resolve_providers(requested) if requested else None
    except RuntimeInputError as exc:
        raise InputError(f"benchmark.providers: {exc}") from None


def _torch_models(ctx: RunContext) -> dict[str, Any]:
    """Teacher and student as PyTorch eager modules on the CPU (the ONNX models' sources)."""
    names = [TEACHER, STUDENT]
    present = ctx.manifest.all_artifacts()  # written by an earlier stage (distill may be off)
    return {name[:-len(".pt")]: ctx.load_model(name, device="cpu") for name in names if name in present}


def _summary(rows: list[dict[str, Any]], threads: int, batch: int) -> str:
    parts = []
    for row in rows:
        entry = next((r for r in row["latency_ms"] if r["threads"] == threads and r["batch"] == batch), None)
        latency = f"{entry['p50']:.3f} ms" if entry else "n/a"
        parts.append(f"{row['name']} {latency} acc {row['accuracy']:.4f}")
    return f"p50 at {threads} thread(s), batch {batch}: " + "; ".join(parts)
