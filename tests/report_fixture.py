"""A hand-made run directory for the report tests: tiny real ONNX models plus a manifest whose stage
metrics follow the contracts of teacher / distill / prune / export / quantize / benchmark."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.runner.contract import Manifest

MODELS = {"teacher": ("teacher.onnx", 96), "student": ("student.onnx", 24), "student_baseline": ("student_baseline.onnx", 24),
          "pruned": ("pruned.onnx", 16), "int8": ("model.int8.onnx", 8)}
P50 = {"teacher": 0.40, "student": 0.12, "student_baseline": 0.12, "pruned": 0.10, "int8": 0.06}
ACCURACY = {"teacher": 0.988, "student": 0.975, "student_baseline": 0.968, "pruned": 0.972, "int8": 0.970}
ENVIRONMENT = {"cpu": "Test CPU @ 2.0GHz", "arch": "x86_64", "cores": 2, "usable_cores": 2, "os": "Linux 6.1",
               "python": "3.11.2", "onnxruntime": "1.20.0", "torch": "2.6.0", "numpy": "2.1.0",
               "flags": {"avx2": True, "avx512f": False, "avx512_vnni": False, "neon": None},
               "providers": ["CPUExecutionProvider"], "peak_gflops": {"1": 40.0, "2": 75.0}, "fingerprint": "abc123def4567890"}


def tiny_model(path: Path, hidden: int, seed: int = 0) -> None:
    """[N,1,8,8] -> Flatten -> Gemm -> Relu -> Gemm -> logits [N,4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array(rng.standard_normal((64, hidden)).astype(np.float32), "W1"),
               numpy_helper.from_array(np.zeros(hidden, np.float32), "B1"),
               numpy_helper.from_array(rng.standard_normal((hidden, 4)).astype(np.float32), "W2"),
               numpy_helper.from_array(np.zeros(4, np.float32), "B2")]
    nodes = [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("Gemm", ["f", "W1", "B1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Gemm", ["r", "W2", "B2"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def latency_rows(p50: float, scale: float = 1.0, spread: float = 0.03) -> list[dict[str, Any]]:
    rows = []
    for threads in (1, 2):
        for batch in (1, 32):
            base = p50 * scale * (batch ** 0.8) / (1.6 if threads == 2 else 1.0)
            rows.append({"threads": threads, "batch": batch, "p50": round(base, 5), "p90": round(base * (1 + spread), 5),
                         "p99": round(base * (1 + 3 * spread), 5), "mean": round(base * (1 + spread / 3), 5),
                         "std": round(base * spread, 5), "min": round(base * 0.95, 5), "max": round(base * 1.3, 5),
                         "iterations": 200, "throughput_ips": round(batch * 1000 / base, 1)})
    return rows


def samples(p50: float, spread: float = 0.03, n: int = 200, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return [round(float(v), 5) for v in p50 * (1 + spread * np.abs(rng.standard_normal(n)) * 0.8)]


def benchmark_metrics(run_dir: Path, p50: dict[str, float], accuracy: dict[str, float], names: list[str],
                      spread: float = 0.03) -> dict[str, Any]:
    rows = []
    for index, name in enumerate(names):
        path, hidden = MODELS[name]
        size = (run_dir / path).stat().st_size if (run_dir / path).exists() else 1000 * hidden
        rows.append({"name": name, "kind": "int8" if name.startswith("int8") else "fp32", "path": path,
                     "params": 64 * hidden + hidden * 4 + hidden + 4, "macs": 64 * hidden + hidden * 4,
                     "size_bytes": size, "accuracy": accuracy[name], "agreement": 1.0 if name == "teacher" else 0.97,
                     "latency_ms": latency_rows(p50[name], spread=spread), "throughput_ips": round(1000 / p50[name], 1),
                     "peak_memory_bytes": 20_000_000 + 1000 * hidden, "compute_bound_ms": 0.001,
                     "latency_samples_ms": samples(p50[name], spread, seed=index), "session_create_ms": 3.0,
                     "first_run_ms": 0.5})
    return {"environment": copy.deepcopy(ENVIRONMENT), "artifacts": rows,
            "torch_reference": [{"name": "teacher", "threads": 1, "batch": 1, "p50": 0.9}],
            "mobile": {name: {"usable": True, "ops": ["Gemm"], "ort_ok": True} for name in names}}


def make_manifest(run_dir: Path, *, p50: dict[str, float] | None = None, accuracy: dict[str, float] | None = None,
                  int8_deployable: bool = True, with_int8: bool = True, with_baseline: bool = True,
                  spread: float = 0.03, environment: dict[str, Any] | None = None) -> Manifest:
    """The manifest of a finished run up to benchmark (model files are read for sizes when they exist)."""
    p50 = {**P50, **(p50 or {})}
    accuracy = {**ACCURACY, **(accuracy or {})}
    names = [n for n in MODELS if (with_int8 or n != "int8") and (with_baseline or n != "student_baseline")]
    data = {"dataset": "synthetic", "num_classes": 4, "input_shape": [1, 8, 8], "mean": [0.5], "std": [0.25],
            "labels": ["circle", "square", "cross", "line"], "split_sizes": {"train": 280, "val": 40, "test": 80}}

    def sha(*paths: str) -> dict[str, str]:
        return {p: hashlib.sha256((run_dir / p).read_bytes()).hexdigest() for p in paths if (run_dir / p).exists()}

    def size(path: str) -> int:
        return (run_dir / path).stat().st_size if (run_dir / path).exists() else 1000

    export_models = {n: {"path": MODELS[n][0], "size_bytes": size(MODELS[n][0]), "params": 1, "macs": 1,
                         "opset_written": 17, "parity": [{"batch": 1, "max_abs_diff": 1e-6}],
                         "ort_path": "pruned.ort" if n == "pruned" else None} for n in names if n != "int8"}
    bench = benchmark_metrics(run_dir, p50, accuracy, names, spread)
    if environment:
        bench["environment"].update(environment)
    stages: dict[str, Any] = {
        "teacher": {"params": 6628, "val_accuracy": 0.99, "test_accuracy": accuracy["teacher"], "data": data},
        "distill": {"student_test_accuracy": accuracy["student"],
                    "baseline_test_accuracy": accuracy["student_baseline"] if with_baseline else None,
                    "kd_gain": round(accuracy["student"] - accuracy["student_baseline"], 6) if with_baseline else None,
                    "teacher_test_accuracy": accuracy["teacher"], "student_params": 1660, "teacher_params": 6628,
                    "student_test_agreement": 0.97, "history": [], "baseline_history": []},
        "prune": {"params_before": 1660, "params_after": 1108, "macs_before": 1632, "macs_after": 1088,
                  "accuracy_before_prune": 0.975, "accuracy_after_prune": 0.90, "accuracy_after_recovery": 0.972,
                  "test_accuracy": accuracy["pruned"], "source": "student", "importance": "l2", "target": {"ratio": 0.3}},
        "export": {"models": export_models, "labels": data["labels"],
                   "preprocess": {"layout": "NCHW", "channels": 1, "height": 8, "width": 8, "scale": 1 / 255,
                                  "mean": [0.5], "std": [0.25], "input_name": "input", "output_name": "logits"}},
        "benchmark": bench,
    }
    if with_int8:
        stages["quantize"] = {"source": "pruned", "artifact_name": "int8", "chosen": {"per_channel": True},
                              "attempts": [{"label": "qdq"}], "accuracy_drop": 0.002, "agreement": 0.99,
                              "speedup_vs_fp32": 1.6, "deployable": int8_deployable,
                              "fallback_reason": None if int8_deployable else "int8 drops 0.031 > 0.01",
                              "ort_path": None}
    artifacts = {"teacher": sha("teacher.onnx"),
                 "export": sha(*[MODELS[n][0] for n in names if n != "int8"], "eval.npz", "pruned.ort"),
                 "quantize": sha("model.int8.onnx")}
    return Manifest.from_json({"schema_version": 1, "stages": {
        stage: {"status": "done", "fingerprint": "f" * 16, "config": {}, "artifacts": artifacts.get(stage, {}),
                "metrics": metrics, "summary": ""} for stage, metrics in stages.items()}}, "test manifest")


def make_run(tmp_path: Path, *, name: str = "fixture-run", budgets: dict[str, Any] | None = None,
             report: dict[str, Any] | None = None, **options: Any) -> Path:
    """Write runs/<name>/ with models, eval.npz, manifest.json and resolved-config.yaml; the report has not run yet."""
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    names = [n for n in MODELS if (options.get("with_int8", True) or n != "int8")
             and (options.get("with_baseline", True) or n != "student_baseline")]
    for index, model in enumerate(names):
        tiny_model(run_dir / MODELS[model][0], MODELS[model][1], seed=index)
    rng = np.random.default_rng(0)
    np.savez(run_dir / "eval.npz", inputs=rng.standard_normal((16, 1, 8, 8)).astype(np.float32),
             labels=rng.integers(0, 4, 16).astype(np.int64))
    (run_dir / "pruned.ort").write_bytes(b"fake ort flatbuffer")  # the export stage's .ort copy
    manifest = make_manifest(run_dir, **options)
    (run_dir / "manifest.json").write_text(json.dumps(manifest.to_json(), indent=2))
    # resolved-config.yaml is what `edgekd report` falls back to when the report stage never ran (JSON is valid YAML).
    (run_dir / "resolved-config.yaml").write_text(json.dumps({"name": name, "budgets": budgets or {}, "report": report or {}}))
    return run_dir
