"""On-device benchmark of a deploy bundle -> device.json, and classification of image files with it (what
`run_on_device.py` runs).

Only the standard library, numpy and onnxruntime; relative imports only, so this folder also works when
the pipeline copies it into a bundle as `edgekd_runtime/`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from .bench import file_sha256, inputs_for_batches
from .cpu import cpu_info, describe, environment_fingerprint
from .device_report import DEVICE_SCHEMA_VERSION, validate_device_json
from .errors import RuntimeInputError
from .evaluate import evaluate_session, load_eval_npz
from .memory import memory_profile
from .mobile import operator_summary
from .session import CPU_PROVIDER, XNNPACK_PROVIDER, input_spec, open_session
from .timing import interleaved_benchmark


def _default_threads() -> list[int]:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return sorted({1, usable})


def parse_args(argv: Sequence[str] | None, bundle_dir: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_on_device.py",
        description="Benchmark the bundle's model(s) on this device and write device.json "
                    "(bring it back and run `edgekd report RUN_DIR --merge device.json`).")
    parser.add_argument("--model", nargs="+", metavar="[NAME=]PATH",
                        help="model(s) to measure (default: model.onnx and model.ort beside this script)")
    parser.add_argument("--data", help="eval .npz with inputs/labels (default: eval.npz beside this script)")
    parser.add_argument("--no-data", action="store_true", help="random inputs, no accuracy")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="intra-op thread counts (default: 1 and all usable cores)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default: 1)")
    parser.add_argument("--iterations", type=int, default=200, help="timed runs per configuration")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs before timing")
    parser.add_argument("--providers", nargs="+", choices=["auto", "cpu", "xnnpack"], default=["auto"],
                        help="auto = CPU EP, plus XNNPACK when this onnxruntime has it")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess")
    parser.add_argument("--out", default="device.json", help="where to write the results")
    classify = parser.add_argument_group(
        "classify image files (instead of benchmarking; needs Pillow to decode: pip install pillow)")
    classify.add_argument("--images", nargs="+", metavar="IMAGE",
                          help="JPEG/PNG/... files: preprocess them as preprocess.json says, print the top classes")
    classify.add_argument("--top", type=int, default=5, help="classes printed per image (default: 5)")
    classify.add_argument("--logits-out", metavar="JSON",
                          help="also write [{file, logits, top1, label}, ...] to this JSON file")
    classify.add_argument("--preprocess", metavar="JSON",
                          help="preprocessing record (default: preprocess.json beside this script, else the "
                               "model's ONNX metadata)")
    args = parser.parse_args(argv)
    args.bundle_dir = str(bundle_dir)
    if args.top < 1:
        parser.error("--top must be >= 1")
    if args.model is None:
        args.model = [str(p) for p in (bundle_dir / "model.onnx", bundle_dir / "model.ort") if p.is_file()]
        if not args.model:
            parser.error(f"no model.onnx beside {bundle_dir}; pass --model PATH")
    if args.data is None and not args.no_data and (bundle_dir / "eval.npz").is_file():
        args.data = str(bundle_dir / "eval.npz")
    if args.no_data:
        args.data = None
    args.threads = args.threads or _default_threads()
    if min(args.threads) < 1 or min(args.batch) < 1 or args.iterations < 1 or args.warmup < 0:
        parser.error("threads, batch sizes and iterations must be >= 1, warmup >= 0")
    return args


def _provider_sets(requested: Sequence[str]) -> dict[str, list[str]]:
    """Short name -> provider list. XNNPACK is only in some onnxruntime builds (not the PyPI wheels for
    Linux/macOS), so 'auto' uses it when present and says so."""
    has_xnnpack = XNNPACK_PROVIDER in ort.get_available_providers()
    sets: dict[str, list[str]] = {}
    for name in requested:
        if name in ("auto", "cpu"):
            sets["cpu"] = [CPU_PROVIDER]
        if name == "xnnpack" or (name == "auto" and has_xnnpack):
            if not has_xnnpack:
                raise RuntimeInputError(f"XNNPACK is not in this onnxruntime {ort.__version__} "
                                        f"(available: {', '.join(ort.get_available_providers())})")
            sets["xnnpack"] = [XNNPACK_PROVIDER, CPU_PROVIDER]
    return sets


def _parse_models(specs: Sequence[str]) -> dict[str, Path]:
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        path = Path(path if sep else spec)
        name = name if sep else path.name
        if not path.is_file():
            raise RuntimeInputError(f"{path}: not an ONNX model (file not found)")
        models[name] = path
    return models


def run_device_benchmark(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Measure every model x provider set x threads x batch; return the device.json document."""
    models = _parse_models(args.model)
    provider_sets = _provider_sets(args.providers)
    data = load_eval_npz(args.data) if args.data else None
    device = cpu_info()
    log(f"device: {describe(device)} | onnxruntime {device['onnxruntime']} | "
        f"providers: {', '.join(device['providers'])}")
    if "xnnpack" in provider_sets:
        log("XNNPACK EP available: measuring XNNPACK and the CPU EP side by side")
    else:
        log("XNNPACK EP not in this onnxruntime build: measuring the CPU EP only")

    artifacts, configurations = [], []  # configurations: (label, model name, path, providers, signature)
    inputs_by_signature: dict[tuple, dict[int, Any]] = {}
    notes_by_signature: dict[tuple, list[str]] = {}
    signature_of: dict[str, tuple] = {}
    for name, path in models.items():
        shown = path.name if path.resolve().parent == Path(args.bundle_dir).resolve() else str(path)
        row: dict[str, Any] = {"name": name, "path": shown, "size_bytes": path.stat().st_size,
                               "sha256": file_sha256(path), "accuracy": None, "agreement": None,
                               "samples": None, "accuracy_by_provider": {}, "latency_ms": [], "notes": []}
        for short, providers in provider_sets.items():
            session = open_session(path, threads=1, providers=providers)
            if data is not None:
                log(f"{name} [{short}]: accuracy on {len(data)} samples")
                evaluation = evaluate_session(session, data)
                row["accuracy_by_provider"][short] = evaluation["accuracy"]
                if short == "cpu" or row["accuracy"] is None:
                    row.update(accuracy=evaluation["accuracy"], agreement=evaluation["agreement"],
                               samples=evaluation["samples"])
            signature = tuple((s.name, s.dims, str(s.dtype)) for s in input_spec(session))
            if signature not in inputs_by_signature:
                notes_by_signature[signature] = []
                inputs_by_signature[signature] = inputs_for_batches(session, args.batch, data,
                                                                    notes_by_signature[signature])
            signature_of[name] = signature
            configurations.append((f"{name}@{short}", name, path, providers, signature))
        artifacts.append(row)

    # Models with the same inputs are timed in one interleaved run, so they share the machine's noise.
    by_name = {row["name"]: row for row in artifacts}
    for signature, inputs_by_batch in inputs_by_signature.items():
        group = [c for c in configurations if c[4] == signature]
        if not inputs_by_batch:
            continue  # every batch size was refused: the notes say why
        log(f"timing {', '.join(c[0] for c in group)}: threads {args.threads} x batches "
            f"{list(inputs_by_batch)}, {args.iterations} runs each")
        results = interleaved_benchmark({c[0]: c[2] for c in group}, inputs_by_batch, args.threads,
                                        args.warmup, args.iterations, providers={c[0]: c[3] for c in group})
        for label, name, *_ in group:
            provider = label.rsplit("@", 1)[1]
            by_name[name]["latency_ms"] += [{**latency, "provider": provider} for latency in results[label]]

    for row in artifacts:
        path, signature = models[row["name"]], signature_of[row["name"]]
        row["notes"] += notes_by_signature[signature]
        cpu_rows = [r for r in row["latency_ms"] if r["provider"] == "cpu"] or row["latency_ms"]
        row["throughput_ips"] = max((r["throughput_ips"] for r in cpu_rows), default=None)
        row["providers"] = sorted({p for r in row["latency_ms"] for p in r["providers"]})
        row["operators"] = operator_summary(path) if path.suffix.lower() == ".onnx" else None
        row["peak_memory_bytes"], row["memory"] = None, None
        if not args.no_memory and inputs_by_signature[signature]:
            try:
                profile = memory_profile(path, threads=args.threads[0], batch=min(inputs_by_signature[signature]))
                row["peak_memory_bytes"], row["memory"] = profile["peak_bytes"], profile
            except RuntimeError as exc:  # e.g. the probe was killed for memory: report it, keep the timings
                row["notes"].append(f"peak memory not measured: {exc}")
    return {
        "schema_version": DEVICE_SCHEMA_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device,
        "fingerprint": environment_fingerprint(device),
        "label": describe(device),
        "runner": {"runtime_package": __package__, "providers_measured": sorted(provider_sets),
                   "xnnpack": "xnnpack" in provider_sets, "threads": args.threads, "batches": args.batch,
                   "warmup": args.warmup, "iterations": args.iterations,
                   "data": os.path.basename(args.data) if args.data else None},
        "artifacts": artifacts,
    }


def write_json_atomic(document: dict[str, Any], out_path: Path) -> None:
    """Temp file in the target folder + rename: an interrupted run never leaves half a device.json."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
        os.replace(temp, out_path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def _summary_lines(document: dict[str, Any]) -> list[str]:
    lines = []
    for row in document["artifacts"]:
        accuracy = "" if row["accuracy"] is None else f"  accuracy {row['accuracy']:.4f}"
        memory = "" if row["peak_memory_bytes"] is None else f"  peak memory {row['peak_memory_bytes'] / 1e6:.1f} MB"
        lines.append(f"{row['name']}: {row['size_bytes'] / 1024:.1f} KiB{accuracy}{memory}")
        for latency in row["latency_ms"]:
            lines.append(f"  {latency['provider']:>7} threads {latency['threads']:>2} batch {latency['batch']:>3}: "
                         f"p50 {latency['p50']:.3f} ms  p90 {latency['p90']:.3f} ms  p99 {latency['p99']:.3f} ms  "
                         f"{latency['throughput_ips']:.1f} items/s")
        lines += [f"  note: {note}" for note in row["notes"]]
    return lines


def _labels(bundle_dir: Path, metadata: dict[str, str]) -> list[str]:
    path = bundle_dir / "labels.json"
    try:
        if path.is_file():
            return [str(label) for label in json.loads(path.read_text(encoding="utf-8"))]
        return [str(label) for label in json.loads(metadata.get("labels", "[]"))]
    except (json.JSONDecodeError, TypeError) as exc:
        raise RuntimeInputError(f"{path}: not a JSON list of class names ({exc})") from None


def classify_images(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The first --model (default model.onnx) on each --images file, preprocessed per the contract; returns
    [{file, logits, top1, label, top: [{index, label, prob}]}]."""
    from .preprocess import image_to_input, load_preprocess, preprocess_from_metadata

    bundle = Path(args.bundle_dir)
    model = next(iter(_parse_models(args.model[:1]).values()))
    session = open_session(model, threads=1, providers=[CPU_PROVIDER])
    # ONNX metadata holds the contract too; sessions of other formats may have none
    metadata = dict(session.get_modelmeta().custom_metadata_map) if hasattr(session, "get_modelmeta") else {}
    if args.preprocess:
        spec = load_preprocess(args.preprocess)
    elif (bundle / "preprocess.json").is_file():
        spec = load_preprocess(bundle / "preprocess.json")
    else:
        spec = preprocess_from_metadata(metadata)
        if spec is None:
            raise RuntimeInputError(f"no preprocess.json beside {bundle} and no 'preprocess' in {model}'s metadata; "
                                    "pass --preprocess PATH")
    labels = _labels(bundle, metadata)
    input_name = spec["input_name"] if spec["input_name"] in [i.name for i in session.get_inputs()] \
        else session.get_inputs()[0].name
    results = []
    for image in args.images:
        logits = session.run(None, {input_name: image_to_input(image, spec)})[0][0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = [int(i) for i in np.argsort(-logits, kind="stable")[:args.top]]
        label = [labels[i] if i < len(labels) else str(i) for i in order]
        results.append({"file": str(image), "logits": logits.tolist(), "top1": order[0], "label": label[0],
                        "top": [{"index": i, "label": n, "prob": float(probs[i])} for i, n in zip(order, label)]})
    return results


def main(argv: Sequence[str] | None = None, bundle_dir: str | os.PathLike | None = None) -> int:
    """Entry point of run_on_device.py. Exit codes: 0 written, 2 bad input (model, data, options, images)."""
    bundle = Path(bundle_dir) if bundle_dir is not None else Path.cwd()
    args = parse_args(argv, bundle)
    if args.images:
        try:
            results = classify_images(args)
        except RuntimeInputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for result in results:
            print(result["file"])
            for top in result["top"]:
                print(f"  {top['label']:<20} {100 * top['prob']:5.1f}%  (class {top['index']})")
        if args.logits_out:
            write_json_atomic([{k: r[k] for k in ("file", "logits", "top1", "label")} for r in results],
                              Path(args.logits_out))
            print(f"wrote {args.logits_out}")
        return 0
    try:
        document = run_device_benchmark(args, log=lambda message: print(message, flush=True))
        validate_device_json(document)  # never hand back a file that `edgekd report --merge` would refuse
    except RuntimeInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_path = Path(args.out)
    write_json_atomic(document, out_path)
    print("\n".join(_summary_lines(document)))
    print(f"wrote {out_path}: bring it back and run `edgekd report RUN_DIR --merge {out_path.name}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
