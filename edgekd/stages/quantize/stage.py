"""Stage 5: int8 post-training quantization of the last fp32 model, kept only if it earns its place.

Static (calibrated on TRAINING images) or dynamic int8 with onnxruntime.quantization. The first attempt
uses the configured settings ('auto' resolved from the CPU's flags); it is timed against its fp32 source
(interleaved, batch 1, 1 thread) and checked on the validation split. When it is not faster, or loses too
much accuracy, and `quantize.search` is on, the other sensible settings are tried and the best kept.
Every attempt is recorded. An int8 model that drops more than `max_accuracy_drop` is written but marked
not deployable (`fallback`), so the report deploys the fp32 model instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import atomic
from edgekd.errors import EdgekdError, InputError, StageFailed
from edgekd.runner.context import RunContext
from edgekd.runner.contract import StageResult
from edgekd.stages.export.config import MODEL_ORDER, VAL_ARTIFACT, onnx_name
from edgekd.stages.export.exporter import ort_sidecars
from edgekd.stages.quantize.config import ARTIFACT, MODELS, QuantizeJob

log = logging.getLogger("edgekd")

SOURCE_ORDER = tuple(reversed(MODEL_ORDER))  # auto: the last model of the chain
CALIBRATION_CHUNK = 64  # calibration images decoded at a time
TIMING_ITERATIONS = 100


def resolve_source(requested: str, exported: dict[str, Any]) -> str:
    """auto -> pruned if exported, else student, else teacher; an explicit choice must have been exported."""
    if requested == "auto":
        found = next((name for name in SOURCE_ORDER if name in exported), None)
        if found is None:
            raise StageFailed("quantize: the export stage recorded no model to quantize; rerun export")
        return found
    if requested not in exported:
        raise InputError(f"quantize.source: '{requested}' was not exported in this run "
                         f"(exported: {', '.join(exported) or 'none'}); enable its stage or use auto")
    return requested


def calibration_inputs(data: Any, samples: int, seed: int, folder: Path | None = None) -> np.ndarray:
    """Normalized TRAINING images for calibration (a seeded sample; never val or test).

    Image files are decoded in batches into a float32 .npy memmap in `folder` (memory stays one batch; the
    calibration reader slices it batch by batch); in-memory datasets give a plain array.
    """
    from edgekd.stages.quantize.quantization import calibration_indices

    index = calibration_indices(len(data.train), samples, seed)
    if not data.meta.streamed or folder is None:
        return data.sample(data.train, index).numpy()
    # unreadable images (on_bad_image: skip) shrink the sample: fill, then trim the view
    stored = np.lib.format.open_memmap(folder / "calibration.npy", mode="w+", dtype=np.float32,
                                       shape=(len(index), *data.meta.input_shape))
    filled = 0
    for start in range(0, len(index), CALIBRATION_CHUNK):
        batch = data.sample(data.train, index[start:start + CALIBRATION_CHUNK]).numpy()
        stored[filled:filled + len(batch)] = batch
        filled += len(batch)
    stored.flush()
    return stored[:filled]


def _fixed_batch(path: Path) -> int | None:
    import onnx

    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value or None


def _alternatives(base: Any, auto_reduce: bool, mode: str, ops: set[str]) -> list[Any]:
    from edgekd.stages.quantize.quantization import with_label as w

    if mode == "dynamic":
        alts = [w(base, "uint8 weights", weight_type="uint8"),
                w(base, "per-channel flipped", per_channel=not base.per_channel)]
        if "Conv" in ops:  # dynamic Conv becomes ConvInteger, often slower than fp32
            alts.append(w(base, "MatMul/Gemm only, Conv in float",
                          exclude_op_types=tuple(dict.fromkeys((*base.exclude_op_types, "Conv")))))
        return alts
    return [
        w(base, "QDQ u8/s8 (ORT CPU recommendation)", format="qdq", activation_type="uint8",
          weight_type="int8", reduce_range=auto_reduce),
        w(base, "per-channel flipped", per_channel=not base.per_channel),
        w(base, "QDQ u8/u8 (no saturation without VNNI)", format="qdq", activation_type="uint8",
          weight_type="uint8", reduce_range=False),
        w(base, "QDQ s8/s8", format="qdq", activation_type="int8", weight_type="int8", reduce_range=False),
        w(base, "QOperator u8/s8", format="qoperator", activation_type="uint8", weight_type="int8",
          reduce_range=auto_reduce),
    ]


def fallback_decision(drop: float, max_drop: float, fallback: bool, source: str,
                      attempts: int = 1) -> tuple[bool, str | None, str | None]:
    """(deployable, fallback_reason, warning) for an int8 model whose validation accuracy drops `drop`."""
    if drop <= max_drop:
        return True, None, None
    message = (f"int8 validation accuracy drops {drop:.4f} vs {source} fp32 (limit quantize.max_accuracy_drop "
               f"{max_drop:g}) with the best of {attempts} setting(s)")
    if fallback:
        return False, f"{message}; {source} fp32 stays the deployable candidate", None
    return True, None, f"{message}; kept as deployable (quantize.fallback: false)"


def _pick(attempts: list[dict[str, Any]], max_drop: float) -> dict[str, Any] | None:
    """Fastest attempt within the accuracy limit; if none is, the most accurate."""
    ok = [a for a in attempts if a.get("error") is None]
    good = [a for a in ok if a["accuracy_drop"] <= max_drop]
    if good:
        return max(good, key=lambda a: (a["speedup"], -a["size_bytes"]))
    return min(ok, key=lambda a: (a["accuracy_drop"], -a["speedup"])) if ok else None


def quantize_stage(job: QuantizeJob, ctx: RunContext) -> StageResult:
    import onnx

    from edgekd.runtime.evaluate import load_eval_npz
    from edgekd.stages.export.exporter import set_metadata
    from edgekd.stages.quantize import quantization as qz

    q = job.quantize
    exported = ctx.manifest.metrics("export").get("models", {})
    source = resolve_source(q.source, exported)
    src = ctx.artifact(onnx_name(source))
    val = load_eval_npz(ctx.artifact(VAL_ARTIFACT))
    cpu = qz.cpu_features()
    act, reduce, why = qz.choose_for_cpu(q.activation_type, q.reduce_range, q.weight_type, cpu)
    base = qz.QuantSettings(
        mode=q.mode, format=q.format, per_channel=q.per_channel, reduce_range=reduce, activation_type=act,
        weight_type=q.weight_type, method=q.calibration.method, percentile=q.calibration.percentile,
        exclude_nodes=tuple(q.exclude_nodes), exclude_op_types=tuple(q.exclude_op_types),
        bias_correction=q.bias_correction and q.mode == "static")
    base.check()
    _, auto_reduce, _ = qz.choose_for_cpu("auto", "auto", "int8", cpu)
    metrics: dict[str, Any] = {
        "source": source, "source_path": src.name, "path": ARTIFACT, "mode": q.mode,
        "artifact_name": MODELS[q.mode],
        "cpu_flags": {**cpu, "activation_type": act, "reduce_range": reduce, "why": why,
                      "auto": {"activation_type": q.activation_type == "auto", "reduce_range": q.reduce_range == "auto"}},
    }
    reader = None
    calibration_folder = ctx.work_folder("calibration") if ctx.data.meta.streamed else None
    if q.mode == "static":
        calib = calibration_inputs(ctx.data, q.calibration.samples, ctx.seed, calibration_folder)
        reader = qz.ArrayCalibrationReader(calib, batch_size=_fixed_batch(src) or 32)
        metrics["calibration"] = {"method": q.calibration.method, "split": "train", "seed": ctx.seed,
                                  "samples_requested": q.calibration.samples, "samples_used": len(calib)}
    fp32_pred = qz.predictions(src, val.inputs)
    fp32_accuracy = float(np.mean(fp32_pred == val.labels))
    with tempfile.TemporaryDirectory(prefix="edgekd-quantize-") as work_dir:
        work = Path(work_dir)
        pre = work / "pre.onnx"
        metrics["preprocess"] = qz.preprocess(src, pre)
        qz.validate_exclusions(pre, q.exclude_nodes, q.exclude_op_types)
        if q.mode == "static" and q.calibration.method != "minmax":
            estimate = qz.activation_bytes_per_sample(pre) * len(calib)
            metrics["calibration"]["histogram_memory_estimate_bytes"] = estimate
            log.info("  %s calibration keeps every activation of %d samples in memory (~%.0f MB)",
                     q.calibration.method, len(calib), estimate / 2**20)
        cache = qz.CalibrationCache(work)
        attempts: list[dict[str, Any]] = []
        recipes: list[Any] = []  # the QuantSettings of each attempt, same order

        def attempt(settings: Any) -> dict[str, Any]:
            target = work / f"attempt{len(attempts)}.onnx"
            row: dict[str, Any] = {"label": settings.label, "settings": settings.to_dict(), "error": None}
            try:
                row["options"] = qz.quantize_model(pre, target, settings, reader, cache)
                row.update(qz.evaluate_attempt(src, target, val.inputs, val.labels, fp32_pred, TIMING_ITERATIONS))
                row["file"] = target
            except EdgekdError:
                raise
            except Exception as exc:  # noqa: BLE001 - one failed recipe must not end the search
                row["error"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            attempts.append(row)
            recipes.append(settings)
            log.info("  int8 attempt %d (%s): %s", len(attempts), settings.label, _describe(row))
            return row

        first = attempt(base)
        earned = first["error"] is None and first["speedup"] > 1.0 and first["accuracy_drop"] <= q.max_accuracy_drop
        if q.search and not earned:
            tried = {base.key()}
            ops = set(qz.op_counts(pre))
            for settings in _alternatives(base, auto_reduce, q.mode, ops):
                if settings.key() not in tried:
                    tried.add(settings.key())
                    attempt(settings)
            best = _pick(attempts, q.max_accuracy_drop)
            edges = qz.edge_layers(pre)
            if best is not None and edges:
                chosen = recipes[attempts.index(best)]
                keep = tuple(dict.fromkeys((*chosen.exclude_nodes, *edges)))
                candidate = qz.with_label(chosen, f"{chosen.label} + first/last layer in float", exclude_nodes=keep)
                if candidate.key() not in tried:
                    attempt(candidate)
        best = _pick(attempts, q.max_accuracy_drop)
        if q.mixed_precision == "auto" and best is not None:
            mixed = _mixed_precision(q, recipes[attempts.index(best)], src, pre, work, reader, cache, val)
            metrics["mixed_precision"] = mixed.pop("metrics")
            row = attempt(mixed["settings"])
            if row["error"] is None and (mixed["met"] or row["accuracy_drop"] <= best["accuracy_drop"]):
                best = row  # the search's choice: within the limits (agreement floor included) when any was
        if best is None:
            raise StageFailed(f"quantize: every int8 attempt failed; first error: {attempts[0]['error']}")
        int8_pred = qz.predictions(best["file"], val.inputs)  # for the collapse check below
        proto = onnx.load(str(best["file"]))
        source_meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
        set_metadata(proto, {**source_meta, "artifact": metrics["artifact_name"], "source_artifact": src.name,
                             "source_sha256": atomic.sha256_file(src),
                             "quantization": json.dumps({**best["settings"], "label": best["label"]})})
        with atomic.atomic_path(ctx.path(ARTIFACT)) as temp:
            onnx.save_model(proto, str(temp), save_as_external_data=False)
        chosen_index = attempts.index(best)
        for row in attempts:
            row.pop("file", None)
    artifacts = [ARTIFACT]
    fp32_size, int8_size = src.stat().st_size, ctx.path(ARTIFACT).stat().st_size
    drop = best["accuracy_drop"]
    deployable, reason, warning = fallback_decision(drop, q.max_accuracy_drop, q.fallback, source, len(attempts))
    from edgekd.gate.accuracy import collapse_reason

    collapsed = collapse_reason(int8_pred, val.labels, what="validation images")
    if collapsed:  # the same gate as every runtime's int8 file: never deployed, whatever quantize.fallback says
        deployable, reason, warning = False, f"int8 {collapsed}; {source} fp32 stays the deployable candidate", None
    if warning:
        metrics["accuracy_warning"] = warning
    if reason or warning:
        log.warning("  %s", reason or warning)
    metrics.update(
        chosen={**best["settings"], "label": best["label"], "attempt": chosen_index, "options": best.get("options")},
        attempts=attempts, fp32_val_accuracy=fp32_accuracy, int8_val_accuracy=best["val_accuracy"],
        accuracy_drop=drop, agreement=best["agreement"], fp32_size_bytes=fp32_size, size_bytes=int8_size,
        size_ratio=int8_size / fp32_size, speedup_vs_fp32=best["speedup"], p50_ms_fp32=best["p50_ms_fp32"],
        p50_ms_int8=best["p50_ms"], faster_than_fp32=best["speedup"] > 1.0, smaller_than_fp32=int8_size < fp32_size,
        quantized_nodes=best["quantized_nodes"],
        deployable=deployable, fallback_reason=reason, ort_path=None, ort_error=None,
    )
    if not metrics["faster_than_fp32"]:
        log.warning("  int8 is not faster than %s fp32 on this CPU (x%.2f%s); the benchmark decides what ships",
                    source, best["speedup"], "" if metrics["smaller_than_fp32"] else ", and not smaller")
    if job.ort_format:
        from edgekd.runtime.mobile import convert_to_ort_with_reason

        work = ctx.work_folder("quantize")  # the converter's files are renamed into place once complete
        try:
            path, error = convert_to_ort_with_reason(ctx.path(ARTIFACT), work)
            metrics["ort_path"], metrics["ort_error"] = (path.name if path else None), error
            if path is not None:
                converted = [path.name, *ort_sidecars(work, path)]
                for name in converted:
                    os.replace(work / name, ctx.path(name))
                artifacts += converted
        finally:
            shutil.rmtree(work, ignore_errors=True)
    summary = (f"{metrics['artifact_name']} from {source}: {best['label']}, x{best['speedup']:.2f} vs fp32, "
               f"{int8_size / fp32_size:.2f} of the size, val drop {drop:+.4f}"
               + ("" if deployable else " -> fp32 fallback"))
    if calibration_folder is not None:
        shutil.rmtree(calibration_folder, ignore_errors=True)
    return StageResult(artifacts, metrics, summary)


def _mixed_precision(q: Any, base: Any, src: Path, pre: Path, work: Path, reader: Any, cache: Any,
                     val: Any) -> dict[str, Any]:
    """quantize.mixed_precision: auto from the best all-int8 recipe: per-layer sensitivity and time gain,
    then the measured search (edgekd.stages.quantize.mixed)."""
    import time

    from edgekd.stages.quantize import mixed as mp
    from edgekd.stages.quantize.quantization import with_label

    start = time.perf_counter()
    nodes = [n for n in mp.quantizable_nodes(pre) if n not in base.exclude_nodes]
    folder = work / "mixed"
    folder.mkdir()
    measurer = mp.OrtMeasurer(src, pre, folder, reader, cache, val.inputs, val.labels, TIMING_ITERATIONS)
    profiled = mp.profile_gains(pre, measurer.file(base), val.inputs, nodes)
    log.info("  mixed precision: %d weighted nodes; per-op profile fp32 %.0f us, int8 %.0f us per run",
             len(nodes), profiled["fp32_us"], profiled["int8_us"])
    result = mp.search_mixed_precision(base, nodes, measurer, profiled["gains"], q.max_accuracy_drop,
                                       q.min_agreement, q.mixed_precision_steps)
    chosen = result["settings"]
    label = (f"mixed precision (auto): {len(chosen.exclude_nodes)} of {len(nodes) + len(base.exclude_nodes)} "
             f"weighted nodes in float")
    metrics = {"nodes": len(nodes), "kept_fp32": result["kept_fp32"], "weight_ranges": result["weight_ranges"],
               "sensitivity": result["sensitivity"], "gains": profiled["gains"], "steps": result["steps"],
               "race": result["race"], "pairs": result["pairs"],
               "met": result["met"], "max_accuracy_drop": q.max_accuracy_drop, "min_agreement": q.min_agreement,
               "search_s": time.perf_counter() - start, "candidates_quantized": len(measurer.files),
               "profile_run_us": {"fp32": profiled["fp32_us"], "int8": profiled["int8_us"]}}
    log.info("  mixed precision: %s in %.1f s (%d candidate graphs)%s", label, metrics["search_s"],
             len(measurer.files), "" if result["met"] else "; no mix met the limits")
    return {"settings": with_label(chosen, label), "met": result["met"], "metrics": metrics}


def _describe(row: dict[str, Any]) -> str:
    if row["error"]:
        return f"failed ({row['error']})"
    return (f"x{row['speedup']:.2f} vs fp32 ({row['p50_ms']:.3f} / {row['p50_ms_fp32']:.3f} ms), "
            f"{row['size_bytes']} bytes, val acc {row['val_accuracy']:.4f}, agreement {row['agreement']:.4f}")
