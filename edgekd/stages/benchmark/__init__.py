"""Stage 6: every ONNX artifact measured side by side with ONNX Runtime on the same real test images
(`measure`: latency, accuracy, memory, compute bound, mobile readiness, PyTorch reference). Writes no
files: everything goes to metrics, which the report stage reads."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgekd.runner.contract import StagePlan, StageResult
from edgekd.stages import export, quantize
from edgekd.stages.benchmark.config import BenchmarkJob

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig
    from edgekd.runner.context import RunContext

NAME = "benchmark"


def plan(cfg: PipelineConfig) -> StagePlan:
    # The teacher row is always there to compare against: the stage cannot be switched off.
    budgets = {"latency_threads": cfg.budgets.latency_threads, "latency_batch": cfg.budgets.latency_batch}
    job = BenchmarkJob(cfg.benchmark, **budgets)
    depends_on = (export.NAME, *((quantize.NAME,) if cfg.quantize else ()))
    libraries = ("onnxruntime", *(("torch",) if cfg.benchmark.torch_reference else ()))
    return StagePlan(settings=job, view={"benchmark": cfg.benchmark.view(), "budgets": budgets}, depends_on=depends_on,
                     libraries=libraries)


def run(job: BenchmarkJob, ctx: RunContext) -> StageResult:
    from edgekd.stages.benchmark.stage import benchmark_stage

    return benchmark_stage(job, ctx)
