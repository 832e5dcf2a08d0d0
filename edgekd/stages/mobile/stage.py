"""The mobile stage's run: export the quantize stage's source model (pruned, else student, else teacher) to
each extra target in fp32 and int8, check fp32 parity against PyTorch, gate int8 against fp32 on the
validation split. Files are staged in a work folder and moved into place once every export finished."""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import numpy as np

from edgekd.errors import StageFailed
from edgekd.runner.context import RunContext
from edgekd.runner.contract import StageResult
from edgekd.stages.export.config import MODEL_ORDER
from edgekd.stages.mobile.config import RUNTIMES, MobileJob, artifact_name, file_name

log = logging.getLogger("edgekd")
PARITY_SAMPLES = 16  # validation images checked one by one (batch 1, as exported)


def _exporters(target: str) -> Any:
    if target == "tflite":
        from edgekd.stages.mobile import litert

        return litert
    from edgekd.stages.mobile import executorch_export

    return executorch_export


def _predict(session: Any, inputs: np.ndarray) -> np.ndarray:
    from edgekd.runtime.evaluate import predict_logits

    return predict_logits(session, inputs)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def mobile_stage(job: MobileJob, ctx: RunContext) -> StageResult:
    import torch

    from edgekd.gate.accuracy import int8_verdict
    from edgekd.runner.keys import library_version
    from edgekd.stages.mobile.sessions import open_artifact
    from edgekd.stages.export.stage import eval_sample_limit
    from edgekd.stages.quantize.stage import calibration_inputs, resolve_source

    exported = ctx.manifest.metrics("export").get("models", {})
    source = resolve_source(job.quantize.source if job.quantize else "auto",
                            {n: exported[n] for n in MODEL_ORDER if n in exported})
    model = ctx.load_model(f"{source}.pt", device="cpu")
    # the validation images the export stage wrote to val.npz (a seeded sample of a large split)
    val_x, val_y = ctx.data.normalized("val", limit=eval_sample_limit(ctx.data.meta.input_shape), seed=ctx.seed)
    example = torch.from_numpy(val_x[:1])
    with torch.inference_mode():
        torch_logits = np.concatenate([model(torch.from_numpy(val_x[i:i + 1])).numpy()
                                       for i in range(min(PARITY_SAMPLES, len(val_x)))])
    staging = ctx.work_folder("mobile")
    rows: list[dict[str, Any]] = []
    try:
        calibration = None
        if job.quantize is not None:  # the very images the ONNX int8 model was calibrated on
            calibration = calibration_inputs(ctx.data, job.quantize.calibration.samples, ctx.seed,
                                             staging if ctx.data.meta.streamed else None)
        for target in job.targets:
            exporter = _exporters(target)
            kinds = ["fp32", *(["int8"] if calibration is not None else [])]
            fp32_predictions = None
            for kind in kinds:
                name, file = artifact_name(target, kind), file_name(source, target, kind)
                row: dict[str, Any] = {"name": name, "target": target, "runtime": RUNTIMES[target], "kind": kind,
                                       "source": source, "path": file, "error": None, "deployable": False,
                                       "gate": None, "reason": None}
                started = time.perf_counter()
                try:
                    if kind == "fp32":
                        exporter.export_fp32(model, example, staging / file)
                    else:
                        exporter.export_int8(model, example, calibration, staging / file)
                except Exception as exc:  # noqa: BLE001 - recorded; an fp32 failure ends the stage below
                    row["error"] = f"{type(exc).__name__}: {_first_line(exc)}"
                row["export_s"] = round(time.perf_counter() - started, 2)
                if row["error"] is not None:
                    if kind == "fp32":
                        raise StageFailed(f"{target} export of {source} failed ({row['error']}); "
                                          f"remove {target} from export.targets to skip it")
                    row["reason"] = f"{kind} export failed: {row['error']}"
                    log.warning("  %s: %s", name, row["reason"])
                    rows.append(row)
                    continue
                session = open_artifact(staging / file, threads=1)
                if hasattr(session, "io_quantization"):
                    row["io_quantization"] = session.io_quantization()
                logits = _predict(session, val_x[:len(torch_logits)])
                row["parity_max_abs_diff"] = float(np.max(np.abs(logits.astype(np.float64) - torch_logits)))
                predictions = _predict(session, val_x).argmax(axis=-1)
                row["val_accuracy"] = float(np.mean(predictions == val_y))
                row["size_bytes"] = (staging / file).stat().st_size
                del session
                if kind == "fp32":
                    if not row["parity_max_abs_diff"] <= job.parity_atol:
                        raise StageFailed(f"{name}: {target} and PyTorch logits differ by "
                                          f"{row['parity_max_abs_diff']:.3g} > export.parity_atol {job.parity_atol:g}")
                    fp32_predictions, row["deployable"] = predictions, True
                else:
                    verdict = int8_verdict(predictions, fp32_predictions, val_y, job.quantize.max_accuracy_drop,
                                           f"{target} {source}", fallback=job.quantize.fallback)
                    row["gate"], row["deployable"], row["reason"] = verdict.to_dict(), verdict.deployable, verdict.reason
                    if verdict.reason:
                        log.warning("  %s: %s", name, verdict.reason)
                log.info("  %s (%s %s): %d bytes, val acc %.4f, |%s-torch| %.1e%s", file, RUNTIMES[target], kind,
                         row["size_bytes"], row["val_accuracy"], target, row["parity_max_abs_diff"],
                         "" if row["deployable"] else " -> not deployable")
                rows.append(row)
        written = [row["path"] for row in rows if row["error"] is None]
        ctx.files.claim(*written)
        for file in written:
            os.replace(staging / file, ctx.path(file))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    metrics = {
        "source": source, "source_checkpoint": f"{source}.pt", "artifacts": rows,
        "calibration": None if calibration is None else {"split": "train", "seed": ctx.seed,
                                                         "samples": len(calibration)},
        "versions": {lib: library_version(lib) for lib in ("litert-torch", "ai-edge-litert", "executorch", "torchao")},
    }
    summary = ", ".join(f"{r['name']} {r.get('size_bytes', 0)} B val {r.get('val_accuracy', float('nan')):.4f}"
                        + ("" if r["deployable"] else " (not deployable)") for r in rows)
    return StageResult(written, metrics, f"{source} -> {summary}")
