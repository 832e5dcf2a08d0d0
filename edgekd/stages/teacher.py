"""Stage 1: load a trained teacher from a checkpoint, or train one with the shared loop."""

from __future__ import annotations

from typing import Any

from edgekd import atomic
from edgekd.config import PipelineConfig
from edgekd.pipeline import RunContext, StageResult, log
from edgekd.stages import build_model, data_view, section

NAME = "teacher"
DISTRIBUTED = True  # trains on every rank under torchrun
ARTIFACT = "teacher.pt"


def enabled(cfg: PipelineConfig) -> bool:
    return True


def depends_on(cfg: PipelineConfig) -> list[str]:
    return []


def config_view(cfg: PipelineConfig) -> dict[str, Any]:
    view = {**data_view(cfg), "teacher": section(cfg.teacher)}
    if cfg.teacher.checkpoint is not None and cfg.teacher.checkpoint.is_file():
        view["checkpoint_sha256"] = atomic.sha256_file(cfg.teacher.checkpoint)  # a new file means a new teacher
    else:
        view.pop("checkpoint_sha256", None)
    return view


def run(cfg: PipelineConfig, ctx: RunContext) -> StageResult:
    from edgekd.models import count_parameters, model_meta
    from edgekd.models.checkpoint import load_into, read_checkpoint, save_checkpoint
    from edgekd.training import accuracy, fit, predict

    data = ctx.data
    log.info("  data: %s, %s, splits %s", data.meta.dataset, "x".join(map(str, data.meta.input_shape)), data.meta.split_sizes)
    model = build_model(ctx, cfg.teacher.model, cfg.teacher.model_kwargs, "teacher.model")
    metrics: dict[str, Any] = {"model": cfg.teacher.model, "params": count_parameters(model)}
    if cfg.teacher.checkpoint is not None:
        state, _ = read_checkpoint(cfg.teacher.checkpoint)
        load_into(model, state, str(cfg.teacher.checkpoint))
        model.to(ctx.device)
        metrics["source"] = str(cfg.teacher.checkpoint)
    else:
        result = fit(
            model, data, cfg.teacher.train, device=ctx.device, seed=cfg.seed, desc="teacher",
            batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size, log=log.info,
        )
        metrics.update(source="trained", history=result.history, best_epoch=result.best_epoch, train_wall_s=result.wall_s)
    val_accuracy = accuracy(predict(model, data.val, data, ctx.device, cfg.data.eval_batch_size), data.val.labels)
    test_accuracy = accuracy(predict(model, data.test, data, ctx.device, cfg.data.eval_batch_size), data.test.labels)
    metrics.update(val_accuracy=round(val_accuracy, 6), test_accuracy=round(test_accuracy, 6), data=_data_summary(data))
    save_checkpoint(model, ctx.path(ARTIFACT), model_meta(cfg.teacher.model, cfg.teacher.model_kwargs, "teacher"))
    return StageResult([ARTIFACT], metrics, f"{metrics['params']:,} params, val {val_accuracy:.4f}, test {test_accuracy:.4f}")


def _data_summary(data: Any) -> dict[str, Any]:
    meta = data.meta
    return {
        "dataset": meta.dataset, "num_classes": meta.num_classes, "input_shape": list(meta.input_shape),
        "mean": meta.mean, "std": meta.std, "labels": meta.labels, "split_sizes": meta.split_sizes,
    }
