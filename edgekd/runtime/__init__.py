"""Torch-free ONNX Runtime helpers: sessions, latency timing, accuracy, device runner.

Imports only the standard library, numpy and onnxruntime, so it runs on a device. Modules (imported on
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

Every module uses relative imports only: the pipeline copies this folder into deploy bundles as
`edgekd_runtime/`.
"""
