"""Stage 4: every model of the run to ONNX (`exporter`: torch.onnx, checker, parity, metadata), checked
against PyTorch, plus the evaluation data later stages and devices measure on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgekd.runner.contract import StagePlan, StageResult
from edgekd.stages import distill, prune, teacher
from edgekd.stages.export.config import EVAL_ARTIFACT, MODEL_ORDER, VAL_ARTIFACT, ExportConfig, onnx_name

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig
    from edgekd.runner.context import RunContext

NAME = "export"
def plan(cfg: PipelineConfig) -> StagePlan:
    depends_on = (teacher.NAME, *((distill.NAME,) if cfg.distill else ()), *((prune.NAME,) if cfg.prune else ()))
    libraries = ("torch", "onnx", "onnxruntime", *(("onnxscript",) if cfg.export.dynamo else ()))
    return StagePlan(settings=cfg.export, view={**cfg.data_view(), "export": cfg.export.view()}, depends_on=depends_on,
                     libraries=libraries)


def run(export: ExportConfig, ctx: RunContext) -> StageResult:
    from edgekd.stages.export.stage import export_stage

    return export_stage(export, ctx, ctx.depends_on)
