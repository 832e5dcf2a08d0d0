"""Stage 4: every model of the run to ONNX (`exporter`: torch.onnx, checker, parity, metadata), checked
against PyTorch, plus the evaluation data later stages and devices measure on."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgekd.runner.contract import StagePlan, StageResult
from edgekd.stages import distill, prune, teacher
from edgekd.stages.export.config import ExportConfig

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig
    from edgekd.runner.context import RunContext

NAME = "export"
EVAL_ARTIFACT = "eval.npz"
VAL_ARTIFACT = "val.npz"
# The fp32 models a run can have, in report order: the reference first, then each compression step.
MODEL_ORDER = (teacher.MODEL, distill.BASELINE_MODEL, distill.STUDENT_MODEL, prune.MODEL)


def onnx_name(model: str) -> str:
    return f"{model}.onnx"


def ort_sidecars(folder: Path, ort_path: Path) -> list[str]:
    """Files the ORT converter leaves beside a .ort (the operator list a minimal ORT build needs)."""
    config = folder / f"{ort_path.stem}.required_operators.config"
    return [config.name] if config.is_file() else []


def plan(cfg: PipelineConfig) -> StagePlan:
    depends_on = (teacher.NAME, *((distill.NAME,) if cfg.distill else ()), *((prune.NAME,) if cfg.prune else ()))
    return StagePlan(settings=cfg.export, view={**cfg.data_view(), "export": cfg.export.view()}, depends_on=depends_on)


def run(export: ExportConfig, ctx: RunContext) -> StageResult:
    from edgekd.stages.export.stage import export_stage

    return export_stage(export, ctx, ctx.depends_on)
