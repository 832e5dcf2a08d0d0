"""Student frontier on the default pipeline's data and teacher: width/depth vs accuracy, latency and size.

    python benchmarks/student_frontier.py --run RUN_DIR [--config pipeline.yaml]
        [--students 16,32,64x1 24,48,96x1 32,64,128x1 16,32,64x2] [--no-baseline] [--seeds 0] [--json OUT]

RUN_DIR is a finished run of CONFIG (e.g. `benchmarks/showcase.py --keep DIR` leaves DIR/run): its trained
teacher.pt and teacher.onnx are reused. Every student ("W1,W2,W3xB" = EdgeCNN widths and blocks per stage)
is trained exactly as the distill stage trains it (CONFIG's distill section: KD with cached teacher logits,
and the same schedule without KD when the baseline is on), then exported and quantized with the quantize
stage's default recipe for this CPU (static QDQ, per-channel, minmax on CONFIG's calibration sample of
TRAINING images). Test top-1 of fp32 and int8 come from ONNX Runtime on the run's eval.npz; latencies are
p50 at batch 1, 1 thread, every model interleaved with the teacher in one `interleaved_benchmark` call per
round (median over rounds). No pruning here: it shows what each student width buys before pruning.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from arch_latency import parse_arch  # noqa: E402

from edgekd.stages.quantize import quantization as qz  # noqa: E402
from edgekd.config import load_config  # noqa: E402
from edgekd.data.bundle import load_data  # noqa: E402
from edgekd.train.objectives import CrossEntropyObjective, make_kd_objective  # noqa: E402
from edgekd.models import create_model, load_model  # noqa: E402
from edgekd.stages.export.exporter import count_macs, export_onnx  # noqa: E402
from edgekd.runtime.timing import interleaved_benchmark  # noqa: E402
from edgekd.stages.quantize.stage import calibration_inputs  # noqa: E402
from edgekd.train.loop import fit, resolve_device  # noqa: E402


def top1(path: Path, inputs: np.ndarray) -> np.ndarray:
    return qz.predictions(path, inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory of --config")
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "pipeline.yaml")
    parser.add_argument("--students", nargs="+", default=["16,32,64x1", "24,48,96x1", "32,64,128x1", "16,32,64x2"])
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    device = resolve_device("cpu")
    data = load_data(cfg.data, seed=cfg.seed)
    meta = data.meta
    shape = dict(num_classes=meta.num_classes, in_channels=meta.channels, input_size=meta.height)
    teacher = load_model(args.run / "teacher.pt", **shape).eval()
    evaluation = np.load(args.run / "eval.npz")
    test_x, test_y = evaluation["inputs"], evaluation["labels"]
    teacher_onnx = args.run / "teacher.onnx"
    teacher_acc = float(np.mean(top1(teacher_onnx, test_x) == test_y))
    calib = calibration_inputs(data, cfg.quantize.calibration.samples, cfg.seed)
    act, reduce, _ = qz.choose_for_cpu("auto", "auto", "int8", qz.cpu_features())
    recipe = qz.QuantSettings(activation_type=act, reduce_range=reduce)
    example = torch.from_numpy(test_x[:2])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgekd-frontier-") as work:
        folder = Path(work)
        files: dict[str, Path] = {"teacher": teacher_onnx}
        for text in args.students:
            kwargs = parse_arch(text)
            for seed in args.seeds:
                row: dict[str, Any] = {"arch": text, "seed": seed}
                modes = ["kd"] + ([] if args.no_baseline else ["baseline"])
                for mode in modes:
                    torch.manual_seed(seed)
                    student = create_model("cnn", kwargs=kwargs, **shape)
                    objective = (make_kd_objective(cfg.distill.kd(), teacher, data, device, augment=cfg.distill.augment) if mode == "kd"
                                 else CrossEntropyObjective(cfg.distill.label_smoothing))
                    started = time.perf_counter()
                    fit(student, data, cfg.distill, device=device, seed=seed, objective=objective,
                        batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size, log=lambda _: None)
                    row[f"{mode}_train_s"] = round(time.perf_counter() - started, 1)
                    if mode != "kd":
                        fp32 = folder / f"{text}-{seed}-{mode}.onnx"
                        export_onnx(student.eval().cpu(), example, fp32, opset=cfg.export.opset)
                        row[f"{mode}_test"] = float(np.mean(top1(fp32, test_x) == test_y))
                        continue
                    key = f"{text}|{seed}"
                    fp32, pre, int8 = (folder / f"{key}.onnx", folder / f"{key}.pre.onnx", folder / f"{key}.int8.onnx")
                    export_onnx(student.eval().cpu(), example, fp32, opset=cfg.export.opset)
                    qz.preprocess(fp32, pre)
                    qz.quantize_model(pre, int8, recipe, qz.ArrayCalibrationReader(calib))
                    pred_fp32, pred_int8 = top1(fp32, test_x), top1(int8, test_x)
                    macs, params = count_macs(student.eval().cpu(), example[:1])
                    row.update(params=params, macs=macs, fp32_bytes=fp32.stat().st_size, int8_bytes=int8.stat().st_size,
                               kd_test=float(np.mean(pred_fp32 == test_y)), int8_test=float(np.mean(pred_int8 == test_y)),
                               int8_agreement=float(np.mean(pred_int8 == pred_fp32)))
                    files[f"{key}|fp32"], files[f"{key}|int8"] = fp32, int8
                rows.append(row)
                print(json.dumps(row), flush=True)
        x = np.ascontiguousarray(test_x[:1])
        p50: dict[str, list[float]] = {name: [] for name in files}
        for _ in range(args.rounds):
            timing = interleaved_benchmark(files, {1: x}, [1], warmup=20, iterations=200)
            for name, result in timing.items():
                p50[name].append(result[0]["p50"])
    teacher_p50 = statistics.median(p50["teacher"])
    teacher_bytes = teacher_onnx.stat().st_size
    for row in rows:
        key = f"{row['arch']}|{row['seed']}"
        row["p50_fp32_ms"] = statistics.median(p50[f"{key}|fp32"])
        row["p50_int8_ms"] = statistics.median(p50[f"{key}|int8"])
        row["int8_speedup_vs_fp32"] = row["p50_fp32_ms"] / row["p50_int8_ms"]
        row["teacher_over_int8_latency"] = teacher_p50 / row["p50_int8_ms"]
        row["teacher_over_int8_size"] = teacher_bytes / row["int8_bytes"]
    print(f"\nteacher {cfg.teacher.model} {cfg.teacher.model_kwargs}: test {teacher_acc:.4f}, {teacher_bytes / 1024:.0f} KiB, "
          f"p50 {teacher_p50:.3f} ms; distill: {cfg.distill.epochs} epochs, T={cfg.distill.temperature}, "
          f"alpha={cfg.distill.alpha}; load1 {os.getloadavg()[0]:.2f}")
    print(f"{'student':12} {'seed':>4} {'params':>7} {'MMACs':>6} {'KD test':>7} {'base':>6} {'int8':>6} {'agree':>6} "
          f"{'int8 KiB':>8} {'fp32 ms':>8} {'int8 ms':>8} {'i8/fp32':>7} {'T/int8':>6} {'T size/i8':>9}")
    for r in rows:
        base = f"{r['baseline_test']:.4f}" if "baseline_test" in r else "-"
        print(f"{r['arch']:12} {r['seed']:4d} {r['params']:7,} {r['macs'] / 1e6:6.2f} {r['kd_test']:7.4f} {base:>6} "
              f"{r['int8_test']:6.4f} {r['int8_agreement']:6.3f} {r['int8_bytes'] / 1024:8.1f} {r['p50_fp32_ms']:8.3f} "
              f"{r['p50_int8_ms']:8.3f} {r['int8_speedup_vs_fp32']:7.2f} {r['teacher_over_int8_latency']:6.2f} "
              f"{r['teacher_over_int8_size']:9.1f}")
    if args.json:
        args.json.write_text(json.dumps({"teacher_test": teacher_acc, "teacher_p50_ms": teacher_p50,
                                         "teacher_bytes": teacher_bytes, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
