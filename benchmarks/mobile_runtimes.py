"""ONNX Runtime vs LiteRT vs ExecuTorch, fp32 and int8, on the pipeline's deployable student and on
torchvision's mobilenet_v2 — one table from one run, with the accuracy gate's verdicts.

    python benchmarks/mobile_runtimes.py [--config pipeline.yaml] [--keep DIR] [--images 64] [--iterations 100]
                                         [--json OUT] [--only student|mobilenet_v2]

Needs the litert and executorch extras (pip install "edgekd[litert,executorch]").

1. The student: `edgekd run CONFIG --set export.targets=[onnx,tflite,pte]` (the default pipeline: the pruned
   student, its ORT int8, and the mobile stage's four files); the rows are the report's `runtimes` table
   (benchmark stage: interleaved, 1 thread, batch 1; test accuracy on the 1,000 test digits; gate verdicts).
   With `--student-run DIR` (a finished run of CONFIG) its pruned.pt is taken instead and the six files are
   made here as in 2., calibrated on the quantize stage's calibration images (CONFIG's seed and samples),
   accuracy on DIR/eval.npz (the test split), the int8 gate on DIR/val.npz (the validation split).
2. mobilenet_v2 (torchvision, 224x224, untrained, seeded; BatchNorm statistics estimated on 64 smooth random
   images, no training): the same six artifacts made the same way (ONNX
   via the export stage's exporter, ORT int8 with the quantize stage's default recipe for this CPU, LiteRT
   and ExecuTorch with the mobile stage's modules), calibrated on the same 32 images; `agreement` is top-1
   agreement with PyTorch fp32 on `--images` other images (untrained: there are no labels); every int8 file
   goes through `edgekd.gate.accuracy.int8_verdict` against its own runtime's fp32 (limit 0.01, the
   quantize stage's default) on those images; timing in one interleaved_benchmark call (1 thread, batch 1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TARGETS = "[onnx,tflite,pte]"
MAX_DROP = 0.01


def student_rows(config: Path, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    run_dir = work / "run"
    started = time.time()
    command = [sys.executable, "-m", "edgekd", "run", str(config), "--output-dir", str(run_dir),
               "--set", f"export.targets={TARGETS}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode not in (0, 1):  # 1: a budget missed, still a full report
        sys.exit(f"pipeline failed ({result.returncode}):\n{result.stderr[-3000:]}")
    report = json.loads((run_dir / "report.json").read_text())
    mobile = json.loads((run_dir / "manifest.json").read_text())["stages"]["mobile"]
    rows = []
    for entry in report["runtimes"]:
        rows.append({"model": f"student ({mobile['metrics']['source']})", "runtime": entry["runtime"],
                     "kind": entry["kind"], "artifact": entry["artifact"], "p50_ms": entry["p50_ms"],
                     "size_bytes": entry["size_bytes"], "quality": entry["accuracy"], "quality_kind": "test accuracy",
                     "gate": entry["gate"]})
    info = {"wall_s": round(time.time() - started, 1), "deployed": report["deployed"]["artifact"],
            "mobile_stage_s": mobile.get("wall_s"), "environment": report["environment"].get("description"),
            "teacher_accuracy": next(r["accuracy"] for r in report["artifacts"] if r["name"] == "teacher")}
    return rows, info


def smooth_images(count: int, seed: int) -> np.ndarray:
    """Low-frequency random images (8x8 noise upsampled to 224x224), ImageNet-normalized range: an untrained
    network predicts more than one class on them, unlike white noise."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, 8, 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(224, 224), mode="bilinear", align_corners=False).numpy()


def six_artifacts(model_label: str, stem: str, model: Any, calibration: np.ndarray, eval_inputs: np.ndarray,
                  eval_labels: np.ndarray, quality_kind: str, gate_inputs: np.ndarray, gate_labels: np.ndarray,
                  work: Path, iterations: int, agreement_with: np.ndarray | None = None,
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """ONNX (export stage's exporter) + ORT int8 (quantize stage's default recipe for this CPU) + LiteRT and
    ExecuTorch fp32/int8 (mobile stage's modules), all calibrated on `calibration`; quality on the eval
    images, the int8 gate against each runtime's own fp32 on the gate images, timing in one interleaved loop."""
    import functools

    import torch

    from edgekd.gate.accuracy import int8_verdict
    from edgekd.runtime.evaluate import predict_logits
    from edgekd.runtime.timing import interleaved_benchmark
    from edgekd.stages.export.exporter import export_onnx
    from edgekd.stages.mobile import executorch_export, litert
    from edgekd.stages.mobile.sessions import open_artifact
    from edgekd.stages.quantize import quantization as qz

    example = torch.from_numpy(np.ascontiguousarray(eval_inputs[:1]))
    files: dict[tuple[str, str], Path] = {}
    export_s: dict[str, Any] = {}

    def timed(key: str, fn: Any) -> None:
        start = time.time()
        fn()
        export_s[key] = round(time.time() - start, 1)

    onnx_fp32, pre, onnx_int8 = work / f"{stem}.onnx", work / f"{stem}.pre.onnx", work / f"{stem}.int8.onnx"
    timed("onnx fp32", lambda: export_onnx(model, example, onnx_fp32, opset=17, dynamic_batch=True, name=stem))

    def ort_int8() -> None:
        qz.preprocess(onnx_fp32, pre)
        act, reduce, _ = qz.choose_for_cpu("auto", "auto", "int8", qz.cpu_features())
        qz.quantize_model(pre, onnx_int8, qz.QuantSettings(activation_type=act, reduce_range=reduce),
                          qz.ArrayCalibrationReader(calibration, batch_size=8))

    timed("onnx int8", ort_int8)
    files[("onnxruntime", "fp32")], files[("onnxruntime", "int8")] = onnx_fp32, onnx_int8
    for runtime, module, suffix in (("litert", litert, ".tflite"), ("executorch", executorch_export, ".pte")):
        fp32, int8 = work / f"{stem}{suffix}", work / f"{stem}.int8{suffix}"
        timed(f"{runtime} fp32", lambda: module.export_fp32(model, example, fp32))
        files[(runtime, "fp32")] = fp32
        try:
            timed(f"{runtime} int8", lambda: module.export_int8(model, example, calibration, int8))
            files[(runtime, "int8")] = int8
        except Exception as exc:  # noqa: BLE001 - reported in the table, not fatal
            export_s[f"{runtime} int8"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    predictions = {key: predict_logits(open_artifact(path), eval_inputs).argmax(1) for key, path in files.items()}
    gate_predictions = {key: predict_logits(open_artifact(path), gate_inputs).argmax(1) for key, path in files.items()}
    labels = {f"{r}-{k}": path for (r, k), path in files.items()}
    opener = functools.partial(open_artifact, stop_spinning_after_run=True)
    timings = interleaved_benchmark(labels, {1: np.ascontiguousarray(eval_inputs[:1])}, [1], warmup=10,
                                    iterations=iterations, chunk=10, session_factory=opener)
    rows = []
    for (runtime, kind), path in files.items():
        gate = "passed"
        if kind == "int8":
            verdict = int8_verdict(gate_predictions[(runtime, kind)], gate_predictions[(runtime, "fp32")], gate_labels,
                                   MAX_DROP, f"{runtime} {stem}", fallback=True)
            gate = "passed" if verdict.deployable else verdict.reason
        (timing,) = timings[f"{runtime}-{kind}"]
        mine = predictions[(runtime, kind)]
        rows.append({"model": model_label, "runtime": runtime, "kind": kind, "artifact": path.name,
                     "p50_ms": timing["p50"], "p90_ms": timing["p90"], "size_bytes": path.stat().st_size,
                     "quality": float(np.mean(mine == eval_labels)), "quality_kind": quality_kind,
                     "agreement_teacher": None if agreement_with is None else float(np.mean(mine == agreement_with)),
                     "classes_predicted": int(len(np.unique(mine))), "gate": gate})
    return rows, {"export_s": export_s}


def mobilenet_rows(work: Path, images: int, iterations: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None)
    # No training, but BatchNorm statistics estimated on 64 other images (cumulative average): with its initial
    # running stats (0, 1) the untrained network predicts one class for every input, which makes agreement
    # (and the collapse check) meaningless.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    stats = torch.from_numpy(smooth_images(64, 3).astype(np.float32))
    model.train()
    with torch.no_grad():
        for start in range(0, len(stats), 16):
            model(stats[start:start + 16])
    model.eval()
    calibration, test = smooth_images(32, 1).astype(np.float32), smooth_images(images, 2).astype(np.float32)
    with torch.inference_mode():
        reference = np.concatenate([model(torch.from_numpy(test[i:i + 16])).argmax(1).numpy()
                                    for i in range(0, len(test), 16)])
    rows, info = six_artifacts("mobilenet_v2 (224², untrained)", "mnv2", model, calibration, test, reference,
                               "agreement with torch fp32", test, reference, work, iterations)
    return rows, {**info, "images": images, "reference_classes": int(len(np.unique(reference)))}


def student_from_run(run_dir: Path, config: Path, work: Path, iterations: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The pruned student of a finished `edgekd run CONFIG`: test accuracy on its eval.npz (1,000 test images),
    the int8 gate on its val.npz, calibrated on the quantize stage's calibration images (same seed, samples)."""
    from edgekd.config import load_config
    from edgekd.data.bundle import load_data
    from edgekd.models import load_model
    from edgekd.runtime.evaluate import load_eval_npz
    from edgekd.stages.quantize.stage import calibration_inputs

    cfg = load_config(config)
    data = load_data(cfg.data, seed=cfg.seed)
    calibration = calibration_inputs(data, cfg.quantize.calibration.samples, cfg.seed)
    test, val = load_eval_npz(run_dir / "eval.npz"), load_eval_npz(run_dir / "val.npz")
    shape = test.inputs.shape
    model = load_model(run_dir / "pruned.pt", num_classes=len(data.meta.labels), in_channels=shape[1],
                       input_size=shape[2]).eval()
    rows, info = six_artifacts("student (pruned, default pipeline)", "pruned", model, calibration, test.inputs,
                               test.labels, "test accuracy", val.inputs, val.labels, work, iterations,
                               agreement_with=test.teacher_predictions)
    return rows, {**info, "run": str(run_dir), "calibration_samples": len(calibration)}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | runtime | precision | p50 ms | size | accuracy / agreement | gate |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        size = f"{row['size_bytes'] / 2**20:.2f} MiB" if row["size_bytes"] > 2**20 else f"{row['size_bytes'] / 1024:.1f} KiB"
        p50 = "–" if row["p50_ms"] is None else f"{row['p50_ms']:.3f}"
        gate = row["gate"] if row["gate"] in (None, "passed") else f"**refused**: {row['gate']}"
        lines.append(f"| {row['model']} | {row['runtime']} | {row['kind']} | {p50} | {size} | {row['quality']:.4f} | "
                     f"{gate or 'passed'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "pipeline.yaml")
    parser.add_argument("--keep", type=Path, help="keep the run and the mobilenet files here")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", choices=("student", "mobilenet_v2"), help="measure one of the two models")
    parser.add_argument("--student-run", type=Path, help="a finished `edgekd run CONFIG` directory: take its pruned "
                        "student instead of running the pipeline (the files are made here the way the stages make them)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgekd-mobile-") as temp:
        work = args.keep or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        student, student_info = [], {}
        if args.only != "mobilenet_v2":
            student, student_info = (student_from_run(args.student_run, args.config, work, args.iterations)
                                     if args.student_run else student_rows(args.config.resolve(), work))
        mnv2, mnv2_info = mobilenet_rows(work, args.images, args.iterations) if args.only != "student" else ([], {})
    rows = student + mnv2
    print(f"started {started}; student run {student_info}; mobilenet_v2 {mnv2_info}")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"started": started, "student": student_info, "mobilenet_v2": mnv2_info,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
