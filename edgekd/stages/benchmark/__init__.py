"""Stage 6: every artifact measured side by side on the same real test images — ONNX files on ONNX Runtime,
`.tflite` on LiteRT, `.pte` on ExecuTorch (the mobile stage's files), one interleaved loop
(`measure`: latency, accuracy, memory, compute bound, mobile readiness, PyTorch reference). Writes no
files: everything goes to metrics, which the report stage reads."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgekd.runner.contract import StagePlan, StageResult
from edgekd.stages import export, mobile, quantize
from edgekd.stages.benchmark.config import BenchmarkJob

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig
    from edgekd.runner.context import RunContext

NAME = "benchmark"


def plan(cfg: PipelineConfig) -> StagePlan:
    # The teacher row is always there to compare against: the stage cannot be switched off.
    budgets = {"latency_threads": cfg.budgets.latency_threads, "latency_batch": cfg.budgets.latency_batch}
    job = BenchmarkJob(cfg.benchmark, **budgets)
    mobile_plan = mobile.plan(cfg)
    depends_on = (export.NAME, *((quantize.NAME,) if cfg.quantize else ()), *((mobile.NAME,) if mobile_plan else ()))
    libraries = ("onnxruntime", *(("torch",) if cfg.benchmark.torch_reference else ()),
                 *(lib for lib in (mobile_plan.libraries if mobile_plan else ()) if lib != "torch"))
    return StagePlan(settings=job, view={"benchmark": cfg.benchmark.view(), "budgets": budgets}, depends_on=depends_on,
                     libraries=libraries)


def run(job: BenchmarkJob, ctx: RunContext) -> StageResult:
    from edgekd.stages.benchmark.stage import benchmark_stage

    return benchmark_stage(job, ctx)
