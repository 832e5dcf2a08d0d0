"""Stage 1: load a trained teacher from a checkpoint, or train one with the shared loop."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from edgekd import atomic
from edgekd.runner.context import RunContext
from edgekd.runner.contract import StagePlan, StageResult
from edgekd.runner.keys import TRAINING_LIBRARIES, factory_source
from edgekd.stages.teacher.config import ARTIFACT, MODEL, TeacherConfig

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig

log = logging.getLogger("edgekd")

NAME = "teacher"


def plan(cfg: PipelineConfig) -> StagePlan:
    view = {**cfg.data_view(), "teacher": cfg.teacher.view()}
    if cfg.teacher.checkpoint is not None and cfg.teacher.checkpoint.is_file():
        view["checkpoint_sha256"] = atomic.sha256_file(cfg.teacher.checkpoint)  # a new file means a new teacher
    source = factory_source(cfg.teacher.model)
    if source is not None:
        view["model_source"] = source
    return StagePlan(settings=cfg.teacher, view=view, distributed=True, libraries=TRAINING_LIBRARIES)


def run(teacher: TeacherConfig, ctx: RunContext) -> StageResult:
    from edgekd.models import count_parameters, model_meta
    from edgekd.models.checkpoint import load_into, read_checkpoint, save_checkpoint
    from edgekd.train.loop import accuracy, check_modes, fit, predict

    data, batches = ctx.data, ctx.data_config
    log.info("  data: %s, %s, splits %s", data.meta.dataset, "x".join(map(str, data.meta.input_shape)), data.meta.split_sizes)
    model = ctx.build_model(teacher.model, teacher.model_kwargs, "teacher.model")
    metrics: dict[str, Any] = {"model": teacher.model, "params": count_parameters(model)}
    if teacher.checkpoint is not None:
        state, _ = read_checkpoint(teacher.checkpoint)
        load_into(model, state, str(teacher.checkpoint))
        model.to(ctx.device)
        metrics["source"] = str(teacher.checkpoint)
    else:
        result = fit(
            model, data, teacher.train, device=ctx.device, seed=ctx.seed, desc="teacher",
            batch_size=batches.batch_size, eval_batch_size=batches.eval_batch_size, log=log.info,
            config_key="teacher.train",
        )
        metrics.update(source="trained", history=result.history, best_epoch=result.best_epoch, train_wall_s=result.wall_s,
                       data_loader=result.loader)
    val_accuracy = accuracy(predict(model, data.val, data, ctx.device, batches.eval_batch_size), data.val.labels)
    metrics["mode_check"] = (result.mode_check if teacher.checkpoint is None else
                             check_modes(model, data, ctx.device, val_accuracy, batches.eval_batch_size, "teacher",
                                         "teacher.checkpoint"))
    test_accuracy = accuracy(predict(model, data.test, data, ctx.device, batches.eval_batch_size), data.test.labels)
    metrics.update(val_accuracy=round(val_accuracy, 6), test_accuracy=round(test_accuracy, 6), data=_data_summary(data))
    save_checkpoint(model, ctx.path(ARTIFACT), model_meta(teacher.model, teacher.model_kwargs, MODEL))
    return StageResult([ARTIFACT], metrics, f"{metrics['params']:,} params, val {val_accuracy:.4f}, test {test_accuracy:.4f}")


def _data_summary(data: Any) -> dict[str, Any]:
    meta = data.meta
    summary = {
        "dataset": meta.dataset, "num_classes": meta.num_classes, "input_shape": list(meta.input_shape),
        "mean": meta.mean, "std": meta.std, "labels": meta.labels, "split_sizes": meta.split_sizes,
    }
    if meta.streamed:  # image files: how they become inputs, and what could not be read
        summary.update(resize=meta.resize, crop=list(meta.crop) if meta.crop else None,
                       skipped_images=data.skipped_summary())
    return summary
