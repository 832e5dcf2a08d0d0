"""Compute-bound view of the compression chain: teacher fp32 -> student -> pruned -> int8 on 32x32 and 224x224.

    python benchmarks/compute_bound.py [--sizes 32 224] [--keep DIR] [--json OUT.json]

MNIST-sized models run in well under a millisecond, where session overhead, not arithmetic, sets the
latency; their speed-ups say little about real edge models. This runs the same edgekd pipeline on synthetic
RGB images of CIFAR size (32x32) and ImageNet size (224x224) with a torchvision ResNet-18 teacher and a
MobileNetV2 student (the pair of benchmarks/pipelines/cifar10.yaml), and prints every artifact's p50 next to
its compute bound: 2 x MACs / peak SGEMM GFLOP/s measured on this machine (`edgekd.runtime.peak`), i.e. the
latency if every multiply-add ran at the CPU's best float32 matmul speed. `overhead_factor` = p50 / bound
(1 = compute-bound; 10 = ten times slower than the arithmetic requires).

Feasible on 2 CPU cores because no real training is needed for latency and size: the teacher is untrained
(teacher.train.epochs: 0), the student gets 1 distillation epoch on a few hundred synthetic images, pruning
gets no recovery epochs. Accuracy figures of these runs are meaningless and are not printed; latency, MACs,
parameters and file sizes do not depend on how well the weights are trained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

SCENARIOS: dict[int, dict[str, Any]] = {
    32: {"num_samples": 600, "iterations": 100, "parity": [1, 7], "calibration": 128},
    224: {"num_samples": 240, "iterations": 30, "parity": [1, 4], "calibration": 32},
}


def config_for(size: int, out: Path) -> dict[str, Any]:
    s = SCENARIOS[size]
    return {
        "name": f"compute-bound-{size}", "seed": 0, "device": "cpu", "output_dir": str(out),
        "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64, "val_fraction": 0.1,
                 "test_fraction": 0.1,
                 "synthetic": {"num_samples": s["num_samples"], "num_classes": 10, "image_size": size,
                               "channels": 3, "noise": 0.5}},
        "teacher": {"model": "torchvision:resnet18", "train": {"epochs": 0}},
        "student": {"model": "torchvision:mobilenet_v2"},
        "distill": {"epochs": 1, "augment": False, "baseline": False, "channels_last": True},
        "prune": {"importance": "l2", "ratio": 0.3, "round_to": 8, "finetune": {"epochs": 0}},
        "export": {"opset": 17, "parity_atol": 1e-3, "parity_batch_sizes": s["parity"], "ort_format": False},
        "quantize": {"mode": "static", "per_channel": True, "search": False, "max_accuracy_drop": 1.0,
                     "calibration": {"method": "minmax", "samples": s["calibration"]}},
        "benchmark": {"threads": [1, 2], "batch_sizes": [1], "warmup": 5, "iterations": s["iterations"],
                      "torch_reference": False},
        "budgets": {"latency_threads": 1, "latency_batch": 1},
        "report": {"plots": False, "html": False},
    }


def latency(row: dict[str, Any], threads: int) -> dict[str, Any]:
    return next((e for e in row["latency_ms"] if e["threads"] == threads and e["batch"] == 1), {})


def run(size: int, work: Path) -> dict[str, Any]:
    import yaml

    run_dir = work / f"run{size}"
    config = work / f"compute_bound_{size}.yaml"
    config.write_text(yaml.safe_dump(config_for(size, run_dir), sort_keys=False))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgekd", "run", str(config)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    (work / f"run{size}.log").write_text(proc.stdout)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{size}x{size} pipeline failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    report = json.loads((run_dir / "report.json").read_text())
    env = report.get("environment") or {}
    rows = []
    teacher = next(r for r in report["artifacts"] if r["name"] == "teacher")
    for row in report["artifacts"]:
        one, two = latency(row, 1), latency(row, 2)
        rows.append({
            "name": row["name"], "kind": row["kind"], "params": row.get("params"), "macs": row.get("macs"),
            "size_bytes": row["size_bytes"], "p50_1t_ms": one.get("p50"), "p50_2t_ms": two.get("p50"),
            "compute_bound_1t_ms": one.get("compute_bound_ms"), "overhead_factor_1t": one.get("overhead_factor"),
            "compute_bound_2t_ms": two.get("compute_bound_ms"), "overhead_factor_2t": two.get("overhead_factor"),
            "speedup_vs_teacher_1t": (latency(teacher, 1).get("p50") or 0) / one["p50"] if one.get("p50") else None,
            "size_ratio_vs_teacher": teacher["size_bytes"] / row["size_bytes"],
        })
    quant = report.get("quantization") or {}
    return {"size": size, "wall_s": round(wall, 1), "peak_gflops": env.get("peak_gflops"),
            "peak_gflops_measured": env.get("peak_gflops_measured"), "rows": rows,
            "deployed": report["deployed"]["artifact"], "int8_recipe": (quant.get("chosen") or {}).get("label"),
            "load1_after": round(os.getloadavg()[0], 2)}


def print_scenario(result: dict[str, Any]) -> None:
    size = result["size"]
    print(f"\n{size}x{size}x3, batch 1: peak SGEMM {result['peak_gflops']} GFLOP/s (by threads); "
          f"pipeline {result['wall_s']} s; deployed: {result['deployed']}")
    print(f"{'artifact':18} {'kind':5} {'params':>11} {'MMACs':>9} {'size KiB':>9} {'p50 1t ms':>10} {'bound ms':>9} "
          f"{'x bound':>8} {'p50 2t ms':>10} {'x bound':>8} {'vs teacher':>10}")
    for r in result["rows"]:
        def fmt(value: Any, spec: str) -> str:
            return format(value, spec) if isinstance(value, (int, float)) else "-"
        print(f"{r['name']:18} {r['kind']:5} {fmt(r['params'], ',d'):>11} {fmt((r['macs'] or 0) / 1e6, '.1f'):>9} "
              f"{r['size_bytes'] / 1024:9.1f} {fmt(r['p50_1t_ms'], '.3f'):>10} {fmt(r['compute_bound_1t_ms'], '.3f'):>9} "
              f"{fmt(r['overhead_factor_1t'], '.2f'):>8} {fmt(r['p50_2t_ms'], '.3f'):>10} "
              f"{fmt(r['overhead_factor_2t'], '.2f'):>8} {fmt(r['speedup_vs_teacher_1t'], '.2f'):>10}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], choices=sorted(SCENARIOS))
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="edgekd-compute-bound-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"compute-bound chain on synthetic images; load1 {os.getloadavg()[0]:.2f}; work dir {work}")
    results = []
    try:
        for size in args.sizes:
            results.append(run(size, work))
            print_scenario(results[-1])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
