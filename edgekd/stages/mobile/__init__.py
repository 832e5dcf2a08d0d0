"""Stage 5b: the last model of the chain exported for the mobile runtimes app developers embed besides ONNX
Runtime — LiteRT (`.tflite`, via litert-torch, `litert`) and ExecuTorch (`.pte`, XNNPACK, `executorch_export`) —
in fp32 and, with each runtime's own PT2E quantizer on the quantize stage's calibration images, int8; each
int8 file passes the accuracy gate (`edgekd.gate.accuracy`). Switched off unless `export.targets` names one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgekd.runner.contract import StagePlan, StageResult
from edgekd.stages import distill, export, prune, teacher
from edgekd.stages.mobile.config import MobileJob

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig
    from edgekd.runner.context import RunContext

NAME = "mobile"
# The distributions whose versions decide each target's files (part of the fingerprint).
TARGET_LIBRARIES = {"tflite": ("litert-torch", "ai-edge-litert", "torchao"), "pte": ("executorch", "torchao")}


def plan(cfg: PipelineConfig) -> StagePlan | None:
    targets = tuple(t for t in cfg.export.targets if t != "onnx")
    if not targets:
        return None
    # The checkpoints' stages: the source model's weights are part of the fingerprint.
    depends_on = (teacher.NAME, *((distill.NAME,) if cfg.distill else ()), *((prune.NAME,) if cfg.prune else ()),
                  export.NAME)
    libraries = tuple(dict.fromkeys(("torch", *(lib for t in targets for lib in TARGET_LIBRARIES[t]))))
    view = {**cfg.data_view(), "targets": list(targets),
            "quantize": cfg.quantize.view() if cfg.quantize else None, "parity_atol": cfg.export.parity_atol}
    return StagePlan(settings=MobileJob(targets, cfg.quantize, cfg.export.parity_atol), view=view,
                     depends_on=depends_on, libraries=libraries)


def run(job: MobileJob, ctx: RunContext) -> StageResult:
    from edgekd.stages.mobile.stage import mobile_stage

    return mobile_stage(job, ctx)
