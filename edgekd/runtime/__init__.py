"""Torch-free ONNX Runtime helpers: sessions, latency timing, accuracy, device runner.

Imports only the standard library, numpy and onnxruntime (and Pillow, only in preprocess when an image file
is decoded), so it runs on a device. Modules (imported on
demand; this file imports nothing so `import edgekd.runtime.session` stays cheap):

  session        open_session, input_spec, check_input, random_inputs, resolve_providers
  timing         summarize, time_session, interleaved_benchmark, LatencyStats, TimingResult
  evaluate       load_eval_npz, predict_logits, accuracy, agreement, max_abs_diff, top_k, evaluate_session
  memory         peak_memory_bytes, baseline_memory_bytes, memory_profile (fresh subprocess)
  peak           measure_peak_gflops, compute_bound_ms
  mobile         operator_summary, check_mobile_usability, convert_to_ort, mobile_report
  cpu            cpu_info, describe, environment_fingerprint
  bench          bench_model, format_table (`edgekd bench`)
  device_runner  main (what deploy/run_on_device.py runs on a board)
  device_report  load_device_json, validate_device_json, merge_device_json
  bundle         install_device_runner (run_on_device.py + edgekd_runtime/ into a deploy folder)
  proto          read_model_summary: a minimal ONNX protobuf reader (op types, opsets, external data)
  errors         RuntimeInputError (CLI exit code 2)
  preprocess     load_preprocess, image_to_input: the preprocessing contract (preprocess.json); Pillow on use

Every module uses relative imports only: the pipeline copies this folder into deploy bundles as
`edgekd_runtime/`.

The notebook-facing API is re-exported here, loaded on first use (`edgekd.runtime.bench_model(...)`):

  bench_model(model, data_npz=None, threads=(1,), batches=(1,), ...)   what `edgekd bench --json` writes
  evaluate_model(model, data_npz, threads=1)                           accuracy (and agreement) only
  format_table(result)                                                 the console table of a bench result
  open_session, load_eval_npz, evaluate_session, interleaved_benchmark the building blocks
"""

from importlib import import_module as _import_module
from typing import Any as _Any

_API = {"bench_model": "bench", "evaluate_model": "bench", "format_table": "bench", "open_session": "session",
        "load_eval_npz": "evaluate", "evaluate_session": "evaluate", "interleaved_benchmark": "timing",
        "RuntimeInputError": "errors"}
__all__ = sorted(_API)


def __getattr__(name: str) -> _Any:  # PEP 562: import the module only when its function is used
    if name in _API:
        return getattr(_import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
