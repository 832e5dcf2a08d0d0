"""edgekd's int8 vs the post-training quantization users would pick instead, side by side on this CPU.

    python benchmarks/compare_ptq.py --run RUN_DIR [--models student resnet18 mobilenet_v2] [--json OUT.json]

RUN_DIR is a finished default run (`edgekd run pipeline.yaml --set output_dir=RUN_DIR`): its pruned student
(pruned.onnx), test split (eval.npz) and training images (calibration) are used. resnet18 and mobilenet_v2 are
untrained torchvision models at 224x224, calibrated on structured random images (smooth noise, ImageNet
normalization); without labels they report top-1 agreement with their own fp32 model instead of accuracy.

Per model, timed interleaved in one run (batch 1, 1 thread, edgekd.runtime.timing): fp32; edgekd's int8 (the
quantize stage's default recipe: ORT pre-processing, QDQ, uint8 activations, int8 per-channel weights, 7-bit
weights on x86 without VNNI, MinMax on training images, fast bias correction); ORT's `quantize_static` with its defaults (QDQ, int8
activations and weights, per-tensor, MinMax) on the pre-processed model, as ORT's docs advise; NNCF when it is
installed (it is not in this environment: reported as skipped). For the student, also the ingredients peer
tools apply by default (per-tensor weights, percentile and entropy ranges, 8-bit weights everywhere), to keep
only what measurably helps, and edgekd's recipe without its fast bias correction. `int8/fp32` is the p50 speed-up; the physical limit here is ~2x (AVX2's u8 x s8
multiply-add without VNNI does about twice fp32's MACs per cycle).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgekd.runtime.timing import interleaved_benchmark  # noqa: E402
from edgekd.stages.quantize import mixed as mp  # noqa: E402
from edgekd.stages.quantize import quantization as qz  # noqa: E402

PHYSICAL_LIMIT = 2.0
ITERATIONS = {"student": 200, "resnet18": 30, "mobilenet_v2": 60}


def edgekd_settings(**changes: Any) -> qz.QuantSettings:
    """The quantize stage's default recipe on this CPU (quantize.* defaults, 'auto' resolved from the flags)."""
    act, reduce, _ = qz.choose_for_cpu("auto", "auto", "int8", qz.cpu_features())
    return replace(qz.QuantSettings(reduce_range=reduce, activation_type=act, bias_correction=True), **changes)


def quantize_edgekd(pre: Path, out: Path, calib: np.ndarray, settings: qz.QuantSettings) -> Path:
    qz.quantize_model(pre, out, settings, qz.ArrayCalibrationReader(calib))
    return out


def quantize_ort_default(pre: Path, out: Path, calib: np.ndarray) -> Path:
    from onnxruntime.quantization import quantize_static

    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(pre), str(out), qz.ArrayCalibrationReader(calib))
    return out


def nncf_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("nncf") is not None


def structured_images(count: int, size: int, seed: int) -> np.ndarray:
    """Smooth random RGB images (8x8 noise upsampled, plus pixel noise), ImageNet-normalized."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (count, 3, 8, 8))
    images = np.kron(coarse, np.ones((size // 8, size // 8)))[:, :, :size, :size]
    images = np.clip(images + rng.normal(0, 0.05, images.shape), 0, 1)
    mean, std = np.array([0.485, 0.456, 0.406])[:, None, None], np.array([0.229, 0.224, 0.225])[:, None, None]
    return ((images - mean) / std).astype(np.float32)


def torchvision_model(name: str, folder: Path) -> Path:
    import torch
    import torchvision

    from edgekd.stages.export.exporter import export_onnx

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    return export_onnx(model, torch.randn(1, 3, 224, 224), folder / f"{name}.onnx", opset=17).path


def student_inputs(run: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """pruned.onnx (else student.onnx), 512 training images for calibration, the test split and its labels,
    the validation split (for choices: never the test split)."""
    from edgekd.config import load_config
    from edgekd.data.bundle import load_data
    from edgekd.runtime.evaluate import load_eval_npz
    from edgekd.stages.quantize.stage import calibration_inputs

    config = run / "resolved-config.yaml"
    cfg = load_config(config if config.exists() else run / "config.yaml")
    data = load_data(cfg.data, seed=cfg.seed)
    model = run / "pruned.onnx" if (run / "pruned.onnx").exists() else run / "student.onnx"
    test, val = load_eval_npz(run / "eval.npz"), load_eval_npz(run / "val.npz")
    return model, calibration_inputs(data, 512, cfg.seed), test.inputs, test.labels, (val.inputs, val.labels)


def measure(models: dict[str, Path], inputs: np.ndarray, labels: np.ndarray | None, iterations: int) -> list[dict]:
    reference = mp.logits_of(models["fp32"], inputs)
    rows = interleaved_benchmark(models, {1: inputs[:1]}, [1], warmup=10, iterations=iterations, chunk=5)
    fp32_p50 = rows["fp32"][0]["p50"]
    table = []
    for label, path in models.items():
        logits = mp.logits_of(path, inputs)
        predicted = logits.argmax(-1)
        table.append({
            "method": label, "p50_ms": rows[label][0]["p50"], "speedup_vs_fp32": fp32_p50 / rows[label][0]["p50"],
            "accuracy": None if labels is None else float(np.mean(predicted == labels)),
            "agreement": float(np.mean(predicted == reference.argmax(-1))),
            "logit_error": float(np.mean(np.abs(logits - reference))),
            # relative: untrained torchvision heads give tiny logits, so the absolute error says little
            "relative_logit_error": float(np.mean(np.abs(logits - reference)) / max(np.mean(np.abs(reference)), 1e-12)),
            "float_nodes": _float_weighted(path), "size_bytes": path.stat().st_size})
    return table


def _float_weighted(path: Path) -> int:
    """Conv/Gemm/MatMul nodes still running in float (no DequantizeLinear on their weight)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return sum(1 for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] not in dequantized)


def per_layer_weight_range(fp32: Path, pre: Path, folder: Path, calib: np.ndarray, val: tuple[np.ndarray, np.ndarray],
                           out: Path) -> tuple[Path, list[dict[str, Any]]]:
    """edgekd's recipe with the weight range (7- or 8-bit) chosen per layer on the validation split, as
    `quantize.mixed_precision: auto` does first."""
    work = folder / "weight-range"
    work.mkdir(exist_ok=True)
    measurer = mp.OrtMeasurer(fp32, pre, work, qz.ArrayCalibrationReader(calib), qz.CalibrationCache(work), *val)
    base = edgekd_settings()
    settings, rows = mp.choose_weight_ranges(base, mp.quantizable_nodes(pre), measurer,
                                             measurer.accuracy(base)["logit_error"])
    return quantize_edgekd(pre, out, calib, settings), rows


def compare(name: str, fp32: Path, calib: np.ndarray, inputs: np.ndarray, labels: np.ndarray | None,
            folder: Path, extras: bool, val: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    pre = folder / f"{name}.pre.onnx"
    qz.preprocess(fp32, pre)
    models = {"fp32": fp32}
    timings = {}
    start = time.perf_counter()
    models["edgekd int8"] = quantize_edgekd(pre, folder / f"{name}.edgekd.onnx", calib, edgekd_settings())
    timings["edgekd int8"] = time.perf_counter() - start
    start = time.perf_counter()
    models["ORT quantize_static defaults"] = quantize_ort_default(pre, folder / f"{name}.ort.onnx", calib)
    timings["ORT quantize_static defaults"] = time.perf_counter() - start
    if extras:  # the ingredients of peer tools' defaults, one at a time on edgekd's recipe
        for label, changes in (("edgekd without bias correction", {"bias_correction": False}),
                               ("edgekd, per-tensor weights", {"per_channel": False}),
                               ("edgekd, percentile 99.999", {"method": "percentile"}),
                               ("edgekd, entropy ranges", {"method": "entropy"}),
                               ("edgekd, 8-bit weights everywhere", {"reduce_range": False})):
            models[label] = quantize_edgekd(pre, folder / f"{name}.{len(models)}.onnx", calib,
                                            edgekd_settings(**changes))
    weight_rows = None
    if extras and val is not None:
        models["edgekd, per-layer weight range"], weight_rows = per_layer_weight_range(
            fp32, pre, folder, calib, val, folder / f"{name}.wr.onnx")
    rows = measure(models, inputs, labels, ITERATIONS[name])
    for row in rows:
        row["quantize_s"] = timings.get(row["method"])
    return {"model": name, "rows": rows, "calibration_samples": len(calib), "eval_samples": len(inputs),
            "weight_ranges": weight_rows,
            "nncf": "installed" if nncf_available() else "not installed (skipped)"}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | method | accuracy | agreement w/ fp32 | mean abs logit error | relative logit error | p50 ms | "
             "int8/fp32 | of the ~2x limit | weighted nodes in float |", "|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for row in result["rows"]:
            acc = "—" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
            limit = "—" if row["method"] == "fp32" else f"{row['speedup_vs_fp32'] / PHYSICAL_LIMIT:.0%}"
            lines.append(f"| {result['model']} | {row['method']} | {acc} | {row['agreement']:.4f} | "
                         f"{row['logit_error']:.4f} | {row['relative_logit_error']:.4f} | {row['p50_ms']:.3f} | {row['speedup_vs_fp32']:.2f}x | {limit} | "
                         f"{row['float_nodes']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished default run (for the pruned student)")
    parser.add_argument("--models", nargs="+", default=["student", "resnet18", "mobilenet_v2"],
                        choices=["student", "resnet18", "mobilenet_v2"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="edgekd-compare-ptq-") as tmp:
        folder = Path(tmp)
        for name in args.models:
            print(f"[{name}]", file=sys.stderr, flush=True)
            if name == "student":
                if args.run is None:
                    sys.exit("--run RUN_DIR is needed for the student")
                fp32, calib, inputs, labels, val = student_inputs(args.run)
                results.append(compare(name, fp32, calib, inputs, labels, folder, extras=True, val=val))
            else:
                fp32 = torchvision_model(name, folder)
                calib, inputs = structured_images(32, 224, seed=1), structured_images(48, 224, seed=2)
                results.append(compare(name, fp32, calib, inputs, None, folder, extras=False))
    print(markdown(results))
    print(f"NNCF: {results[0]['nncf'] if results else '?'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
