"""`quantize.mixed_precision: auto` on a finished run's model, with limits that all-int8 breaks.

    python benchmarks/mixed_precision.py --run RUN_DIR [--max-accuracy-drop 0.0] [--min-agreement 0.998]
        [--outlier-channel teacher:A:B] [--json OUT.json]

Without --outlier-channel the model is the run's pruned student. With it, the run's MODEL (e.g. teacher) gets
one activation channel between convolutions A and B scaled by --outlier-scale, a function-preserving change
(A's output channel times k, B's input channel divided by k; the Relu/MaxPool between are positively
homogeneous): the float model's outputs are unchanged, but the shared uint8 scale of that activation now spends
its range on one channel, as real networks' outlier channels do, and all-int8 loses accuracy.

Runs the quantize stage's own search (edgekd.stages.quantize.stage._mixed_precision: per-layer weight range,
per-node sensitivity on the validation split, time gains from the per-op profile, measured candidate graphs)
from the stage's default all-int8 recipe, then times fp32, all-int8 and the chosen mix side by side (batch 1,
1 thread, interleaved) and scores all three on the validation and test splits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from compare_ptq import edgekd_settings, student_inputs  # noqa: E402

from edgekd.runtime.evaluate import load_eval_npz  # noqa: E402
from edgekd.runtime.timing import interleaved_benchmark  # noqa: E402
from edgekd.stages.quantize import mixed as mp  # noqa: E402
from edgekd.stages.quantize import quantization as qz  # noqa: E402
from edgekd.stages.quantize.config import QuantizeConfig  # noqa: E402
from edgekd.stages.quantize.stage import _mixed_precision  # noqa: E402


def scores(path: Path, fp32: Path, split) -> dict[str, float]:
    logits, reference = mp.logits_of(path, split.inputs), mp.logits_of(fp32, split.inputs)
    predicted = logits.argmax(-1)
    return {"accuracy": float(np.mean(predicted == split.labels)),
            "agreement": float(np.mean(predicted == reference.argmax(-1))),
            "logit_error": float(np.mean(np.abs(logits - reference)))}


def with_outlier_channel(source: Path, target: Path, first: str, second: str, scale: float,
                         channel: int = 0) -> Path:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}

    def update(name: str, change) -> None:
        array = numpy_helper.to_array(inits[name]).copy()
        change(array)
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    a, b = nodes[first], nodes[second]
    update(a.input[1], lambda w: w.__setitem__(channel, w[channel] * scale))
    if len(a.input) > 2:
        update(a.input[2], lambda bias: bias.__setitem__(channel, bias[channel] * scale))
    update(b.input[1], lambda w: w.__setitem__((slice(None), channel), w[:, channel] / scale))
    onnx.save(model, str(target))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--max-accuracy-drop", type=float, default=0.0)
    parser.add_argument("--min-agreement", type=float, default=0.998)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--outlier-channel", metavar="MODEL:CONV_A:CONV_B")
    parser.add_argument("--outlier-scale", type=float, default=100.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    fp32, calib, _, _, _ = student_inputs(args.run)
    scratch = Path(tempfile.mkdtemp(prefix="edgekd-mixed-model-"))
    if args.outlier_channel:
        model, first, second = args.outlier_channel.split(":")
        fp32 = with_outlier_channel(args.run / f"{model}.onnx", scratch / f"{model}.outlier.onnx", first, second,
                                    args.outlier_scale)
        original = mp.logits_of(args.run / f"{model}.onnx", load_eval_npz(args.run / "val.npz").inputs)
        print(f"{model} with channel 0 between {first} and {second} x{args.outlier_scale:g}: max |logit change| "
              f"{np.abs(mp.logits_of(fp32, load_eval_npz(args.run / 'val.npz').inputs) - original).max():.2e}")
    val, test = load_eval_npz(args.run / "val.npz"), load_eval_npz(args.run / "eval.npz")
    q = QuantizeConfig(mixed_precision="auto", max_accuracy_drop=args.max_accuracy_drop,
                       min_agreement=args.min_agreement, mixed_precision_steps=args.steps)
    with tempfile.TemporaryDirectory(prefix="edgekd-mixed-") as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        qz.preprocess(fp32, pre)
        reader, cache = qz.ArrayCalibrationReader(calib), qz.CalibrationCache(work)
        base = edgekd_settings()
        all_int8 = work / "all_int8.onnx"
        qz.quantize_model(pre, all_int8, base, reader, cache)
        mixed = _mixed_precision(q, base, fp32, pre, work, reader, cache, val)
        chosen = work / "mixed.onnx"
        qz.quantize_model(pre, chosen, mixed["settings"], reader, cache)
        models = {"fp32": fp32, "all int8": all_int8, "mixed (auto)": chosen}
        timing = interleaved_benchmark(models, {1: val.inputs[:1]}, [1], warmup=20, iterations=args.iterations,
                                       chunk=10)
        rows = []
        for label, path in models.items():
            rows.append({"model": label, "p50_ms": timing[label][0]["p50"],
                         "speedup_vs_fp32": timing["fp32"][0]["p50"] / timing[label][0]["p50"],
                         "val": scores(path, fp32, val), "test": scores(path, fp32, test)})
    metrics = mixed["metrics"]
    print(f"limits: val accuracy drop <= {args.max_accuracy_drop}, val agreement >= {args.min_agreement}")
    print("| model | val acc | val agreement | val logit err | test acc | test agreement | p50 ms | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['val']['accuracy']:.4f} | {r['val']['agreement']:.4f} | "
              f"{r['val']['logit_error']:.4f} | {r['test']['accuracy']:.4f} | {r['test']['agreement']:.4f} | "
              f"{r['p50_ms']:.4f} | {r['speedup_vs_fp32']:.2f}x |")
    print(f"met: {metrics['met']}; search {metrics['search_s']:.1f} s, {metrics['candidates_quantized']} candidate "
          f"graphs, {len(metrics['steps'])} measured steps")
    for kept in metrics["kept_fp32"]:
        print(f"kept fp32: {kept['node']} ({kept['why']}; logit error recovered {kept.get('error_recovered')}, "
              f"gain {kept.get('gain_us')} us)")
    print("8-bit weights:", [r["node"] for r in metrics["weight_ranges"] if r["eight_bit"]])
    for step in metrics["steps"]:
        print(f"  step {step['step']}: {step['what']}: drop {step['accuracy_drop']:+.4f} agreement "
              f"{step['agreement']:.4f} x{step['speedup']:.2f} meets={step['meets']}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "mixed_precision": metrics}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
