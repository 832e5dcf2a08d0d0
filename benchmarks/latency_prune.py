"""Latency-target pruning reaches its target: the default student and torchvision mobilenet_v2 (no training).

    python benchmarks/latency_prune.py [--models default mobilenet_v2] [--speedups 1.3 1.6] [--json OUT]

For each model and target speed-up: `round_to: auto` first (the model pruned at the target's first-guess ratio
with round_to 1/4/8/16, timed side by side, the most MACs per millisecond wins), then the latency-target search
of `edgekd.stages.prune.search.prune_to_latency` exactly as the prune stage runs it (each trial exported to ONNX
and timed interleaved with the unpruned model on ONNX Runtime, 1 thread, batch 1, median of 3 rounds). The
chosen copy is then timed again in 5 fresh interleaved rounds against the unpruned model: that re-measurement
is the number judged (within 10 % of the target). Untrained weights: latency depends on the graph only.

`default` is pipeline.yaml's student (cnn 32/64/128 x1, 1x28x28) timed in int8 (what the pipeline deploys;
a quick static int8 per trial); `mobilenet_v2` is torchvision's at 3x224x224, timed in fp32 (int8 calibration
of a 224x224 model per trial would take most of the time budget here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekd.models import create_model
from edgekd.stages.prune.latency import LatencyProbe, LatencySettings
from edgekd.stages.prune.pruning import PruneSettings, layer_channels, measure, resolve_ignored
from edgekd.stages.prune.search import pick_round_to, prune_to_latency, replace_round_to, round_to_candidates

MODELS = {
    "default": ("cnn", {"widths": [32, 64, 128], "blocks": 1}, (1, 28, 28), "int8"),
    "mobilenet_v2": ("torchvision:mobilenet_v2", {}, (3, 224, 224), "fp32"),
}


def run_one(name: str, speedup: float, folder: Path) -> dict[str, Any]:
    spec, kwargs, shape, precision = MODELS[name]
    torch.manual_seed(0)
    model = create_model(spec, num_classes=10 if name == "default" else 1000, in_channels=shape[0],
                         input_size=shape[1], kwargs=kwargs).eval()
    example = torch.zeros(1, *shape)
    calibration = np.random.default_rng(0).standard_normal((64, *shape)).astype(np.float32)
    probe = LatencyProbe(shape, LatencySettings(precision=precision, rounds=3), folder, calibration)
    reference = probe.onnx(model, name="reference")
    ignored = resolve_ignored(model, [])
    base_macs = measure(model, example)[0]
    started = time.perf_counter()

    ratio = min(max(1 - (1 / speedup) ** 0.5, 0.05), 0.9)
    copies = round_to_candidates(model, example, ratio, PruneSettings(), ignored)
    timed = probe.fractions({str(k): probe.onnx(m) for k, m in copies.items()}, reference)
    rounding = [{"round_to": k, "macs": measure(m, example)[0], "p50_ms": timed[str(k)]["p50_ms"],
                 "latency_fraction": timed[str(k)]["fraction"]} for k, m in copies.items()]
    for row in rounding:
        row["macs_per_ms"] = row["macs"] / row["p50_ms"]
    chosen_round = pick_round_to(rounding)
    settings = replace_round_to(PruneSettings(), chosen_round)

    goal = 1 / speedup

    def latency(pruned: torch.nn.Module) -> float:
        return probe.fractions({"trial": probe.onnx(pruned)}, reference)["trial"]["fraction"]

    step = prune_to_latency(model, example, goal, latency, settings, ignored, base_macs=base_macs,
                            label=f"{name} {speedup}x")
    search_s = time.perf_counter() - started
    final_path = probe.onnx(step.model, name="final")
    check = LatencyProbe(shape, LatencySettings(precision="fp32", rounds=7), folder)  # int8 files already made
    rounds = check.p50s({"reference": reference, "pruned": final_path})
    fraction = statistics.median(r["pruned"] / r["reference"] for r in rounds)
    return {
        "model": name, "precision": precision, "target_speedup": speedup, "goal_fraction": round(goal, 4),
        "round_to": {"ratio": round(ratio, 4), "candidates": rounding, "chosen": chosen_round},
        "trials": step.trace, "search_s": round(search_s, 1),
        "channel_ratio": round(step.channel_ratio, 4), "macs_fraction": round(step.macs / base_macs, 4),
        "search_fraction": round(step.latency_fraction, 4), "final_fraction": round(fraction, 4),
        "final_speedup": round(1 / fraction, 3), "macs_speedup": round(base_macs / step.macs, 3),
        "reference_p50_ms": round(statistics.median(r["reference"] for r in rounds), 4),
        "pruned_p50_ms": round(statistics.median(r["pruned"] for r in rounds), 4),
        "within_10pct": abs(fraction - goal) <= 0.10 * goal,
        "channels": dict(list(layer_channels(step.model).items())[:4]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--speedups", nargs="+", type=float, default=[1.3, 1.6])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for name in args.models:
        for speedup in args.speedups:
            with tempfile.TemporaryDirectory(prefix="latency-prune-") as folder:
                result = run_one(name, speedup, Path(folder))
            results.append(result)
            r = result
            print(f"{name:13s} target {speedup:.2f}x ({r['precision']}): round_to {r['round_to']['chosen']}, "
                  f"{len(r['trials'])} trials, {r['search_s']:.0f} s; re-measured {r['final_speedup']:.2f}x "
                  f"({r['pruned_p50_ms']:.3f} vs {r['reference_p50_ms']:.3f} ms) from {r['macs_speedup']:.2f}x fewer "
                  f"MACs -> {'within' if r['within_10pct'] else 'NOT within'} 10 %", flush=True)
            for row in r["round_to"]["candidates"]:
                print(f"    round_to {row['round_to']:2d}: {row['macs']:,} MACs, p50 {row['p50_ms']:.3f} ms, "
                      f"{row['macs_per_ms'] / 1e6:.1f} MMACs/ms")
            for t in r["trials"]:
                print(f"    trial {t['trial']}: ratio {t['channel_ratio']:.3f}, MACs {t.get('macs_fraction', '-')}, "
                      f"latency {t.get('latency_fraction', t.get('error'))}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r["within_10pct"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
