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
CHOICE_KEYS = ("candidates", "capacity", "top_k")  # student settings that matter only when the student is chosen


def plan(cfg: PipelineConfig) -> StagePlan | None:
    if cfg.distill is None:
        return None
    student = cfg.student.view()
    if not cfg.student.chooses:  # a named student: the choice's settings decide nothing (and keep old fingerprints)
        for key in CHOICE_KEYS:
            student.pop(key, None)
    view = {**cfg.data_view(), "student": student, "distill": cfg.distill.view()}
    if cfg.student.checkpoint is not None and cfg.student.checkpoint.is_file():
        view["checkpoint_sha256"] = atomic.sha256_file(cfg.student.checkpoint)
    sources = {spec: factory_source(spec) for spec in cfg.student.specs()}
    sources = {spec: digest for spec, digest in sources.items() if digest is not None}
    if sources:
        view["model_source"] = sources if cfg.student.chooses else next(iter(sources.values()))
    choice = choice_settings(cfg) if cfg.student.chooses else None
    timm = any(spec.startswith("timm:") for spec in cfg.student.specs())
    libraries = (*TRAINING_LIBRARIES, "timm") if timm else TRAINING_LIBRARIES
    if choice is not None:
        # The choice is part of this stage's inputs: the budgets and timing settings it is judged on are in the
        # fingerprint, so a rerun of the same config skips the stage and never re-times (see docs/config.md).
        view["student_choice"] = choice.view()
        libraries = (*libraries, "onnx", "onnxruntime")
    return StagePlan(settings=DistillJob(cfg.distill, cfg.student, choice), view=view,
                     depends_on=(teacher_stage.NAME,), distributed=True, libraries=libraries)


def choice_settings(cfg: PipelineConfig) -> Any:
    from edgekd.stages.distill.choice import ChoiceSettings
    from edgekd.stages.prune.latency import LatencySettings

    budgets = cfg.budgets
    latency = LatencySettings(threads=budgets.latency_threads, batch=budgets.latency_batch, precision="fp32",
                              opset=cfg.export.opset)
    keys = ("latency_p50_ms", "latency_p90_ms", "min_speedup", "latency_threads", "latency_batch")
    return ChoiceSettings(latency_p50_ms=budgets.latency_p50_ms, latency_p90_ms=budgets.latency_p90_ms,
                          min_speedup=budgets.min_speedup, capacity=cfg.student.capacity, latency=latency,
                          budgets_view={k: getattr(budgets, k) for k in keys})


def _choose_student(job: DistillJob, ctx: RunContext, teacher: Any) -> dict[str, Any]:
    """Time every candidate (rank 0; the decision is shared with every rank) and pick the student."""
    import tempfile
    from pathlib import Path

    from edgekd.stages.distill.choice import choose, measure_candidates
    from edgekd.stages.prune.latency import CALIBRATION_SAMPLES
    from edgekd.stages.quantize.quantization import calibration_indices
    from edgekd.train import distributed

    settings = job.choice
    candidates = job.student.candidate_list()
    import torch

    # min_speedup is judged against the teacher timed alongside; a teacher given as ONNX is not re-exported here
    timed_teacher = teacher if settings.min_speedup is not None and isinstance(teacher, torch.nn.Module) else None
    if settings.min_speedup is not None and timed_teacher is None:
        log.warning("  warning: the teacher is not a PyTorch model: the student choice ignores min_speedup "
                    "(set budgets.latency_p50_ms to choose by latency)")

    def measure() -> dict[str, Any]:
        data = ctx.data
        index = calibration_indices(len(data.train), CALIBRATION_SAMPLES, ctx.seed)
        calibration = data.normalize(data.train.images[index]).numpy()
        import time

        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="edgekd-student-choice-") as folder:
            rows, teacher_p50 = measure_candidates(
                candidates, lambda spec, kwargs: ctx.build_model(spec, kwargs, "student.candidates"),
                timed_teacher, data.meta.input_shape, settings,
                calibration, Path(folder))
        return {"rows": rows, "teacher_p50_ms": teacher_p50, "wall_s": round(time.perf_counter() - started, 3)}

    measured = distributed.broadcast_object(measure() if distributed.is_main() else None)
    rows = measured["rows"]
    log.info("  student choice: %d candidate(s) timed untrained at %d thread(s), batch %d (%.1f s)%s", len(rows),
             settings.latency.threads, settings.latency.batch, measured["wall_s"],
             f"; teacher p50 {measured['teacher_p50_ms']:.3f} ms" if measured["teacher_p50_ms"] else "")
    try:
        decision = choose(rows, settings, measured["teacher_p50_ms"])
    finally:
        for row in rows:
            log.info("    %-40s %9s MACs %8s params  fp32 p50 %.3f ms  int8 p50 %.3f ms  %s", row["label"],
                     f"{row['macs']:,}", f"{row['params']:,}", row["fp32_p50_ms"], row["int8_p50_ms"],
                     "fits" if row.get("fits") else "too slow")
    log.info("  student choice: %s", decision["reason"])
    if decision["margin"] < 0.10:
        log.warning("  warning: the chosen student is within %.0f %% of the latency budget: a rerun that re-times "
                    "(--force distill) may choose differently; pin it with student.model: %s and its model_kwargs",
                    max(decision["margin"], 0) * 100, decision["model"])
    return {"candidates": rows, "teacher_p50_ms": measured["teacher_p50_ms"], "decision": decision,
            "settings": settings.view(), "wall_s": measured["wall_s"]}


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
    teacher_params = getattr(teacher, "num_parameters", None) or count_parameters(teacher)  # ONNX: its initializers
    choice = _choose_student(job, ctx, teacher) if job.choice is not None else None
    if choice:
        contenders = [(c["model"], dict(c["model_kwargs"]), c["label"])
                      for c in choice["decision"]["ranked"][:student_spec.top_k]]
    else:
        contenders = [(student_spec.model, dict(student_spec.model_kwargs), student_spec.model)]
    teacher_val = predict(teacher, data.val, data, device, eval_batch)
    teacher_test = predict(teacher, data.test, data, device, eval_batch)
    common = dict(device=device, seed=ctx.seed, batch_size=ctx.data_config.batch_size, eval_batch_size=eval_batch,
                  log=log.info)

    from edgekd.train import distributed

    def distil(spec: str, kwargs: dict[str, Any], label: str) -> dict[str, Any]:
        student = ctx.build_model(spec, kwargs, "student.model", weights=student_spec.weights,
                                  pretrained=student_spec.pretrained, load_weights=student_spec.checkpoint is None)
        if student_spec.checkpoint is not None:  # the student (and its baseline) start from the user's weights
            state, _ = read_checkpoint(student_spec.checkpoint)
            load_into(student, state, str(student_spec.checkpoint))
            log.info("  student: starts from %s", student_spec.checkpoint.name)
        student.to(device)
        initial_state = copy.deepcopy(student.state_dict())  # the baseline starts from the very same weights
        check_sizes(count_parameters(student), teacher_params)
        hint = build_hint(settings.hint, teacher, student, data, device)  # validates the layer names first
        logits_folder = ctx.work_folder("distill-teacher-logits") if distributed.is_main() else None
        objective = make_kd_objective(settings.kd(), teacher, data, device, augment=settings.augment, hint=hint,
                                      cache_dir=logits_folder)
        log.info(
            "  KD%s: T=%g alpha=%g%s, teacher logits %s", f" ({label})" if len(contenders) > 1 else "",
            settings.temperature, settings.alpha,
            f", hint {hint.layers['teacher']} <- {hint.layers['student']} (beta={hint.weight:g})" if hint else "",
            "cached" if objective.cache is not None else "computed every batch",
        )
        try:
            result = fit(student, data, settings, objective=objective, desc="distill",
                         reference_val_logits=teacher_val, config_key="distill", **common)
        finally:
            objective.close()  # removes the hint hooks from the student before it is saved or reused, and the cache
            if logits_folder is not None:
                shutil.rmtree(logits_folder, ignore_errors=True)
        return {"spec": spec, "kwargs": kwargs, "label": label, "student": student, "initial_state": initial_state,
                "hint": hint, "objective": objective, "result": result}

    runs = [distil(*contender) for contender in contenders]
    kept = max(runs, key=lambda r: r["result"].best_val_accuracy)  # ties: the first, the most capacity
    if len(runs) > 1:
        assert choice is not None
        scores = {r["label"]: r["result"].best_val_accuracy for r in runs}
        log.info("  top %d distilled: %s; kept %s", len(runs),
                 ", ".join(f"{k} val {v:.4f}" for k, v in scores.items()), kept["label"])
        decision = choice["decision"]
        choice["top_k"] = [{"label": k, "val_accuracy": v} for k, v in scores.items()]
        decision["reason"] += (f"; top {len(runs)} distilled, kept {kept['label']} by validation accuracy "
                               f"({', '.join(f'{k} {v:.4f}' for k, v in scores.items())})")
        decision.update(chosen=kept["label"], model=kept["spec"], model_kwargs=kept["kwargs"])
    model_spec, model_kwargs = kept["spec"], kept["kwargs"]
    student, initial_state, hint = kept["student"], kept["initial_state"], kept["hint"]
    objective, result = kept["objective"], kept["result"]
    student_params = count_parameters(student)
    student_test = predict(student, data.test, data, device, eval_batch)

    metrics: dict[str, Any] = {
        "model": model_spec,
        "model_kwargs": model_kwargs,
        "student_choice": choice,
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
        baseline = ctx.build_model(model_spec, model_kwargs, "student.model",
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
    meta = model_meta(model_spec, model_kwargs, STUDENT_MODEL, weights=student_spec.weights,
                      pretrained=student_spec.pretrained)
    for name, model in artifacts.items():
        save_checkpoint(model, ctx.path(name), meta)
    summary = f"{choice['decision']['chosen']} (chosen by latency), " if choice else ""
    summary += f"{student_params:,} params, test {metrics['student_test_accuracy']:.4f}"
    if metrics["kd_gain"] is not None:
        summary += f" (baseline {metrics['baseline_test_accuracy']:.4f}, KD gain {metrics['kd_gain']:+.4f})"
    summary += f", agreement with teacher {metrics['student_test_agreement']:.4f}"
    return StageResult(list(artifacts), metrics, summary)
