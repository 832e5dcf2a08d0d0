"""Stage 3: structured channel pruning (torch-pruning) of the student or the teacher, with KD recovery.

`pruning` holds the mechanics (importance, targets, iterative steps); `stage` loads the models, prunes,
fine-tunes after each step with KD from the teacher through the shared training loop, and saves `pruned.pt`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgekd.runner.contract import StagePlan, StageResult
from edgekd.runner.keys import TRAINING_LIBRARIES, factory_source
from edgekd.stages import distill, teacher
from edgekd.stages.prune.config import ARTIFACT, MODEL, PruneJob
from edgekd.train.config import KDConfig

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig
    from edgekd.runner.context import RunContext

NAME = "prune"


def plan(cfg: PipelineConfig) -> StagePlan | None:
    if cfg.prune is None:
        return None
    source = cfg.prune.source
    spec = cfg.teacher if source == "teacher" else cfg.student
    kd = cfg.distill.kd() if cfg.distill is not None else KDConfig()
    job = PruneJob(cfg.prune, kd, spec.model, dict(spec.model_kwargs), spec.weights, spec.pretrained)
    view = {**cfg.data_view(), "prune": cfg.prune.view(), "kd": kd.view(),
            "source_model": {"model": spec.model, "model_kwargs": dict(spec.model_kwargs)}}
    model_source = factory_source(spec.model)
    if model_source is not None:
        view["model_source"] = model_source
    depends_on = (teacher.NAME, distill.NAME) if source == "student" else (teacher.NAME,)
    return StagePlan(settings=job, view=view, depends_on=depends_on, distributed=True,
                     libraries=(*TRAINING_LIBRARIES, "torch-pruning"))


def run(job: PruneJob, ctx: RunContext) -> StageResult:
    from edgekd.stages.prune.stage import prune_stage

    return prune_stage(job, ctx)
