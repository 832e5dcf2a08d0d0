"""Stage 1: load a trained teacher from a checkpoint, train one with the shared loop (from random or pretrained
weights: fine-tuning), or take an ONNX teacher from any framework (`teacher.onnx`, run by ONNX Runtime)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from edgekd import atomic
from edgekd.runner.context import RunContext
from edgekd.runner.contract import StagePlan, StageResult
from edgekd.runner.keys import TRAINING_LIBRARIES, factory_source
from edgekd.stages.teacher.config import ARTIFACT, MODEL, ONNX_ARTIFACT, TeacherConfig

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig

log = logging.getLogger("edgekd")

NAME = "teacher"


def plan(cfg: PipelineConfig) -> StagePlan:
    if cfg.teacher.onnx is not None:  # the file decides everything (model, weights and train are refused with it)
        view = {**cfg.data_view(), "teacher": {"onnx": str(cfg.teacher.onnx)}}
        if cfg.teacher.onnx.is_file():
            view["onnx_sha256"] = atomic.sha256_file(cfg.teacher.onnx)
        return StagePlan(settings=cfg.teacher, view=view, distributed=True,
                         libraries=(*TRAINING_LIBRARIES, "onnx", "onnxruntime"))
    view = {**cfg.data_view(), "teacher": cfg.teacher.view()}
    if cfg.teacher.checkpoint is not None and cfg.teacher.checkpoint.is_file():
        view["checkpoint_sha256"] = atomic.sha256_file(cfg.teacher.checkpoint)  # a new file means a new teacher
    source = factory_source(cfg.teacher.model)
    if source is not None:
        view["model_source"] = source
    libraries = (*TRAINING_LIBRARIES, "timm") if cfg.teacher.model.startswith("timm:") else TRAINING_LIBRARIES
    return StagePlan(settings=cfg.teacher, view=view, distributed=True, libraries=libraries)


def run(teacher: TeacherConfig, ctx: RunContext) -> StageResult:
    from edgekd.models import count_parameters, model_meta
    from edgekd.models.checkpoint import load_into, read_checkpoint, save_checkpoint
    from edgekd.train.loop import accuracy, check_modes, fit, predict

    data, batches = ctx.data, ctx.data_config
    log.info("  data: %s, %s, splits %s", data.meta.dataset, "x".join(map(str, data.meta.input_shape)), data.meta.split_sizes)
    if data.meta.streamed:  # the eval transform the app must reproduce (preprocess.json), defaults resolved
        meta = data.meta
        geometry = (f"resize {meta.resize}, center crop {meta.crop[0]}x{meta.crop[1]}" if meta.resize and meta.crop
                    else f"squash to {meta.height}x{meta.width}")
        log.info("  eval transform: %s, mean %s, std %s%s", geometry, [round(v, 4) for v in meta.mean],
                 [round(v, 4) for v in meta.std], " (from the pretrained weights where the config is silent)"
                 if ctx.data_defaults else "")
    if teacher.onnx is not None:
        return _onnx_teacher(teacher, ctx)
    model = ctx.build_model(teacher.model, teacher.model_kwargs, "teacher.model", weights=teacher.weights,
                            pretrained=teacher.pretrained, load_weights=teacher.checkpoint is None)
    metrics: dict[str, Any] = {"model": teacher.model, "params": count_parameters(model)}
    if teacher.weights is not None or teacher.pretrained:
        metrics["pretrained"] = teacher.weights or True
        log.info("  teacher: %s from pretrained weights (%s), head replaced for %d classes%s", teacher.model,
                 teacher.weights or "timm", data.meta.num_classes,
                 "" if teacher.checkpoint is not None else f", fine-tuned for {teacher.train.epochs} epoch(s)")
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
        metrics.update(source="fine-tuned" if "pretrained" in metrics else "trained", history=result.history,
                       best_epoch=result.best_epoch, train_wall_s=result.wall_s, data_loader=result.loader)
    val_accuracy = accuracy(predict(model, data.val, data, ctx.device, batches.eval_batch_size), data.val.labels)
    metrics["mode_check"] = (result.mode_check if teacher.checkpoint is None else
                             check_modes(model, data, ctx.device, val_accuracy, batches.eval_batch_size, "teacher",
                                         "teacher.checkpoint"))
    test_accuracy = accuracy(predict(model, data.test, data, ctx.device, batches.eval_batch_size), data.test.labels)
    metrics.update(val_accuracy=round(val_accuracy, 6), test_accuracy=round(test_accuracy, 6), data=_data_summary(data))
    save_checkpoint(model, ctx.path(ARTIFACT), model_meta(teacher.model, teacher.model_kwargs, MODEL,
                                                          weights=teacher.weights, pretrained=teacher.pretrained))
    return StageResult([ARTIFACT], metrics, f"{metrics['params']:,} params, val {val_accuracy:.4f}, test {test_accuracy:.4f}")


def onnx_info(path: Any, meta: Any) -> Any:
    """The ONNX teacher checked against the data (InputError on a mismatch; see models.onnx_teacher)."""
    from edgekd.models.onnx_teacher import inspect_onnx_teacher

    return inspect_onnx_teacher(path, channels=meta.channels, height=meta.height, width=meta.width,
                                num_classes=meta.num_classes)


def load_teacher(ctx: RunContext, *, device: Any = None) -> Any:
    """The run's teacher as a torch module in eval mode: teacher.pt, or the ONNX teacher's run-directory copy
    behind `OnnxTeacher` (logits from ONNX Runtime). What distill, prune recovery and export use."""
    if ONNX_ARTIFACT in ctx.manifest.artifacts(NAME):
        from edgekd.models.onnx_teacher import OnnxTeacher

        path = ctx.artifact(ONNX_ARTIFACT)
        return OnnxTeacher(path, onnx_info(path, ctx.data.meta)).eval()
    return ctx.load_model(ARTIFACT, device=device)


def _onnx_teacher(teacher: TeacherConfig, ctx: RunContext) -> StageResult:
    """Check the ONNX file against the data, copy it into the run directory (NCHW: an NHWC model gets a Transpose
    node in front), and measure it like a trained teacher."""
    from edgekd.models.onnx_teacher import OnnxTeacher, nchw_copy
    from edgekd.train.loop import accuracy, predict

    assert teacher.onnx is not None
    data, eval_batch = ctx.data, ctx.data_config.eval_batch_size
    info = onnx_info(teacher.onnx, data.meta)
    nchw_copy(teacher.onnx, ctx.path(ONNX_ARTIFACT), info)
    model = OnnxTeacher(ctx.path(ONNX_ARTIFACT), onnx_info(ctx.path(ONNX_ARTIFACT), data.meta))
    for note in info.adaptations():
        log.info("  teacher.onnx: %s", note)
    params = model.num_parameters
    val_accuracy = accuracy(predict(model, data.val, data, ctx.device, eval_batch), data.val.labels)
    test_accuracy = accuracy(predict(model, data.test, data, ctx.device, eval_batch), data.test.labels)
    metrics: dict[str, Any] = {
        "model": f"onnx:{teacher.onnx.name}", "source": str(teacher.onnx), "params": params,
        "onnx": {"file": teacher.onnx.name, "sha256": atomic.sha256_file(teacher.onnx), "layout": info.layout,
                 "output": info.output_kind, "adaptations": info.adaptations()},
        "val_accuracy": round(val_accuracy, 6), "test_accuracy": round(test_accuracy, 6), "data": _data_summary(data),
    }
    return StageResult([ONNX_ARTIFACT], metrics,
                       f"ONNX teacher {teacher.onnx.name}, {params:,} params, val {val_accuracy:.4f}, test {test_accuracy:.4f}")


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
