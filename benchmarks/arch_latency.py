"""Latency and size of candidate architectures (no training): fp32 and int8 ONNX, side by side with a teacher.

    python benchmarks/arch_latency.py [--teacher '32,64,128x2'] [--students '16,32,64x1' '12,24,48x1' ...]
                                      [--size 28] [--channels 1] [--rounds 5] [--iterations 200] [--json OUT]

Every model is an EdgeCNN from `edgekd.models.cnn` ("W1,W2,W3xB" = widths, blocks per stage; a trailing "s"
= depthwise-separable, a trailing "/2" = stride-2 first convolution). Untrained weights are fine here: latency and file size do not depend on the values.
Each model is exported the way the export stage does it (TorchScript exporter, opset 17, dynamic batch),
pre-processed and quantized with the quantize stage's default recipe for this CPU (static QDQ, per-channel,
u8 activations / s8 weights, reduce_range from the CPU flags, minmax on 128 random inputs), then every
fp32 and int8 model is timed in one interleaved_benchmark call (batch 1, 1 thread), repeated `--rounds`
times; the table shows the median p50 over rounds and p50 ratios vs the teacher per round (median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekd.stages.quantize import quantization as qz
from edgekd.models.cnn import EdgeCNN
from edgekd.stages.export.exporter import count_macs, export_onnx
from edgekd.runtime.timing import interleaved_benchmark


def parse_arch(text: str) -> dict[str, Any]:
    """'W1,W2,W3xB' [+ 's' for separable] [+ '/2' for a stride-2 first convolution] -> EdgeCNN kwargs."""
    body, _, stem = text.partition("/")
    separable = body.endswith("s")
    body = body[:-1] if separable else body
    widths, _, blocks = body.partition("x")
    spec = {"widths": [int(w) for w in widths.split(",")], "blocks": int(blocks or 1), "separable": separable}
    if stem:
        spec["stem_stride"] = int(stem)
    return spec


def build(spec: dict[str, Any], channels: int, size: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return EdgeCNN(classes, in_channels=channels, input_size=size, **spec).eval()


def prepare(name: str, model: torch.nn.Module, folder: Path, calib: np.ndarray, example: torch.Tensor,
            float_first: bool = False) -> dict[str, Any]:
    fp32 = folder / f"{name}.onnx"
    export_onnx(model, example, fp32, opset=17, dynamic_batch=True, name=name)
    pre, int8 = folder / f"{name}.pre.onnx", folder / f"{name}.int8.onnx"
    qz.preprocess(fp32, pre)
    act, reduce, _ = qz.choose_for_cpu("auto", "auto", "int8", qz.cpu_features())
    first = [n.name for n in qz.graph_nodes(pre) if n.op_type == "Conv"][:1] if float_first else []
    settings = qz.QuantSettings(activation_type=act, reduce_range=reduce, exclude_nodes=tuple(first))
    qz.quantize_model(pre, int8, settings, qz.ArrayCalibrationReader(calib))
    macs, params = count_macs(model, example)
    return {"fp32": fp32, "int8": int8, "macs": macs, "params": params,
            "fp32_bytes": fp32.stat().st_size, "int8_bytes": int8.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="32,64,128x2")
    parser.add_argument("--students", nargs="*", default=["8,16,32x1", "12,24,48x1", "16,32,64x1", "16,32,64x2",
                                                          "24,48,96x1", "32,64,128x1", "16,32,64x1s"])
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--float-first", action="store_true",
                        help="keep each student's first conv in float (1-channel input: int8 GEMM with K=9 is slow)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    calib = rng.standard_normal((128, args.channels, args.size, args.size)).astype(np.float32)
    x = calib[:1].copy()
    example = torch.from_numpy(calib[:2])
    specs = {"teacher": args.teacher, **{s: s for s in args.students}}
    with tempfile.TemporaryDirectory(prefix="edgekd-arch-") as work:
        folder = Path(work)
        models = {}
        for index, (label, text) in enumerate(specs.items()):
            models[label] = prepare(f"m{index}", build(parse_arch(text), args.channels, args.size, args.classes),
                                    folder, calib, example, float_first=args.float_first and label != "teacher")
        files = {f"{label}|{kind}": info[kind] for label, info in models.items() for kind in ("fp32", "int8")}
        p50: dict[str, list[float]] = {key: [] for key in files}
        ratio: dict[str, list[float]] = {key: [] for key in files}
        for _ in range(args.rounds):
            rows = interleaved_benchmark(files, {1: x}, [args.threads], warmup=20, iterations=args.iterations)
            base = rows["teacher|fp32"][0]["p50"]
            for key, r in rows.items():
                p50[key].append(r[0]["p50"])
                ratio[key].append(base / r[0]["p50"])
    result = []
    teacher = models["teacher"]
    print(f"batch 1, {args.threads} thread(s), input {args.channels}x{args.size}x{args.size}, "
          f"{args.rounds} rounds x {args.iterations} runs (medians)")
    print(f"{'arch':14} {'params':>8} {'MACs':>11} {'fp32 KB':>8} {'int8 KB':>8} {'fp32 p50':>9} {'int8 p50':>9} "
          f"{'int8/fp32':>9} {'T/fp32':>7} {'T/int8':>7} {'T size/int8':>11}")
    for label, info in models.items():
        f, q = statistics.median(p50[f"{label}|fp32"]), statistics.median(p50[f"{label}|int8"])
        row = {"arch": specs[label], "role": "teacher" if label == "teacher" else "student",
               "params": info["params"], "macs": info["macs"], "fp32_bytes": info["fp32_bytes"],
               "int8_bytes": info["int8_bytes"], "p50_fp32_ms": f, "p50_int8_ms": q,
               "int8_speedup_vs_fp32": f / q,
               "teacher_over_fp32": statistics.median(ratio[f"{label}|fp32"]),
               "teacher_over_int8": statistics.median(ratio[f"{label}|int8"]),
               "teacher_size_over_int8": teacher["fp32_bytes"] / info["int8_bytes"]}
        result.append(row)
        print(f"{specs[label]:14} {row['params']:8,} {row['macs']:11,} {row['fp32_bytes'] / 1024:8.1f} "
              f"{row['int8_bytes'] / 1024:8.1f} {f:9.3f} {q:9.3f} {f / q:9.2f} {row['teacher_over_fp32']:7.2f} "
              f"{row['teacher_over_int8']:7.2f} {row['teacher_size_over_int8']:11.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
