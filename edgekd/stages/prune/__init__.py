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
from edgekd.stages.prune.latency import LatencySettings
from edgekd.train.config import KDConfig

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig
    from edgekd.runner.context import RunContext

NAME = "prune"
LATENCY_KEYS = ("target_latency_ms", "target_speedup", "latency_precision", "latency_rounds")


def plan(cfg: PipelineConfig) -> StagePlan | None:
    if cfg.prune is None:
        return None
    source = cfg.prune.source
    spec = cfg.teacher if source == "teacher" else cfg.student
    kd = cfg.distill.kd() if cfg.distill is not None else KDConfig()
    latency = latency_settings(cfg) if cfg.prune.measures_latency else None
    job = PruneJob(cfg.prune, kd, spec.model, dict(spec.model_kwargs), spec.weights, spec.pretrained, latency=latency)
    prune_view = cfg.prune.view()
    if latency is None:  # no latency measured: its settings decide nothing (and keep old fingerprints)
        for key in LATENCY_KEYS:
            prune_view.pop(key, None)
    view = {**cfg.data_view(), "prune": prune_view, "kd": kd.view(),
            "source_model": {"model": spec.model, "model_kwargs": dict(spec.model_kwargs)}}
    if latency is not None:  # where latency is timed decides the pruned shape
        view["latency"] = latency.view()
    model_source = factory_source(spec.model)
    if model_source is not None:
        view["model_source"] = model_source
    depends_on = (teacher.NAME, distill.NAME) if source == "student" else (teacher.NAME,)
    return StagePlan(settings=job, view=view, depends_on=depends_on, distributed=True,
                     libraries=(*TRAINING_LIBRARIES, "torch-pruning"))


def latency_settings(cfg: PipelineConfig) -> LatencySettings:
    """Latency is timed where the budgets measure it (threads, batch), in the precision that ships: int8 when
    static quantization follows (unless prune.latency_precision says otherwise), exported at export.opset."""
    assert cfg.prune is not None
    precision = cfg.prune.latency_precision
    if precision == "auto":
        precision = "int8" if cfg.quantize is not None and cfg.quantize.mode == "static" else "fp32"
    return LatencySettings(threads=cfg.budgets.latency_threads, batch=cfg.budgets.latency_batch, precision=precision,
                           rounds=cfg.prune.latency_rounds, opset=cfg.export.opset)


def run(job: PruneJob, ctx: RunContext) -> StageResult:
    from edgekd.stages.prune.stage import prune_stage

    return prune_stage(job, ctx)
