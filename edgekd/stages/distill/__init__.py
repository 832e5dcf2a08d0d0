"""Stage 2: distill the teacher into the student (Hinton KD, optional FitNets hint), and train the same
student without KD from the same initial weights, schedule, seed and data, so the KD gain is measured."""

from __future__ import annotations

import copy
import logging
import shutil
from typing import TYPE_CHECKING, Any

from edgekd import atomic
from edgekd.runner.context import RunContext
from edgekd.runner.contract import StagePlan, StageResult
from edgekd.runner.keys import TRAINING_LIBRARIES, factory_source
from edgekd.stages import teacher as teacher_stage
from edgekd.stages.distill.config import BASELINE, BASELINE_MODEL, STUDENT, STUDENT_MODEL, DistillJob

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig

log = logging.getLogger("edgekd")

NAME = "distill"


def plan(cfg: PipelineConfig) -> StagePlan | None:
    if cfg.distill is None:
        return None
    view = {**cfg.data_view(), "student": cfg.student.view(), "distill": cfg.distill.view()}
    if cfg.student.checkpoint is not None and cfg.student.checkpoint.is_file():
        view["checkpoint_sha256"] = atomic.sha256_file(cfg.student.checkpoint)
    source = factory_source(cfg.student.model)
    if source is not None:
        view["model_source"] = source
    libraries = (*TRAINING_LIBRARIES, "timm") if cfg.student.model.startswith("timm:") else TRAINING_LIBRARIES
    return StagePlan(settings=DistillJob(cfg.distill, cfg.student), view=view, depends_on=(teacher_stage.NAME,),
                     distributed=True, libraries=libraries)


def check_sizes(student_params: int, teacher_params: int) -> bool:
    """A student larger than its teacher is allowed (maybe on purpose), but almost always a config slip."""
    if student_params > teacher_params:
        log.warning(
            "  warning: the student (%s params) is larger than the teacher (%s params); check student.model",
            f"{student_params:,}", f"{teacher_params:,}",
        )
        return False
    return True


def run(job: DistillJob, ctx: RunContext) -> StageResult:
    from edgekd.models import count_parameters, model_meta
    from edgekd.models.checkpoint import load_into, read_checkpoint, save_checkpoint
    from edgekd.train.hints import build_hint
    from edgekd.train.loop import accuracy, agreement, fit, predict
    from edgekd.train.objectives import CrossEntropyObjective, make_kd_objective

    settings, student_spec = job.distill, job.student
    data, device = ctx.data, ctx.device
    eval_batch = ctx.data_config.eval_batch_size

    teacher = teacher_stage.load_teacher(ctx)
    student = ctx.build_model(student_spec.model, student_spec.model_kwargs, "student.model",
                              weights=student_spec.weights, pretrained=student_spec.pretrained,
                              load_weights=student_spec.checkpoint is None)
    if student_spec.checkpoint is not None:  # the student (and its baseline) start from the user's weights
        state, _ = read_checkpoint(student_spec.checkpoint)
        load_into(student, state, str(student_spec.checkpoint))
        log.info("  student: starts from %s", student_spec.checkpoint.name)
    student.to(device)
    initial_state = copy.deepcopy(student.state_dict())  # the baseline starts from the very same weights
    teacher_params = getattr(teacher, "num_parameters", None) or count_parameters(teacher)  # ONNX: its initializers
    student_params = count_parameters(student)
    check_sizes(student_params, teacher_params)

    hint = build_hint(settings.hint, teacher, student, data, device)  # validates the layer names before any training
    teacher_val = predict(teacher, data.val, data, device, eval_batch)
    teacher_test = predict(teacher, data.test, data, device, eval_batch)
    common = dict(device=device, seed=ctx.seed, batch_size=ctx.data_config.batch_size, eval_batch_size=eval_batch,
                  log=log.info)

    from edgekd.train import distributed

    logits_folder = ctx.work_folder("distill-teacher-logits") if distributed.is_main() else None
    objective = make_kd_objective(settings.kd(), teacher, data, device, augment=settings.augment, hint=hint,
                                  cache_dir=logits_folder)
    log.info(
        "  KD: T=%g alpha=%g%s, teacher logits %s", settings.temperature, settings.alpha,
        f", hint {hint.layers['teacher']} <- {hint.layers['student']} (beta={hint.weight:g})" if hint else "",
        "cached" if objective.cache is not None else "computed every batch",
    )
    try:
        result = fit(student, data, settings, objective=objective, desc="distill", reference_val_logits=teacher_val,
                     config_key="distill", **common)
    finally:
        objective.close()  # removes the hint hooks from the student before it is saved or reused, and the cache
        if logits_folder is not None:
            shutil.rmtree(logits_folder, ignore_errors=True)
    student_test = predict(student, data.test, data, device, eval_batch)

    metrics: dict[str, Any] = {
        "model": student_spec.model,
        "temperature": settings.temperature,
        "alpha": settings.alpha,
        "hint": {**hint.layers, "weight": hint.weight, "shapes": hint.shapes} if hint else None,
        "device": str(device),
        "student_params": student_params,
        "teacher_params": teacher_params,
        "teacher_test_accuracy": round(accuracy(teacher_test, data.test.labels), 6),
        "student_test_accuracy": round(accuracy(student_test, data.test.labels), 6),
        "student_test_agreement": round(agreement(student_test, teacher_test), 6),
        "student_val_accuracy": result.best_val_accuracy,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "mode_check": result.mode_check,
        "cache": {"enabled": True, **objective.cache.stats()} if objective.cache is not None
        else {"enabled": False, "hits": 0, "misses": 0, "hit_rate": None},
        "train_wall_s": result.wall_s,
        "data_loader": result.loader,
        "baseline_test_accuracy": None,
        "baseline_test_agreement": None,
        "baseline_history": None,
        "baseline_best_epoch": None,
        "baseline_train_wall_s": None,
        "kd_gain": None,
    }
    artifacts = {STUDENT: student}
    if settings.baseline:
        baseline = ctx.build_model(student_spec.model, student_spec.model_kwargs, "student.model",
                                   weights=student_spec.weights, pretrained=student_spec.pretrained, load_weights=False)
        baseline.load_state_dict(initial_state)
        base = fit(
            baseline, data, settings, objective=CrossEntropyObjective(settings.label_smoothing), desc="baseline",
            reference_val_logits=teacher_val, config_key="distill", **common,
        )
        baseline_test = predict(baseline, data.test, data, device, eval_batch)
        metrics.update(
            baseline_test_accuracy=round(accuracy(baseline_test, data.test.labels), 6),
            baseline_test_agreement=round(agreement(baseline_test, teacher_test), 6),
            baseline_val_accuracy=base.best_val_accuracy,
            baseline_history=base.history,
            baseline_best_epoch=base.best_epoch,
            baseline_train_wall_s=base.wall_s,
            baseline_data_loader=base.loader,
            baseline_mode_check=base.mode_check,
        )
        metrics["kd_gain"] = round(metrics["student_test_accuracy"] - metrics["baseline_test_accuracy"], 6)
        artifacts[BASELINE] = baseline

    # Written only now: a failure in either training leaves no student file behind.
    meta = model_meta(student_spec.model, student_spec.model_kwargs, STUDENT_MODEL, weights=student_spec.weights,
                      pretrained=student_spec.pretrained)
    for name, model in artifacts.items():
        save_checkpoint(model, ctx.path(name), meta)
    summary = f"{student_params:,} params, test {metrics['student_test_accuracy']:.4f}"
    if metrics["kd_gain"] is not None:
        summary += f" (baseline {metrics['baseline_test_accuracy']:.4f}, KD gain {metrics['kd_gain']:+.4f})"
    summary += f", agreement with teacher {metrics['student_test_agreement']:.4f}"
    return StageResult(list(artifacts), metrics, summary)
