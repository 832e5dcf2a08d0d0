"""Make a deploy folder self-sufficient on a board: runner script + a copy of this runtime package.

Layout written into BUNDLE_DIR (next to model.onnx, eval.npz, ... that the pipeline puts there):
  run_on_device.py      the entry point (a copy of edgekd/runtime/run_on_device.py, shipped with the package)
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

def install_device_runner(bundle_dir: str | os.PathLike) -> list[Path]:
    """Write run_on_device.py and edgekd_runtime/ into `bundle_dir`; returns the paths written."""
    bundle = Path(bundle_dir)
    bundle.mkdir(parents=True, exist_ok=True)
    package = bundle / RUNTIME_FOLDER
    staging = bundle / f".{RUNTIME_FOLDER}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for source in sorted(_HERE.glob("*.py")):
        if source.name != RUNNER_NAME:
            shutil.copy2(source, staging / source.name)
    shutil.rmtree(package, ignore_errors=True)  # replace, never mix, an older copy
    os.replace(staging, package)
    runner = bundle / RUNNER_NAME
    temp = bundle / f".{RUNNER_NAME}.tmp"
    temp.unlink(missing_ok=True)  # a killed run's: copyfile would write through a link left in its place
    shutil.copyfile(_HERE / RUNNER_NAME, temp)
    temp.chmod(0o755)
    os.replace(temp, runner)
    return [runner, *sorted(package.glob("*.py"))]
