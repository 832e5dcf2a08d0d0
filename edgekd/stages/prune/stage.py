"""The prune stage's run: load, estimate, prune (torch-pruning through `pruning`), recover with KD, save.

`pruned.pt` holds tensors plus a JSON record of the pruned layer shapes, so it still loads with
weights_only=True.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgekd.errors import InputError, StageFailed
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
    from edgekd.stages.prune.pruning import (PruneSettings, layer_channels, measure, resolve_ignored,
                                             target_from_config, taylor_gradients)
    from edgekd.stages.prune.search import prune_iteratively, prune_iteratively_to_latency
    from edgekd.train import distributed
    from edgekd.train.loop import accuracy, fit, predict, recalibrate
    from edgekd.train.objectives import make_kd_objective

    settings, data, device = job.prune, ctx.data, ctx.device
    eval_batch, batch_size = ctx.data_config.eval_batch_size, ctx.data_config.batch_size
    source = settings.source
    spec, kwargs = job.model, job.model_kwargs

    model = ctx.load_model(TEACHER if source == "teacher" else STUDENT)
    if source == "student":  # the distill stage may have chosen the student (student.candidates / auto)
        from edgekd.models.checkpoint import read_checkpoint

        meta = read_checkpoint(ctx.artifact(STUDENT))[1]
        spec, kwargs = meta.get("model", spec), dict(meta.get("model_kwargs") or {})
    teacher_model = load_teacher(ctx)  # a separate instance: the KD objective freezes it
    ignored = resolve_ignored(model, settings.ignore, what=source)
    target = target_from_config(settings)
    round_to = settings.round_to if isinstance(settings.round_to, int) else None
    prune_settings = PruneSettings(settings.importance, settings.global_pruning, round_to, tuple(settings.ignore))
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
        for trial in row.get("trials") or []:  # latency targets: what each timed copy cost and saved
            log.info("  trial %d: channel ratio %.3f -> %s", trial["trial"], trial["channel_ratio"],
                     trial.get("error") or f"MACs {trial['macs_fraction']:.3f}, latency {trial['latency_fraction']:.3f} "
                                           f"of the unpruned (goal {row['latency_goal']:.3f})")
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

    latency_metrics: dict[str, Any] = {}
    probe_folder = tempfile.TemporaryDirectory(prefix="edgekd-prune-latency-") if job.latency is not None else None
    try:
        probe = timer = None
        if probe_folder is not None:
            probe, timer = _latency_probe(job, ctx, model, Path(probe_folder.name))
            latency_metrics["settings"] = job.latency.view()
            latency_metrics["reference_p50_ms"] = timer.reference_p50()
        if settings.round_to == "auto":
            prune_settings, latency_metrics["round_to_auto"] = _auto_round_to(
                model, example, target, settings.steps, prune_settings, ignored, timer)
        grads_fn = gradients if settings.importance == "taylor" else None
        if target.kind in ("latency_ms", "speedup"):
            final = _latency_goal(target, latency_metrics["reference_p50_ms"])
            latency_metrics["goal_fraction"] = round(final, 6)
            log.info("  latency target: %s -> %.3f of the unpruned p50 (%.3f ms, %s, %d thread(s), batch %d)",
                     f"{target.value:g} ms" if target.kind == "latency_ms" else f"{target.value:g}x speed-up", final,
                     latency_metrics["reference_p50_ms"], job.latency.precision, job.latency.threads, job.latency.batch)
            pruned = prune_iteratively_to_latency(
                model, example, final, timer.fraction, prune_settings, steps=settings.steps, ignored=ignored,
                label=f"prune.target_{target.kind}: {target.value:g}", gradients=grads_fn, after_step=recover)
        else:
            pruned = prune_iteratively(model, example, target, prune_settings, steps=settings.steps, ignored=ignored,
                                       gradients=grads_fn, after_step=recover)
        if target.kind in ("latency_ms", "speedup"):
            latency_metrics.update(_final_latency(timer, pruned.model, latency_metrics["goal_fraction"],
                                                  pruned.steps, macs_before, measure(pruned.model, example)[0]))
        if timer is not None:
            latency_metrics["measure_wall_s"] = round(timer.wall_s, 3)
            latency_metrics["models_timed"] = len(timer.measurements)
    finally:
        objective.close()
        if probe_folder is not None:
            probe_folder.cleanup()
        if logits_folder is not None:
            shutil.rmtree(logits_folder, ignore_errors=True)
    model = pruned.model.eval()
    macs_after, params_after = measure(model, example)
    channels_after = layer_channels(model)
    test_accuracy = round(accuracy(predict(model, data.test, data, device, eval_batch), data.test.labels), 6)
    last = pruned.steps[-1]

    save_checkpoint(model, ctx.path(ARTIFACT), {**model_meta(spec, kwargs, MODEL, weights=job.weights, pretrained=job.pretrained), "structure": record_structure(model)})
    _check_round_trip(ctx, model, example)

    reached = (latency_metrics["reached"] if "reached" in latency_metrics
               else _target_reached(target, macs_before, params_before, macs_after, params_after))
    if reached is False and target.kind in ("macs", "params"):
        log.warning("  warning: the %s target %g was not reached within 5%% (got %s); channel counts are too coarse "
                    "for it at this ratio granularity (global: true gives finer steps)", target.kind, target.value,
                    f"{macs_after:,} MACs" if target.kind == "macs" else f"{params_after:,} params")
    metrics: dict[str, Any] = {
        "source": source, "model": spec, "importance": settings.importance, "global": settings.global_pruning,
        "target": target.as_dict(), "target_reached": reached, "ignored": ignored,
        "round_to": prune_settings.round_to or (1 if settings.round_to == "auto" else None),
        "latency": latency_metrics or None,
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


class _Timer:
    """Latency fractions of pruned copies against the unpruned model, measured on rank 0 and shared with every
    rank (under torchrun all ranks must take the same decisions)."""

    def __init__(self, probe: Any, reference: Any) -> None:
        self.probe, self.reference = probe, reference
        self.measurements: list[dict[str, float]] = []
        self.wall_s = 0.0
        """Seconds spent exporting, quantizing and timing copies (what latency targets add to the stage)."""

    def _shared(self, measure: Any) -> Any:
        from edgekd.train import distributed

        return distributed.broadcast_object(measure() if distributed.is_main() else None)

    def reference_p50(self) -> float:
        import statistics
        import time

        started = time.perf_counter()
        p50 = self._shared(lambda: statistics.median(
            r["reference"] for r in self.probe.p50s({"reference": self.reference})))
        self.wall_s += time.perf_counter() - started
        return round(p50, 6)

    def fractions(self, models: dict[str, Any]) -> dict[str, dict[str, float]]:
        import time

        def run() -> dict[str, dict[str, float]]:
            paths = {label: self.probe.onnx(m, name=f"{label}-{self.probe.exported + 1}") for label, m in models.items()}
            return self.probe.fractions(paths, self.reference)

        started = time.perf_counter()
        result = self._shared(run)
        self.wall_s += time.perf_counter() - started
        self.measurements.extend(result.values())
        return result

    def fraction(self, model: Any) -> float:
        return self.fractions({"trial": model})["trial"]["fraction"]


def _latency_probe(job: PruneJob, ctx: RunContext, model: Any, folder: Path) -> tuple[Any, _Timer]:
    from edgekd.stages.prune.latency import CALIBRATION_SAMPLES, LatencyProbe
    from edgekd.stages.quantize.quantization import calibration_indices

    data = ctx.data
    calibration = None
    if job.latency.precision == "int8":
        index = calibration_indices(len(data.train), CALIBRATION_SAMPLES, ctx.seed)
        calibration = data.normalize(data.train.images[index]).numpy()
    probe = LatencyProbe(data.meta.input_shape, job.latency, folder, calibration)
    from edgekd.train import distributed

    reference = probe.onnx(model, name="reference") if distributed.is_main() else None
    return probe, _Timer(probe, reference)


def _latency_goal(target: Any, reference_p50: float) -> float:
    """The final latency as a fraction of the unpruned model's p50."""
    fraction = 1 / target.value if target.kind == "speedup" else target.value / reference_p50
    if fraction >= 1:
        raise InputError(f"prune.target_latency_ms: {target.value:g} ms is not below the unpruned model's "
                         f"{reference_p50:.3f} ms p50 measured here: nothing to prune for it")
    if fraction < 0.02:
        raise InputError(f"prune.target_{target.kind}: {target.value:g} asks for {1 / fraction:.0f}x the unpruned "
                         f"model's speed ({reference_p50:.3f} ms p50 here); pruning channels cannot get there")
    return fraction


def _first_ratio(target: Any, steps: int) -> float:
    """The channel ratio of the first step, roughly: where round_to candidates are compared."""
    import math

    if target.kind == "ratio":
        return target.value / steps
    if target.kind == "speedup":
        fraction = 1 / target.value
    elif target.kind == "latency_ms":
        fraction = 0.7
    else:
        fraction = target.value if target.value <= 1 else 0.7
    return min(max(1 - math.sqrt(1 - (1 - fraction) / steps), 0.05), 0.9)


def _auto_round_to(model: Any, example: Any, target: Any, steps: int, settings: Any, ignored: list[str],
                   timer: _Timer) -> tuple[Any, dict[str, Any]]:
    """round_to: auto. The model pruned at the first step's ratio with each candidate rounding, all timed in one
    interleaved measurement; the rounding with the most MACs per millisecond wins."""
    from edgekd.stages.prune.pruning import layer_channels, measure
    from edgekd.stages.prune.search import pick_round_to, replace_round_to, round_to_candidates

    ratio = _first_ratio(target, steps)
    copies = round_to_candidates(model, example, ratio, settings, ignored)
    measured = timer.fractions({f"round_to_{k}": m for k, m in copies.items()})
    rows = []
    for step, pruned in copies.items():
        macs, _ = measure(pruned, example)
        got = measured[f"round_to_{step}"]
        rows.append({"round_to": step, "macs": macs, "p50_ms": round(got["p50_ms"], 6),
                     "latency_fraction": round(got["fraction"], 6),
                     "macs_per_ms": round(macs / max(got["p50_ms"], 1e-9)),
                     "channels": {k: v for k, v in layer_channels(pruned).items()}})
    chosen = pick_round_to(rows)
    for row in rows:
        log.info("  round_to %2d at ratio %.3f: %s MACs, p50 %.4f ms (%.3f of unpruned), %s MACs/ms%s",
                 row["round_to"], ratio, f"{row['macs']:,}", row["p50_ms"], row["latency_fraction"],
                 f"{row['macs_per_ms']:,}", "  <- chosen" if row["round_to"] == chosen else "")
    return replace_round_to(settings, chosen), {"ratio": round(ratio, 6), "candidates": rows, "chosen": chosen,
                                                "rule": "most MACs per millisecond at the same channel ratio"}


def _final_latency(timer: _Timer, model: Any, goal: float, steps: list[dict[str, Any]], macs_before: int,
                   macs_after: int) -> dict[str, Any]:
    """The recovered model timed once more against the unpruned one: the number the target is judged on."""
    got = timer.fractions({"pruned": model})["pruned"]
    fraction = got["fraction"]
    reached = abs(fraction - goal) <= 0.10 * goal
    log.info("  latency: %.4f ms vs %.4f ms unpruned = %.3f (goal %.3f, %s); speed-up %.2fx from %.2fx fewer MACs",
             got["p50_ms"], got["reference_p50_ms"], fraction, goal, "within 10 %" if reached else "NOT within 10 %",
             1 / fraction, macs_before / max(macs_after, 1))
    if not reached:
        log.warning("  warning: the latency target was not reached within 10 %% (%.3f of the unpruned p50 for a goal "
                    "of %.3f): channel steps are too coarse here, or the host's timing moved between measurements",
                    fraction, goal)
    table = [{"step": r["step"], "macs_fraction": r["macs_fraction"], "latency_fraction": r["latency_fraction"],
              "macs_speedup": round(1 / r["macs_fraction"], 4), "latency_speedup": round(1 / r["latency_fraction"], 4),
              "trials": r["search_trials"]} for r in steps]
    return {"final_fraction": round(fraction, 6), "final_p50_ms": round(got["p50_ms"], 6),
            "final_reference_p50_ms": round(got["reference_p50_ms"], 6), "speedup": round(1 / fraction, 4),
            "macs_speedup": round(macs_before / max(macs_after, 1), 4), "reached": reached, "per_step": table}


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
