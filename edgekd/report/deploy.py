"""runs/<name>/deploy/: what an app embeds — the chosen model, labels, preprocessing, a usage snippet,
the evaluation data and the on-device runner. Every file is written atomically."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgekd import atomic
from edgekd.errors import StageFailed
from edgekd.runner.contract import Manifest
from edgekd.runner.files import RunFiles
from edgekd.runtime.bundle import RUNNER_NAME, install_device_runner
from edgekd.stages import export as export_stage
from edgekd.stages import quantize as quantize_stage

DEPLOY_DIR = "deploy"

# The preprocessing contract in Python (needs `pre`, numpy as np, PIL's Image and ImageOps): every runtime's
# snippet uses it, so that an app feeds the model what edgekd evaluated it on.
TO_INPUT = '''def to_input(path):  # preprocess.json's contract, step by step (edgekd evaluated the model on exactly this)
    image = ImageOps.exif_transpose(Image.open(path))
    if image.mode.startswith("I"):  # 16-bit grey: keep the high byte
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    image = image.convert(pre.get("color") or ("L" if pre["channels"] == 1 else "RGB"))  # alpha dropped
    w, h = image.size
    if pre.get("resize"):  # shorter side to `resize`, aspect ratio kept (longer side truncated)
        r = pre["resize"]
        size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    else:  # straight to the model size
        size = (pre["width"], pre["height"])
    if image.size != size:
        image = image.resize(size, Image.BILINEAR)  # Pillow's bilinear antialiases when shrinking
    if pre.get("crop"):  # center crop; round() is half to even
        ch, cw = pre["crop"]
        top, left = round((image.height - ch) / 2), round((image.width - cw) / 2)
        image = image.crop((left, top, left + cw, top + ch))
    x = np.asarray(image, np.float32).reshape(pre["height"], pre["width"], -1).transpose(2, 0, 1)
    mean = np.array(pre["mean"], np.float32).reshape(-1, 1, 1)
    std = np.array(pre["std"], np.float32).reshape(-1, 1, 1)
    return ((x * np.float32(pre["scale"]) - mean) / std)[None]
'''

USAGE = '''import json
import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

pre = json.load(open("preprocess.json"))
labels = json.load(open("labels.json"))
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])


''' + TO_INPUT + '''

def classify(path):  # an image file (JPEG, PNG, ...) -> class name
    logits = session.run(None, {pre["input_name"]: to_input(path)})[0]
    return labels[int(logits.argmax())]
'''


def preprocess_json(manifest: Manifest) -> dict[str, Any]:
    """The export stage's preprocessing record, plus the input size as [height, width]."""
    pre = dict(manifest.metrics(export_stage.NAME)["preprocess"])
    return {**pre, "size": [pre["height"], pre["width"]]}


def labels_json(manifest: Manifest) -> list[str]:
    return [str(label) for label in manifest.metrics(export_stage.NAME)["labels"]]


# The top-level files a bundle may hold (edgekd_runtime/ is replaced whole by install_device_runner).
BUNDLE_FILES = frozenset({"model.onnx", "model.ort", "labels.json", "preprocess.json", "eval.npz", "README.md",
                          RUNNER_NAME})


def _copy(source: Path, target: Path) -> None:
    with atomic.atomic_path(target) as temp:
        shutil.copyfile(source, temp)


def _ort_copy(report: dict[str, Any], manifest: Manifest, run_dir: Path) -> Path | None:
    """The .ort (ONNX Runtime Mobile) copy of the deployed model, when the export or quantize stage wrote one."""
    name = report["deployed"]["artifact"]
    quant = manifest.metrics(quantize_stage.NAME)
    if quant and name == quant["artifact_name"]:
        ort_path = quant["ort_path"]
    else:
        ort_path = manifest.metrics(export_stage.NAME)["models"].get(name, {}).get("ort_path")
    return run_dir / ort_path if ort_path and (run_dir / ort_path).is_file() else None


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
        "labels.json": "class names, index = output position",
        "preprocess.json": "how an image becomes the model input: resize, center crop, colour, scale, mean/std",
        "eval.npz": "test images and labels (for checking accuracy on the device)",
        "run_on_device.py": "benchmark this bundle on a board: `python3 run_on_device.py` -> device.json; "
                            "classify image files: `python3 run_on_device.py --images photo.jpg`",
    }
    for name in files:
        if "/" not in name:
            lines.append(f"- `{name}`: {described.get(name, '')}".rstrip(": "))
    if any(f.startswith("edgekd_runtime/") for f in files):
        lines.append("- `edgekd_runtime/`: the torch-free runtime that run_on_device.py uses")
    lines += ["", "## Use it (Python, `pip install onnxruntime numpy pillow`)", "",
              "The image must be prepared exactly as `preprocess.json` says (the same steps in any language: decode, "
              "EXIF orientation, colour, shorter side resized with antialiased bilinear, center crop, normalize):", "",
              "```python", USAGE.rstrip(), "```", "",
              "Merge device results into the report: `edgekd report RUN_DIR --merge device.json`.", ""]
    return "\n".join(lines)


def write_deploy_bundle(report: dict[str, Any], manifest: Manifest, files: RunFiles) -> list[str]:
    """Write deploy/ (a folder edgekd owns whole: `files` refuses a deploy/ it did not create); returns the
    files relative to the run directory. Bundle files of an earlier choice are removed, nothing else."""
    run_dir = files.run_dir
    source = report["deployed"].get("source_path")
    model = run_dir / source if source else None
    if model is None or not model.is_file():
        raise StageFailed(f"deployed artifact {report['deployed']['artifact']}: model file {source} is missing "
                          "(rerun the stage that writes it)")
    deploy = files.path(f"{DEPLOY_DIR}/")
    written: list[Path] = []
    deploy.mkdir(parents=True, exist_ok=True)
    _copy(model, deploy / "model.onnx")
    written.append(deploy / "model.onnx")
    ort_file = _ort_copy(report, manifest, run_dir)
    if ort_file is not None:
        _copy(ort_file, deploy / "model.ort")
        written.append(deploy / "model.ort")
    atomic.write_json(deploy / "labels.json", labels_json(manifest))
    atomic.write_json(deploy / "preprocess.json", preprocess_json(manifest))
    written += [deploy / "labels.json", deploy / "preprocess.json"]
    _copy(run_dir / export_stage.EVAL_ARTIFACT, deploy / "eval.npz")
    written.append(deploy / "eval.npz")
    written += install_device_runner(deploy)
    names = sorted({p.relative_to(deploy).as_posix() for p in written} | {"README.md"})
    atomic.write_text(deploy / "README.md", bundle_readme(report, names))
    for stale in sorted(BUNDLE_FILES - set(names)):  # e.g. the model.ort of an earlier choice
        (deploy / stale).unlink(missing_ok=True)
    return [f"{DEPLOY_DIR}/{n}" for n in names]
