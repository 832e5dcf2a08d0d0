"""Stage 4: export every model later stages need to ONNX, check parity with PyTorch, write eval data.

Writes <model>.onnx for teacher / student / student_baseline / pruned (whichever earlier stages produced),
optional `.ort` copies, eval.npz (test split) and val.npz (validation split). Everything is staged in a
work folder of the run directory (RunContext.work_folder) and moved into place only once every model passed its checks, so a
failed export leaves no new file behind.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import atomic
from edgekd.runner.context import RunContext
from edgekd.runner.contract import StageResult
from edgekd.stages.export.config import EVAL_ARTIFACT, MODEL_ORDER, VAL_ARTIFACT, ExportConfig, onnx_name
from edgekd.stages import teacher as teacher_stage
from edgekd.stages.export.exporter import ort_sidecars
from edgekd.stages.teacher.config import ONNX_ARTIFACT as ONNX_TEACHER

log = logging.getLogger("edgekd")

EVAL_MAX_BYTES = 256 << 20  # per eval/val file: a seeded sample of larger splits (photos at 224: ~440 images)


def eval_sample_limit(input_shape: tuple[int, ...]) -> int:
    """How many float32 inputs of this shape fit in EVAL_MAX_BYTES (the bundled datasets' splits all do)."""
    per_sample = 4 * int(np.prod(input_shape))
    return max(64, EVAL_MAX_BYTES // per_sample)


def models_to_export(ctx: RunContext, depends_on: tuple[str, ...]) -> list[str]:
    """Checkpoint names (teacher, student, ...) written by the stages export depends on, in report order."""
    names = {artifact[:-3] for stage in depends_on for artifact in ctx.manifest.artifacts(stage) if artifact.endswith(".pt")}
    return sorted(names, key=lambda n: (MODEL_ORDER.index(n) if n in MODEL_ORDER else len(MODEL_ORDER), n))


def _teacher_top1(model: Any, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    import torch

    with torch.inference_mode():
        chunks = [model(torch.from_numpy(inputs[i:i + batch_size])).argmax(1).numpy()
                  for i in range(0, len(inputs), batch_size)]
    return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)


def _onnx_teacher_entry(ctx: RunContext) -> dict[str, Any]:
    """The export metrics' row of an ONNX teacher: the teacher stage's copy, as the benchmark reads rows."""
    import onnx

    from edgekd.stages.export.exporter import written_opset

    path = ctx.artifact(ONNX_TEACHER)
    proto = onnx.load(str(path), load_external_data=False)
    return {"path": ONNX_TEACHER, "external": True, "opset_requested": None, "opset_written": written_opset(proto),
            "dynamo": None, "dynamic_batch": None, "size_bytes": path.stat().st_size, "parity": [],
            "params": ctx.manifest.metrics(teacher_stage.NAME).get("params"), "macs": None,
            "ort_path": None, "ort_error": "an ONNX teacher is measured as given"}


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic.atomic_path(path) as temp, open(temp, "wb") as handle:
        np.savez(handle, **arrays)  # uncompressed: loads fast on a device, hashes once


def export_stage(opts: ExportConfig, ctx: RunContext, depends_on: tuple[str, ...]) -> StageResult:
    import torch

    from edgekd.stages.export.exporter import build_metadata, check_parity, count_macs, export_onnx, parity

    data, meta = ctx.data, ctx.data.meta
    preprocess = meta.preprocess()
    limit = eval_sample_limit(meta.input_shape)
    val_x, val_y = data.normalized("val", limit=limit, seed=ctx.seed)
    test_x, test_y = data.normalized("test", limit=limit, seed=ctx.seed)
    batch_sizes = list(dict.fromkeys(opts.parity_batch_sizes)) if opts.dynamic_batch else [1]
    staging = ctx.work_folder("export")  # a killed run's staging folder is removed with it
    try:
        models: dict[str, dict[str, Any]] = {}
        written: list[str] = []
        example = torch.from_numpy(val_x[:2] if opts.dynamic_batch else val_x[:1])
        if ONNX_TEACHER in ctx.manifest.artifacts(teacher_stage.NAME):
            # an ONNX teacher is measured as given (the teacher stage's copy): nothing to export, no parity
            models[MODEL_ORDER[0]] = _onnx_teacher_entry(ctx)
            teacher = teacher_stage.load_teacher(ctx)
            _save_npz(staging / EVAL_ARTIFACT, inputs=test_x, labels=test_y,
                      teacher_predictions=_teacher_top1(teacher, test_x, ctx.data_config.eval_batch_size))
            _save_npz(staging / VAL_ARTIFACT, inputs=val_x, labels=val_y,
                      teacher_predictions=_teacher_top1(teacher, val_x, ctx.data_config.eval_batch_size))
            written += [EVAL_ARTIFACT, VAL_ARTIFACT]
        for name in models_to_export(ctx, depends_on):
            checkpoint = ctx.artifact(f"{name}.pt")
            model = ctx.load_model(checkpoint.name, device="cpu")
            metadata = build_metadata(
                labels=meta.labels, preprocess=preprocess, artifact=name, source_artifact=checkpoint.name,
                source_sha256=atomic.sha256_file(checkpoint), config_fingerprint=ctx.content_fingerprint,
                extra={"exporter": "dynamo" if opts.dynamo else "torchscript", "opset_requested": opts.opset})
            result = export_onnx(model, example, staging / onnx_name(name), opset=opts.opset, dynamo=opts.dynamo,
                                 dynamic_batch=opts.dynamic_batch, metadata=metadata, name=name)
            result.parity = parity(model, result.path, val_x, batch_sizes)
            check_parity(result.parity, opts.parity_atol, name)
            macs, params = count_macs(model, example)
            models[name] = {**result.to_dict(), "params": params, "macs": macs, "ort_path": None, "ort_error": None}
            written.append(result.path.name)
            if result.opset_written != opts.opset:
                log.info("  %s: opset %d requested, %d written (the dynamo exporter targets >= 18)",
                         name, opts.opset, result.opset_written)
            log.info("  %s.onnx: opset %d, %d bytes, parity %s", name, result.opset_written, result.size_bytes,
                     ", ".join(f"b{r['batch']}={r['max_abs_diff']:.1e}" for r in result.parity))
            if name == MODEL_ORDER[0]:  # the teacher's predictions: what agreement is measured against
                _save_npz(staging / EVAL_ARTIFACT, inputs=test_x, labels=test_y,
                          teacher_predictions=_teacher_top1(model, test_x, ctx.data_config.eval_batch_size))
                _save_npz(staging / VAL_ARTIFACT, inputs=val_x, labels=val_y,
                          teacher_predictions=_teacher_top1(model, val_x, ctx.data_config.eval_batch_size))
                written += [EVAL_ARTIFACT, VAL_ARTIFACT]
        if opts.ort_format:
            written += _ort_copies(staging, models)
        ctx.files.claim(*written)  # recorded in one manifest write, before any of them appears
        for artifact in written:  # all checks passed: move into place (same filesystem, atomic renames)
            os.replace(staging / artifact, ctx.path(artifact))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for info in models.values():
        info["size_bytes"] = (ctx.artifact(info["path"]) if info.get("external") else ctx.path(info["path"])).stat().st_size
    metrics = {
        "models": models, "preprocess": preprocess, "labels": list(meta.labels),
        "dynamo": opts.dynamo, "opset_requested": opts.opset,
        "eval": {"path": EVAL_ARTIFACT, "split": "test", "samples": len(test_y), "of": len(data.test)},
        "val": {"path": VAL_ARTIFACT, "split": "val", "samples": len(val_y), "of": len(data.val)},
    }
    worst = max((r["max_abs_diff"] for m in models.values() for r in m["parity"]), default=0.0)
    opsets = sorted({m["opset_written"] for m in models.values()})
    summary = f"{', '.join(models)} -> ONNX (opset {'/'.join(map(str, opsets))}), max |ORT-torch| {worst:.1e}"
    return StageResult(written, metrics, summary)


def _ort_copies(staging: Path, models: dict[str, dict[str, Any]]) -> list[str]:
    """ORT-format (.ort) copies for ONNX Runtime Mobile; a failure is recorded, never fatal."""
    from edgekd.runtime.mobile import convert_to_ort_with_reason

    written = []
    for name, info in models.items():
        if info.get("external"):  # the ONNX teacher is the user's file, measured as given
            continue
        try:
            path, reason = convert_to_ort_with_reason(staging / info["path"], staging)
        except Exception as exc:  # noqa: BLE001 - optional output
            path, reason = None, f"{type(exc).__name__}: {exc}"
        info["ort_path"], info["ort_error"] = (path.name if path else None), reason
        if path is not None:
            written += [path.name, *ort_sidecars(staging, path)]
        else:
            log.warning("  %s: no .ort copy (%s)", name, reason)
    return written
