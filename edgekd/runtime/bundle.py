"""Make a deploy folder self-sufficient on a board: runner script + a copy of this runtime package.

Layout written into BUNDLE_DIR (next to model.onnx, eval.npz, ... that the pipeline puts there):
  run_on_device.py      the entry point (same text as deploy/run_on_device.py in the repository)
  edgekd_runtime/       a copy of edgekd/runtime/*.py; relative imports only, so it works under this name
Copied rather than pip-installed because a board needs nothing but `pip install onnxruntime numpy`, and
the copy pins the exact code that produced the report the device results are merged into.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

RUNTIME_FOLDER = "edgekd_runtime"
RUNNER_NAME = "run_on_device.py"
_HERE = Path(__file__).resolve().parent

# Kept here (not read from deploy/) so installed, non-editable copies of edgekd can still write bundles;
# tests/test_device_runner.py asserts it equals deploy/run_on_device.py.
RUNNER_SCRIPT = '''#!/usr/bin/env python3
"""Benchmark this deploy bundle's model on the device it runs on and write device.json.

Needs only `pip install onnxruntime numpy`. Run `python3 run_on_device.py --help` for the options;
with none it measures model.onnx (and model.ort) beside this file on eval.npz, 1 thread and all cores.

The code is the `edgekd_runtime/` folder beside this file: a copy of edgekd's torch-free runtime that
the pipeline puts in every bundle. Inside an edgekd checkout or install, `edgekd.runtime` is used instead.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def load_runner():
    if os.path.isfile(os.path.join(HERE, "edgekd_runtime", "device_runner.py")):
        sys.path.insert(0, HERE)  # a bundle: use the copy that travelled with the model
        from edgekd_runtime.device_runner import main
        return main
    checkout = os.path.dirname(HERE)  # deploy/ inside an edgekd checkout
    if os.path.isfile(os.path.join(checkout, "edgekd", "runtime", "device_runner.py")):
        sys.path.insert(0, checkout)
    try:
        from edgekd.runtime.device_runner import main
    except ImportError as exc:
        sys.exit(f"run_on_device.py: cannot load the runtime ({exc}). Copy the whole bundle folder, "
                 "including edgekd_runtime/, and run `pip install onnxruntime numpy`.")
    return main


if __name__ == "__main__":
    sys.exit(load_runner()(sys.argv[1:], bundle_dir=HERE))
'''


def install_device_runner(bundle_dir: str | os.PathLike) -> list[Path]:
    """Write run_on_device.py and edgekd_runtime/ into `bundle_dir`; returns the paths written."""
    bundle = Path(bundle_dir)
    bundle.mkdir(parents=True, exist_ok=True)
    package = bundle / RUNTIME_FOLDER
    staging = bundle / f".{RUNTIME_FOLDER}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for source in sorted(_HERE.glob("*.py")):
        shutil.copy2(source, staging / source.name)
    shutil.rmtree(package, ignore_errors=True)  # replace, never mix, an older copy
    os.replace(staging, package)
    runner = bundle / RUNNER_NAME
    temp = bundle / f".{RUNNER_NAME}.tmp"
    temp.write_text(RUNNER_SCRIPT, encoding="utf-8")
    temp.chmod(0o755)
    os.replace(temp, runner)
    return [runner, *sorted(package.glob("*.py"))]
