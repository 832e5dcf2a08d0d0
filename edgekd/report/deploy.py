"""runs/<name>/deploy/: what an app embeds — the chosen model, labels, preprocessing, a usage snippet,
the evaluation data and the on-device runner. Every file is written atomically."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgekd import atomic
from edgekd.errors import StageFailed

DEPLOY_DIR = "deploy"

USAGE = '''import json
import numpy as np
import onnxruntime as ort

pre = json.load(open("preprocess.json"))
labels = json.load(open("labels.json"))
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])


def classify(pixels):  # uint8 image, shape (height, width) or (height, width, channels)
    x = np.asarray(pixels, np.float32).reshape(pre["height"], pre["width"], pre["channels"]).transpose(2, 0, 1)
    mean = np.array(pre["mean"], np.float32).reshape(-1, 1, 1)
    std = np.array(pre["std"], np.float32).reshape(-1, 1, 1)
    logits = session.run(None, {pre["input_name"]: ((x * pre["scale"] - mean) / std)[None]})[0]
    return labels[int(logits.argmax())]
'''


def _metrics(manifest: dict[str, Any], stage: str) -> dict[str, Any]:
    return ((manifest.get("stages") or {}).get(stage) or {}).get("metrics") or {}


def preprocess_json(manifest: dict[str, Any]) -> dict[str, Any]:
    """export's preprocess dict, completed from the teacher's data summary so the snippet's keys exist."""
    pre = dict(_metrics(manifest, "export").get("preprocess") or {})
    data = _metrics(manifest, "teacher").get("data") or {}
    shape = list(data.get("input_shape") or [pre.get("channels", 1), pre.get("height"), pre.get("width")])
    channels, height, width = (shape + [None, None, None])[:3]
    defaults = {"layout": "NCHW", "channels": channels, "height": height, "width": width, "scale": 1 / 255,
                "mean": data.get("mean"), "std": data.get("std"),
                "formula": "input = (pixel * scale - mean[c]) / std[c]", "input_name": "input", "output_name": "logits"}
    for key, value in defaults.items():
        if pre.get(key) is None:
            pre[key] = value
    pre.setdefault("size", [pre["height"], pre["width"]])
    return pre


def labels_json(manifest: dict[str, Any]) -> list[str]:
    labels = _metrics(manifest, "export").get("labels") or (_metrics(manifest, "teacher").get("data") or {}).get("labels")
    if not labels:
        classes = (_metrics(manifest, "teacher").get("data") or {}).get("num_classes") or 0
        labels = [str(i) for i in range(classes)]
    return [str(label) for label in labels]


def _copy(source: Path, target: Path) -> None:
    with atomic.atomic_path(target) as temp:
        shutil.copyfile(source, temp)


def _ort_copy(report: dict[str, Any], manifest: dict[str, Any], run_dir: Path, model: Path) -> Path | None:
    """The .ort (ONNX Runtime Mobile) copy of the deployed model, when an earlier stage wrote one."""
    name = report["deployed"]["artifact"]
    row = next((r for r in report["artifacts"] if r["name"] == name), {})
    quant = _metrics(manifest, "quantize")
    options = [
        ((_metrics(manifest, "export").get("models") or {}).get(name) or {}).get("ort_path"),
        quant.get("ort_path") if name == quant.get("artifact_name") else None,
        row.get("ort_path"),
        model.with_suffix(".ort").name,
    ]
    for option in options:
        if option and (run_dir / option).is_file():
            return run_dir / option
    return None


def _install_runner(deploy: Path) -> tuple[list[Path], str | None]:
    """The on-device runner (run_on_device.py + edgekd_runtime/), via whatever the runtime offers."""
    try:
        import edgekd.runtime as runtime
    except ImportError:
        return [], "on-device runner not bundled: edgekd.runtime is not available"
    if callable(getattr(runtime, "bundle_files", None)):
        written = []
        for target, source in _pairs(runtime.bundle_files()):
            destination = deploy / target
            if Path(source).is_dir():
                shutil.rmtree(destination, ignore_errors=True)
                shutil.copytree(source, destination)
                written += [p for p in destination.rglob("*") if p.is_file()]
            else:
                _copy(Path(source), destination)
                written.append(destination)
        return written, None
    try:
        from edgekd.runtime.bundle import install_device_runner
    except ImportError:
        return [], "on-device runner not bundled: this edgekd has no edgekd.runtime.bundle_files()"
    return [Path(p) for p in install_device_runner(deploy)], None


def _pairs(files: Any) -> Iterable[tuple[str, Path]]:
    """bundle_files() may give {target: source} or a list of sources (copied under their own name)."""
    if isinstance(files, dict):
        return [(str(k), Path(v)) for k, v in files.items()]
    return [(Path(item).name, Path(item)) for item in files]


def bundle_readme(report: dict[str, Any], files: list[str]) -> str:
    deployed = report["deployed"]
    row = next((r for r in report["artifacts"] if r["name"] == deployed["artifact"]), {})
    size = f"{row['size_bytes'] / 1024:.1f} KiB" if row.get("size_bytes") else "size n/a"
    accuracy = f"test accuracy {row['accuracy']:.4f}" if isinstance(row.get("accuracy"), (int, float)) else ""
    lines = [
        f"# {report['run']['name']}: deploy bundle", "",
        f"`model.onnx` is the **{deployed['artifact']}** model ({row.get('kind', 'fp32')}, {size}, {accuracy}).",
        f"Chosen because: {deployed['reason']}.", "",
        "Budgets: " + ("all met." if deployed["budgets_passed"] else "NOT all met; see report.md."), "",
        "## Files", "",
    ]
    described = {
        "README.md": "this file", "model.onnx": "the model (ONNX)",
        "model.ort": "the same model in ONNX Runtime Mobile format",
        "labels.json": "class names, index = output position", "preprocess.json": "input size, layout, scale, mean/std",
        "eval.npz": "test images and labels (for checking accuracy on the device)",
        "run_on_device.py": "benchmark this bundle on a board: `python3 run_on_device.py` -> device.json",
    }
    for name in files:
        if "/" not in name:
            lines.append(f"- `{name}`: {described.get(name, '')}".rstrip(": "))
    if any(f.startswith("edgekd_runtime/") for f in files):
        lines.append("- `edgekd_runtime/`: the torch-free runtime that run_on_device.py uses")
    lines += ["", "## Use it (Python, `pip install onnxruntime numpy`)", "", "```python", USAGE.rstrip(), "```", "",
              "Merge device results into the report: `edgekd report RUN_DIR --merge device.json`.", ""]
    return "\n".join(lines)


def write_deploy_bundle(report: dict[str, Any], manifest: dict[str, Any], run_dir: Path) -> tuple[list[str], list[str]]:
    """Write deploy/; returns (files relative to run_dir, notes). Files from an earlier choice are removed."""
    deploy = run_dir / DEPLOY_DIR
    source = report["deployed"].get("source_path")
    model = run_dir / source if source else None
    if model is None or not model.is_file():
        raise StageFailed(f"deployed artifact {report['deployed']['artifact']}: model file {source} is missing "
                          "(rerun the stage that writes it)")
    notes: list[str] = []
    written: list[Path] = []
    deploy.mkdir(parents=True, exist_ok=True)
    _copy(model, deploy / "model.onnx")
    written.append(deploy / "model.onnx")
    ort_file = _ort_copy(report, manifest, run_dir, model)
    if ort_file is not None:
        _copy(ort_file, deploy / "model.ort")
        written.append(deploy / "model.ort")
    atomic.write_json(deploy / "labels.json", labels_json(manifest))
    atomic.write_json(deploy / "preprocess.json", preprocess_json(manifest))
    written += [deploy / "labels.json", deploy / "preprocess.json"]
    if (run_dir / "eval.npz").is_file():
        _copy(run_dir / "eval.npz", deploy / "eval.npz")
        written.append(deploy / "eval.npz")
    else:
        notes.append("eval.npz not in the run directory: the bundle has no evaluation data")
    runner_files, note = _install_runner(deploy)
    written += runner_files
    if note:
        notes.append(note)
    names = sorted({p.relative_to(deploy).as_posix() for p in written} | {"README.md"})
    atomic.write_text(deploy / "README.md", bundle_readme(report, names))
    keep = {deploy / n for n in names}
    for stale in sorted(deploy.rglob("*"), reverse=True):  # files of an earlier choice (e.g. a model.ort)
        if stale.is_file() and stale not in keep:
            stale.unlink()
        elif stale.is_dir() and not any(stale.iterdir()):
            stale.rmdir()
    return [f"{DEPLOY_DIR}/{n}" for n in names], notes
