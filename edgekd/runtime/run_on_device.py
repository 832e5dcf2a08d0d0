#!/usr/bin/env python3
"""Benchmark this deploy bundle's model on the device it runs on and write device.json, or classify images.

Needs only `pip install onnxruntime numpy`. Run `python3 run_on_device.py --help` for the options;
with none it measures model.onnx (and model.ort) beside this file on eval.npz, 1 thread and all cores.

  python3 run_on_device.py --images photo.jpg scan.png [--top 3] [--logits-out logits.json]

classifies image files with preprocess.json's transform (decoding needs `pip install pillow` too).

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
    checkout = os.path.dirname(os.path.dirname(HERE))  # edgekd/runtime/ inside an edgekd checkout
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
