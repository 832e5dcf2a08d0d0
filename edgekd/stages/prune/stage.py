"""The prune stage's run: load, estimate, prune (torch-pruning through `pruning`), recover with KD, save.

`pruned.pt` holds tensors plus a JSON record of the pruned layer shapes, so it still loads with
weights_only=True.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from edgekd.errors import StageFailed
from edgekd.runner.context import RunContext
from edgekd.runner.contract import StageResult
from edgekd.stages.distill.config import STUDENT
from edgekd.stages.prune.config import ARTIFACT, MODEL, PruneJob
from edgekd.stages.teacher import load_teacher
from edgekd.stages.teacher.config import ARTIFACT as TEACHER

log = logging.getLogger("edgekd")


def prune_stage(job: PruneJob, ctx: RunContext) -> StageResult:
    import torch

    from edgekd.models import model_meta
    from edgekd.models.checkpoint import save_checkpoint
    from edgekd.models.structure import record_structure
    from edgekd.stages.prune.pruning import (PruneSettings, layer_channels, measure, prune_iteratively,
                                             resolve_ignored, target_from_config, taylor_gradients)
    from edgekd.train import distributed
    from edgekd.train.loop import accuracy, fit, predict, recalibrate
    from edgekd.train.objectives import make_kd_objective

    settings, data, device = job.prune, ctx.data, ctx.device
    eval_batch, batch_size = ctx.data_config.eval_batch_size, ctx.data_config.batch_size
    source = settings.source
    spec, kwargs = job.model, job.model_kwargs

    model = ctx.load_model(TEACHER if source == "teacher" else STUDENT)
    teacher_model = load_teacher(ctx)  # a separate instance: the KD objective freezes it
    ignored = resolve_ignored(model, settings.ignore, what=source)
    target = target_from_config(settings)
    prune_settings = PruneSettings(settings.importance, settings.global_pruning, settings.round_to, tuple(settings.ignore))
    example = torch.randn(1, *data.meta.input_shape, device=device)

    def val_accuracy(m: Any) -> float:
        return round(accuracy(predict(m, data.val, data, device, eval_batch), data.val.labels), 6)

    teacher_val = predict(teacher_model, data.val, data, device, eval_batch)
    macs_before, params_before = measure(model, example)
    channels_before = layer_channels(model)
    accuracy_before = val_accuracy(model)
    test_before = round(accuracy(predict(model, data.test, data, device, eval_batch), data.test.labels), 6)
    log.info("  pruning the %s (%s): %s MACs, %s params, val %.4f; target %s %g, importance %s%s, %d step(s)",
             source, spec, f"{macs_before:,}", f"{params_before:,}", accuracy_before, target.kind, target.value,
             settings.importance, " (global)" if settings.global_pruning else "", settings.steps)

    logits_folder = ctx.work_folder("prune-teacher-logits") if distributed.is_main() else None
    objective = make_kd_objective(job.kd, teacher_model, data, device, augment=settings.finetune.augment,
                                  cache_dir=logits_folder)
    history: list[dict[str, Any]] = []
    mode_checks: list[dict[str, Any]] = []
    loaders: list[dict[str, Any]] = []

    def gradients(m: Any) -> dict[str, Any]:
        batches = data.batches(data.train, batch_size, device, shuffle=True, seed=ctx.seed).epoch(0)
        probe = [(x, y) for (x, y, _), _ in zip(batches, range(settings.taylor_batches))]
        return taylor_gradients(m, probe)

    def recover(m: Any, row: dict[str, Any]) -> None:
        distributed.share_module_from_main(m)  # under torchrun every rank recovers rank 0's pruned model
        if settings.finetune.bn_recalibration_batches:  # the surgery changed every pruned layer's activations
            recalibrated = recalibrate(m, data, settings.finetune.bn_recalibration_batches, batch_size, device, ctx.seed)
            row["bn_recalibrated"] = {k: recalibrated[k] for k in ("batches", "samples")}
        row["accuracy_after_prune"] = val_accuracy(m)
        log.info("  step %d/%d: channel ratio %.3f -> %s MACs (%.3f), %s params (%.3f), val %.4f before recovery",
                 row["step"], settings.steps, row["channel_ratio"], f"{row['macs']:,}", row["macs_fraction"],
                 f"{row['params']:,}", row["params_fraction"], row["accuracy_after_prune"])
        m.train()  # the pruner left the model in eval mode; fit builds a fresh optimizer over the pruned parameters
        result = fit(m, data, settings.finetune, device=device, seed=ctx.seed, objective=objective,
                     desc=f"recovery {row['step']}/{settings.steps}", batch_size=batch_size,
                     eval_batch_size=eval_batch, reference_val_logits=teacher_val, log=log.info,
                     config_key="prune.finetune")
        row["accuracy_after_recovery"] = val_accuracy(m)
        mode_checks.append(result.mode_check)
        loaders.append(result.loader)
        history.extend({"step": row["step"], **epoch} for epoch in result.history)

    try:
        pruned = prune_iteratively(
            model, example, target, prune_settings, steps=settings.steps, ignored=ignored,
            gradients=gradients if settings.importance == "taylor" else None, after_step=recover,
        )
    finally:
        objective.close()
        if logits_folder is not None:
            shutil.rmtree(logits_folder, ignore_errors=True)
    model = pruned.model.eval()
    macs_after, params_after = measure(model, example)
    channels_after = layer_channels(model)
    test_accuracy = round(accuracy(predict(model, data.test, data, device, eval_batch), data.test.labels), 6)
    last = pruned.steps[-1]

    save_checkpoint(model, ctx.path(ARTIFACT), {**model_meta(spec, kwargs, MODEL, weights=job.weights, pretrained=job.pretrained), "structure": record_structure(model)})
    _check_round_trip(ctx, model, example)

    reached = _target_reached(target, macs_before, params_before, macs_after, params_after)
    if reached is False:
        log.warning("  warning: the %s target %g was not reached within 5%% (got %s); channel counts are too coarse "
                    "for it at this ratio granularity (global: true gives finer steps)", target.kind, target.value,
                    f"{macs_after:,} MACs" if target.kind == "macs" else f"{params_after:,} params")
    metrics: dict[str, Any] = {
        "source": source, "model": spec, "importance": settings.importance, "global": settings.global_pruning,
        "target": target.as_dict(), "target_reached": reached, "ignored": ignored, "round_to": settings.round_to,
        "params_before": params_before, "params_after": params_after,
        "macs_before": macs_before, "macs_after": macs_after,
        # ratio counts channels: removing half the channels keeps about a quarter of a conv's weights
        "channels_fraction": last["channels_fraction"], "params_fraction": round(params_after / params_before, 6),
        "macs_fraction": round(macs_after / macs_before, 6),
        "layers": {name: {"before": count, "after": channels_after.get(name, 0)} for name, count in channels_before.items()},
        "accuracy_before_prune": accuracy_before, "accuracy_after_prune": last["accuracy_after_prune"],
        "accuracy_after_recovery": last["accuracy_after_recovery"],
        "test_accuracy_before_prune": test_before, "test_accuracy": test_accuracy,
        "finetune_epochs": settings.finetune.epochs, "steps": pruned.steps, "history": history,
        "data_loader": next((summary for summary in reversed(loaders) if summary), {}),
        "mode_check": mode_checks[-1] if mode_checks else {},
    }
    summary = (f"{source} MACs {macs_before:,} -> {macs_after:,} ({metrics['macs_fraction']:.3f}), params "
               f"{params_before:,} -> {params_after:,}; val {accuracy_before:.4f} -> {metrics['accuracy_after_prune']:.4f} "
               f"(pruned) -> {metrics['accuracy_after_recovery']:.4f} (recovered), test {test_accuracy:.4f}")
    return StageResult([ARTIFACT], metrics, summary)


def _target_reached(target: Any, macs_before: int, params_before: int, macs_after: int, params_after: int) -> bool | None:
    """Within 5% of a MACs / params target; None for a ratio (always met by construction)."""
    if target.kind == "ratio":
        return None
    before, after = (macs_before, macs_after) if target.kind == "macs" else (params_before, params_after)
    goal = target.value * before if target.value <= 1 else target.value
    return abs(after - goal) <= 0.05 * goal


def _check_round_trip(ctx: RunContext, model: Any, example: Any) -> None:
    """Reload pruned.pt the way later stages will (weights_only) and insist on identical outputs."""
    import torch

    reloaded = ctx.load_model(ARTIFACT, written_here=True)
    with torch.no_grad():
        if not torch.allclose(model(example), reloaded(example), atol=1e-6, rtol=1e-5):
            raise StageFailed(f"stage prune: {ARTIFACT} does not reload to the same model (structure record incomplete?)")
