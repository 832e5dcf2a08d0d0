"""Stage 5: int8 post-training quantization of the last fp32 model with onnxruntime.quantization
(`quantization`: pre-processing, calibration readers, settings), kept only if it earns its place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgekd.runner.contract import StagePlan, StageResult
from edgekd.stages import export
from edgekd.stages.quantize.config import ARTIFACT, MODELS, QuantizeJob

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig
    from edgekd.runner.context import RunContext

NAME = "quantize"


def plan(cfg: PipelineConfig) -> StagePlan | None:
    if cfg.quantize is None:
        return None
    # data decides the calibration images; ort_format whether a .ort copy is made
    view = {**cfg.data_view(), "quantize": cfg.quantize.view(), "ort_format": cfg.export.ort_format}
    return StagePlan(settings=QuantizeJob(cfg.quantize, cfg.export.ort_format), view=view, depends_on=(export.NAME,),
                     libraries=("onnx", "onnxruntime"))


def run(job: QuantizeJob, ctx: RunContext) -> StageResult:
    from edgekd.stages.quantize.stage import quantize_stage

    return quantize_stage(job, ctx)
