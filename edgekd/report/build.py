"""manifest.json -> the report.json document (pure: no files written, no clock read except `created_at`).

Everything comes from the stages' metrics in the manifest (plus optional arm_check.json and merged device
files in the run directory), so `edgekd report RUN_DIR` re-renders the same document without rerunning.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from edgekd.version import __version__
from edgekd.errors import InputError
from edgekd.gate.budgets import ACCURACY_BUDGETS, REPORT_SCHEMA_VERSION, active_limits, evaluate_row, find_row, p50_at
from edgekd.report.choice import choose_artifact, not_deployable, other_runtimes
from edgekd.runner.contract import Manifest
from edgekd.stages import benchmark as benchmark_stage
from edgekd.stages import distill as distill_stage
from edgekd.stages import export as export_stage
from edgekd.stages import prune as prune_stage
from edgekd.stages import quantize as quantize_stage
from edgekd.stages import teacher as teacher_stage

TEACHER, STUDENT, BASELINE = teacher_stage.MODEL, distill_stage.STUDENT_MODEL, distill_stage.BASELINE_MODEL
PRUNED = prune_stage.MODEL

# A pruned / int8 model less than this much faster than its source is flagged: the difference is within
# what timing noise alone produces between two runs of the same model.
NO_SPEEDUP_TOLERANCE = 0.02
ARM_LABEL = "emulated — correctness only, no latency"


def _round(value: Any, digits: int = 6) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def _rows(bench: dict[str, Any], manifest: Manifest, threads: int, batch: int) -> list[dict[str, Any]]:
    """Benchmark rows, plus speed-up vs the teacher per setting and the model file's sha256."""
    rows = copy.deepcopy(bench.get("artifacts") or [])
    if not rows:
        raise InputError("manifest: the benchmark stage has no artifact rows; rerun `edgekd run --from benchmark`")
    if any(not isinstance(row, dict) or not isinstance(row.get("name"), str) for row in rows):
        raise InputError("manifest: a benchmark row has no 'name'")
    hashes = manifest.all_artifacts()
    teacher = find_row(rows, TEACHER)
    for row in rows:
        for entry in row.get("latency_ms") or []:
            base = p50_at(teacher, entry.get("threads"), entry.get("batch"))
            mine = entry.get("p50")
            entry["speedup_vs_teacher"] = round(base / mine, 4) if base and mine else None
        base, mine = p50_at(teacher, threads, batch), p50_at(row, threads, batch)
        row["speedup_vs_teacher"] = round(base / mine, 4) if base and mine else None
        if row.get("path") and "sha256" not in row and row["path"] in hashes:
            row["sha256"] = hashes[row["path"]]  # lets merged device results find their artifact
    return rows


def training_checks(manifest: Manifest) -> list[dict[str, Any]]:
    """Eval-mode vs batch-statistics validation accuracy of each model a stage trained (or loaded)."""
    sources = ((TEACHER, manifest.metrics(teacher_stage.NAME).get("mode_check")),
               (STUDENT, manifest.metrics(distill_stage.NAME).get("mode_check")),
               (BASELINE, manifest.metrics(distill_stage.NAME).get("baseline_mode_check")),
               (PRUNED, manifest.metrics(prune_stage.NAME).get("mode_check")))
    return [{"model": model, **check} for model, check in sources if check]


def data_loading(manifest: Manifest) -> list[dict[str, Any]]:
    """Per training: the share of the step time spent waiting for the next batch (image files are decoded by
    the loader's workers), images/s, and the knob to turn when the loader is the bottleneck."""
    teacher, distill, prune = (manifest.metrics(stage.NAME) for stage in (teacher_stage, distill_stage, prune_stage))
    sources = (("teacher", teacher.get("data_loader")), ("distill", distill.get("data_loader")),
               ("distill baseline", distill.get("baseline_data_loader")), ("prune recovery", prune.get("data_loader")))
    keys = ("wait_fraction", "images_per_s", "streamed", "num_workers", "bottleneck", "advice")
    return [{"training": name, **{k: loader.get(k) for k in keys}} for name, loader in sources if loader]


def _flags(rows: list[dict[str, Any]], prune: dict[str, Any], quant: dict[str, Any], distill: dict[str, Any],
           threads: int, batch: int, blocked: dict[str, str],
           training: list[dict[str, Any]], loading: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Compression that did nothing (no smaller / no faster than its source), models at chance level or whose
    eval mode collapsed, int8 fallback, no KD gain, a data loader that holds training back."""
    flags: list[dict[str, Any]] = []
    loading = loading or []
    checks = []
    if prune and find_row(rows, PRUNED):
        checks.append((PRUNED, prune["source"], "pruning"))
    if quant and find_row(rows, quant["artifact_name"]):
        checks.append((quant["artifact_name"], quant["source"], "quantization"))
    for name, source, what in checks:
        row, src = find_row(rows, name), find_row(rows, source)
        if src is None:
            continue
        size, src_size = row.get("size_bytes"), src.get("size_bytes")
        if isinstance(size, (int, float)) and isinstance(src_size, (int, float)) and size >= src_size:
            flags.append({"kind": "no_size_gain", "artifact": name, "source": source, "message":
                          f"{what} did nothing for size: {name} is {size / 1024:.1f} KiB, {source} {src_size / 1024:.1f} KiB"})
        p50, src_p50 = p50_at(row, threads, batch), p50_at(src, threads, batch)
        if p50 and src_p50 and p50 >= src_p50 * (1 - NO_SPEEDUP_TOLERANCE):
            flags.append({"kind": "no_speed_gain", "artifact": name, "source": source, "message":
                          f"{what} did nothing for speed: {name} p50 {p50:.3f} ms vs {source} {src_p50:.3f} ms "
                          f"at {threads} thread(s), batch {batch} ({src_p50 / p50:.2f}x; under "
                          f"{1 / (1 - NO_SPEEDUP_TOLERANCE):.2f}x is within timing noise)"})
    for name, reason in blocked.items():
        if reason.startswith("at chance level"):
            flags.append({"kind": "at_chance", "artifact": name, "source": None,
                          "message": f"{name} is not deployed: {reason}"})
    fallback = quant["artifact_name"] if quant and not quant["deployable"] else None
    for row in rows:  # the accuracy gate's refusals (edgekd.gate.accuracy), any runtime
        reason = blocked.get(row["name"], "")
        if row["name"] != fallback and (row.get("collapsed") or "int8 " in reason) and not reason.startswith("at chance"):
            flags.append({"kind": "collapsed" if "collapsed" in reason else "int8_gate", "artifact": row["name"],
                          "source": None, "message": f"{row['name']} ({row.get('runtime') or 'onnxruntime'} "
                                                     f"{row.get('kind')}) is never deployed: {reason}"})
    for loader in loading:
        if loader.get("bottleneck") and loader.get("advice"):
            flags.append({"kind": "loader_bottleneck", "artifact": None, "source": None,
                          "message": f"{loader['training']}: {loader['advice']}"})
    for check in training:
        if check.get("message"):
            flags.append({"kind": "eval_mode_collapse" if check.get("diverged") else "trained_at_chance",
                          "artifact": check["model"], "source": None, "message": check["message"]})
    if quant and not quant["deployable"]:
        flags.append({"kind": "int8_fallback", "artifact": quant["artifact_name"], "source": quant["source"],
                      "message": f"int8 not deployable: {quant['fallback_reason']}; "
                                 f"the fp32 {quant['source']} model stays the candidate"})
    gain = distill.get("kd_gain") if distill else None
    if isinstance(gain, (int, float)) and gain <= 0:
        flags.append({"kind": "no_kd_gain", "artifact": STUDENT, "source": BASELINE,
                      "message": f"distillation did not beat the no-KD baseline (kd_gain {gain:+.4f})"})
    return flags


def _environment(bench: dict[str, Any], budgets: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    env = copy.deepcopy(bench.get("environment") or {})
    # The provider the sessions actually used (a row's `providers`), not the first one onnxruntime offers
    # (`providers` in cpu_info() is get_available_providers(), which may start with e.g. Azure).
    used = next((r["providers"][0] for r in rows if r.get("providers")), None)
    if used and not env.get("execution_provider"):
        env["execution_provider"] = used
    flags = env.get("flags")
    if isinstance(flags, dict):  # cpu_info() form {flag: True/False/None} -> the enabled names too
        env["flags_enabled"] = sorted(name for name, on in flags.items() if on)
    elif isinstance(flags, list):
        env["flags_enabled"] = sorted(str(f) for f in flags)
    providers = env.get("providers") or []
    if not env.get("execution_provider"):
        cpu = "CPUExecutionProvider"
        env["execution_provider"] = cpu if cpu in providers or not providers else providers[0]
    env.setdefault("threads", budgets["latency_threads"])
    if not env.get("fingerprint"):
        from edgekd.runtime.cpu import environment_fingerprint

        env["fingerprint"] = environment_fingerprint(env)
    return env


def _sections(manifest: Manifest) -> dict[str, Any]:
    teacher, distill = manifest.metrics(teacher_stage.NAME), manifest.metrics(distill_stage.NAME)
    prune, quant = manifest.metrics(prune_stage.NAME), manifest.metrics(quantize_stage.NAME)
    export = manifest.metrics(export_stage.NAME)
    data = teacher.get("data") or {}
    out: dict[str, Any] = {
        "data": {**{k: data.get(k) for k in ("dataset", "num_classes", "input_shape", "split_sizes")},
                 # image files: the resize/crop they go through and the unreadable ones skipped
                 **{k: data[k] for k in ("resize", "crop", "skipped_images") if data.get(k) is not None}},
        "teacher": {"model": teacher.get("model"), "params": teacher.get("params"),
                    "val_accuracy": teacher.get("val_accuracy"), "test_accuracy": teacher.get("test_accuracy")},
        "distill": None, "pruning": None, "quantization": None, "export": None,
    }
    if distill:
        out["distill"] = {
            "student_accuracy": distill.get("student_test_accuracy"),
            "baseline_accuracy": distill.get("baseline_test_accuracy"),
            "kd_gain": distill.get("kd_gain"), "teacher_accuracy": distill.get("teacher_test_accuracy"),
            "student_params": distill.get("student_params"), "teacher_params": distill.get("teacher_params"),
            "student_agreement": distill.get("student_test_agreement"),
            "student_choice": distill.get("student_choice"),
        }
    if prune:
        keys = ("source", "importance", "target", "params_before", "params_after", "macs_before", "macs_after",
                "accuracy_before_prune", "accuracy_after_prune", "accuracy_after_recovery", "test_accuracy")
        out["pruning"] = {k: prune.get(k) for k in keys}
        out["pruning"]["latency"] = prune.get("latency")  # latency targets and round_to: auto, measured
        if prune.get("params_before") and prune.get("params_after") is not None:
            out["pruning"]["params_kept"] = round(prune["params_after"] / prune["params_before"], 4)
        if prune.get("macs_before") and prune.get("macs_after") is not None:
            out["pruning"]["macs_kept"] = round(prune["macs_after"] / prune["macs_before"], 4)
    if quant:
        keys = ("source", "artifact_name", "chosen", "accuracy_drop", "agreement", "speedup_vs_fp32",
                "deployable", "fallback_reason", "attempts")
        out["quantization"] = {k: quant.get(k) for k in keys}
        mixed = quant.get("mixed_precision")
        if mixed:
            out["quantization"]["mixed_precision"] = {
                k: mixed.get(k) for k in ("nodes", "kept_fp32", "weight_ranges", "met", "max_accuracy_drop",
                                          "min_agreement", "search_s", "candidates_quantized", "steps")}
    if export:
        models = export.get("models") or {}
        out["export"] = {"models": {name: {k: m.get(k) for k in ("path", "opset_written", "ort_path", "size_bytes")}
                                    | {"parity": m.get("parity")} for name, m in models.items()}}
    return out


PROFILE_TOP_NODES = 8


def operator_profile(bench: dict[str, Any], quant: dict[str, Any], deployed: str) -> dict[str, Any] | None:
    """The benchmark's per-operator profiles, trimmed for the report: the teacher, the int8 model and its fp32
    source (and the deployed artifact), each with its time per op type and its slowest nodes."""
    profiles = bench.get("profile") or {}
    if not profiles:
        return None
    wanted = ["teacher", quant.get("source"), quant.get("artifact_name"), deployed]
    names = [n for n in dict.fromkeys(wanted) if n and n in profiles and "error" not in profiles[n]]
    if not names:
        return None
    return {"models": names, "deployed": deployed, "int8": quant.get("artifact_name"),
            "int8_source": quant.get("source"),
            "runs": profiles[names[0]].get("runs"),
            "profiles": {n: {"run_us": profiles[n]["run_us"], "node_us": profiles[n]["node_us"],
                             "op_types": profiles[n]["op_types"],
                             "nodes": profiles[n]["nodes"][:PROFILE_TOP_NODES]} for n in names}}


def _arm_check(run_dir: Path) -> dict[str, Any] | None:
    """arm_check.json, read generically (another tool writes it): agreement, max |diff|, ORT version."""
    path = run_dir / "arm_check.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return {"label": ARM_LABEL, "status": "unreadable", "reason": f"arm_check.json: {exc}"}
    if not isinstance(doc, dict):
        return {"label": ARM_LABEL, "status": "unreadable", "reason": "arm_check.json is not a JSON object"}
    comparison = doc.get("comparison") if isinstance(doc.get("comparison"), dict) else {}
    emulator = doc.get("emulator") if isinstance(doc.get("emulator"), dict) else {}
    pick = lambda key: doc.get(key, comparison.get(key))  # noqa: E731
    return {
        "label": ARM_LABEL, "status": doc.get("status"), "reason": doc.get("reason"),
        "agreement": pick("agreement"), "max_abs_diff": pick("max_abs_diff"), "samples": pick("samples"),
        "arm_accuracy": pick("arm_accuracy"), "x86_accuracy": pick("x86_accuracy"),
        "onnxruntime_version": doc.get("onnxruntime_version") or emulator.get("onnxruntime") or doc.get("onnxruntime"),
        "cpu": emulator.get("cpu"), "precision": (doc.get("model") or {}).get("precision")
        if isinstance(doc.get("model"), dict) else None,
    }


def _merge_devices(report: dict[str, Any], run_dir: Path, notes: list[str]) -> dict[str, Any]:
    """Device results kept in RUN_DIR/devices/*.json (added by `edgekd report --merge`) go into `devices`."""
    files = sorted((run_dir / "devices").glob("*.json")) if (run_dir / "devices").is_dir() else []
    if not files:
        return report
    from edgekd.runtime.device_report import merge_device_json

    for path in files:
        try:
            report = merge_device_json(report, json.loads(path.read_text(encoding="utf-8")))
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the report
            notes.append(f"device results {path.name} not merged: {exc}")
    return report


def build_report(manifest: Manifest, run_dir: Path, budgets: dict[str, Any], *,
                 run_name: str | None = None, created_at: str | None = None,
                 deploy_runtime: str = "onnxruntime") -> dict[str, Any]:
    """The report.json document. `budgets` is normalized (edgekd.gate.budgets.normalize_budgets);
    `deploy_runtime` (onnxruntime | litert | executorch) is the runtime whose artifacts may be deployed."""
    run_dir = Path(run_dir)
    bench = manifest.metrics(benchmark_stage.NAME)
    if not bench:
        raise InputError(f"{run_dir}: no benchmark results in the manifest; run the pipeline through `benchmark` first")
    threads, batch = budgets["latency_threads"], budgets["latency_batch"]
    rows = _rows(bench, manifest, threads, batch)
    quant, prune = manifest.metrics(quantize_stage.NAME), manifest.metrics(prune_stage.NAME)
    sections = _sections(manifest)
    num_classes = int((sections["data"] or {}).get("num_classes") or 2)
    mobile = manifest.metrics("mobile")
    refused = not_deployable(quant, rows, num_classes, mobile)
    for row in rows:
        row["gate"] = refused.get(row["name"], "passed")
    blocked = {**refused, **other_runtimes(rows, deploy_runtime)}
    checks = training_checks(manifest)
    loading = data_loading(manifest)
    for row in rows:
        row["deployable"] = row["name"] not in blocked
    choice, candidates = choose_artifact(rows, budgets, blocked)
    deployed_row = find_row(rows, choice["artifact"])
    verdicts = _verdicts(rows, deployed_row, budgets)
    notes: list[str] = []
    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "edgekd_version": __version__,
        "created_at": created_at or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": {"name": run_name or run_dir.name},
        "environment": _environment(bench, budgets, rows),
        **{k: sections[k] for k in ("data", "teacher")},
        "artifacts": rows,
        **{k: sections[k] for k in ("distill", "pruning", "quantization", "export")},
        "budget_settings": {**{k: budgets[k] for k in ("latency_threads", "latency_batch")}, **active_limits(budgets)},
        "budgets": verdicts,
        "budgets_passed": all(v["passed"] for v in verdicts),
        "candidates": candidates,
        "runtimes": runtime_table(rows, threads, batch, (mobile or {}).get("source") or (quant or {}).get("source")),
        "deployed": {"artifact": choice["artifact"], "path": f"deploy/{deployed_file_name(deployed_row)}",
                     "source_path": deployed_row.get("path"), "runtime": deployed_row.get("runtime") or "onnxruntime",
                     "kind": deployed_row.get("kind"), "reason": choice["reason"], "rule": choice["rule"],
                     "budgets_passed": all(v["passed"] for v in verdicts), "files": []},
        "flags": _flags(rows, prune, quant, manifest.metrics(distill_stage.NAME), threads, batch, blocked,
                        checks, loading),
        "training_checks": checks,
        "data_loading": loading,
        "torch_reference": copy.deepcopy(bench.get("torch_reference")),
        "mobile": copy.deepcopy(bench.get("mobile")),
        "profile": copy.deepcopy(operator_profile(bench, quant, choice["artifact"])),
        "arm_check": _arm_check(run_dir),
        "devices": [],
        "notes": notes,
    }
    report = _merge_devices(report, run_dir, notes)
    report["notes"] = notes
    return report


def deployed_file_name(row: dict[str, Any]) -> str:
    """model.onnx, model.tflite or model.pte: the bundle keeps the artifact's format."""
    return "model" + (Path(str(row.get("path") or "")).suffix.lower() or ".onnx")


def runtime_table(rows: list[dict[str, Any]], threads: int, batch: int, source: str | None = None,
                  ) -> list[dict[str, Any]]:
    """Runtime x precision of the chain's last model (`source`, the model the int8 and mobile files were made
    from; ONNX Runtime's int8 too): accuracy, agreement, p50 at the budget setting, size, gate verdict.
    Without a source, every row but the teacher and the baseline."""
    table = []
    for row in rows:
        onnx_fp32 = (row.get("runtime") or "onnxruntime") == "onnxruntime" and row.get("kind") == "fp32"
        if source and onnx_fp32:
            if row["name"] != source:
                continue
        elif row["name"] in (TEACHER, BASELINE):
            continue
        table.append({"runtime": row.get("runtime") or "onnxruntime", "kind": row.get("kind"), "artifact": row["name"],
                      "accuracy": row.get("accuracy"), "agreement": row.get("agreement"),
                      "p50_ms": p50_at(row, threads, batch), "size_bytes": row.get("size_bytes"),
                      "gate": row.get("gate"), "deployable": row.get("deployable")})
    return table


def _verdicts(rows: list[dict[str, Any]], deployed_row: dict[str, Any], budgets: dict[str, Any]) -> list[dict[str, Any]]:
    """Budget verdicts of the deployed artifact. When the teacher is deployed although the run compressed it
    (every compressed artifact was excluded, e.g. at chance level), the accuracy budgets judge the best
    compressed artifact: they are there to gate the compression, which failed, not the reference model."""
    teacher = find_row(rows, TEACHER)
    compressed = [r for r in rows if r["name"] not in (TEACHER, BASELINE) and isinstance(r.get("accuracy"), (int, float))]
    if deployed_row["name"] != TEACHER or not compressed:
        return evaluate_row(deployed_row, teacher, budgets)
    best = max(compressed, key=lambda r: r["accuracy"])
    others = tuple(name for name in active_limits(budgets) if name not in ACCURACY_BUDGETS)
    return (evaluate_row(deployed_row, teacher, budgets, names=others)
            + evaluate_row(best, teacher, budgets, names=ACCURACY_BUDGETS))


def strip_volatile(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its timestamps (what 'same report' means for a re-render)."""
    clean = copy.deepcopy(report)
    clean.pop("created_at", None)
    for device in clean.get("devices") or []:
        device.pop("created_at", None)
    return clean
