"""`edgekd bench MODEL.onnx`: latency grid, accuracy, peak memory and mobile readiness of one model."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .cpu import cpu_info, describe, environment_fingerprint
from .errors import RuntimeInputError
from .evaluate import EvalData, evaluate_session, load_eval_npz
from .memory import memory_profile
from .mobile import mobile_report
from .profile import format_profile, profile_model
from .session import check_input, input_spec, open_session, random_inputs
from .tflite import is_tflite
from .timing import interleaved_benchmark

logger = logging.getLogger(__name__)

# `edgekd bench --json` documents carry this; its JSON Schema is edgekd/schemas/bench.schema.json.
BENCH_SCHEMA_VERSION = 1


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inputs_for_batches(session: Any, batches: Sequence[int], data: EvalData | None,
                       notes: list[str]) -> dict[int, Any]:
    """One feed per batch size: real samples when there is data (cycled if too few), else random.

    A batch the model cannot take (fixed batch dim) is left out with a note instead of failing the run.
    """
    inputs_by_batch: dict[int, Any] = {}
    spec = input_spec(session)
    for batch in dict.fromkeys(batches):
        if batch < 1:
            raise RuntimeInputError(f"batch sizes must be >= 1, got {batch}")
        try:
            if data is not None and len(spec) == 1:
                take = np.resize(np.arange(len(data)), batch)  # cycle through the samples
                inputs_by_batch[batch] = check_input(session, np.ascontiguousarray(data.inputs[take]))
            else:
                inputs_by_batch[batch] = random_inputs(session, batch)
        except RuntimeInputError as exc:
            notes.append(f"batch {batch} skipped: {exc}")
    return inputs_by_batch


def bench_model(model_path: str | os.PathLike, data_npz: str | os.PathLike | None = None,
                threads: Sequence[int] = (1,), batches: Sequence[int] = (1,),
                providers: Sequence[str] | None = None, warmup: int = 20, iterations: int = 200, *,
                mobile: bool = True, memory: bool = True, profile_runs: int | None = None,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Benchmark one model; returns a JSON-serializable dict (see format_table for the console view).

    Keys: model, environment, input, inputs, settings, rows (interleaved_benchmark rows), accuracy
    (None without labelled data), agreement (None without teacher_predictions), accuracy_samples,
    peak_memory_bytes, memory, mobile, notes; profile (edgekd.runtime.profile.profile_model at the first
    thread count and smallest batch, `profile_runs` runs after `warmup`) when profile_runs is given, else None.
    """
    path = Path(model_path)
    say = progress or (lambda message: logger.info("%s", message))
    threads, batches = list(dict.fromkeys(threads)), list(dict.fromkeys(batches))
    if not threads or min(threads) < 1 or not batches:
        raise RuntimeInputError(f"need thread counts >= 1 and at least one batch size; got {threads}, {batches}")
    notes: list[str] = []
    session = open_session(path, threads=threads[0], providers=providers)
    specs = input_spec(session)
    if not specs:  # a constant graph: nothing to feed, nothing to time
        raise RuntimeInputError(f"{path}: the model has no inputs; nothing to benchmark")
    data = load_eval_npz(data_npz) if data_npz is not None else None
    if data is not None:  # a data/model mismatch is an error, not a batch to skip
        check_input(session, data.inputs[: specs[0].shape[0] or 1])
    if hasattr(session, "io_quantization"):  # LiteRT: say what the app must do around a full-int8 model
        io = session.io_quantization()
        for side in ("input", "output"):
            if io[side]:
                notes.append(f"LiteRT {side} is {io[side]['dtype']} (scale {io[side]['scale']:.6g}, zero_point "
                             f"{io[side]['zero_point']}): edgekd {'quantizes' if side == 'input' else 'dequantizes'} it "
                             "as an app must")
    inputs_by_batch = inputs_for_batches(session, batches, data, notes)
    if not inputs_by_batch:
        raise RuntimeInputError(f"{path}: none of the batch sizes {batches} fit the model's input "
                                f"{specs[0].describe()}")

    evaluation: dict[str, Any] = {"accuracy": None, "agreement": None, "samples": None}
    if data is not None:
        say(f"evaluating on {len(data)} samples")
        evaluation = evaluate_session(session, data)
    del session  # the benchmark opens its own sessions per configuration

    say(f"timing threads={threads} batches={list(inputs_by_batch)} ({warmup} warm-up, {iterations} runs)")
    label = path.stem
    rows = interleaved_benchmark({label: path}, inputs_by_batch, threads, warmup, iterations,
                                 providers=providers)[label]
    operator_profile = None
    if profile_runs:
        batch = min(inputs_by_batch)
        say(f"profiling per operator: threads={threads[0]} batch={batch} ({warmup} warm-up, {profile_runs} runs)")
        operator_profile = profile_model(path, inputs_by_batch[batch], threads=threads[0], warmup=warmup,
                                         runs=profile_runs, providers=providers)
    profile = None
    if memory:
        say("measuring peak memory in a fresh process")
        profile = memory_profile(path, threads=threads[0], batch=min(inputs_by_batch), providers=providers)
    environment = cpu_info()
    environment["fingerprint"] = environment_fingerprint(environment)
    environment["description"] = describe(environment)
    return {
        "schema_version": BENCH_SCHEMA_VERSION,
        "model": {"name": label, "path": str(path), "size_bytes": path.stat().st_size,
                  "sha256": file_sha256(path)},
        "environment": environment,
        "input": specs[0].to_dict(),
        "inputs": [spec.to_dict() for spec in specs],
        "settings": {"threads": threads, "batches": list(inputs_by_batch), "warmup": warmup,
                     "iterations": iterations, "providers": list(providers or []),
                     "data": None if data_npz is None else str(data_npz),
                     "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "rows": rows,
        "accuracy": evaluation["accuracy"],
        "agreement": evaluation["agreement"],
        "accuracy_samples": evaluation["samples"],
        "peak_memory_bytes": None if profile is None else profile["peak_bytes"],
        "memory": profile,
        "mobile": mobile_report(path, check_usability=True) if mobile and not is_tflite(path) else None,
        "profile": operator_profile,
        "notes": notes,
    }


def evaluate_model(model_path: str | os.PathLike, data_npz: str | os.PathLike, threads: int = 1,
                   providers: Sequence[str] | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Accuracy of one ONNX model on an eval .npz (inputs, labels[, teacher_predictions]), no timing:
    {"accuracy", "agreement" (None without teacher_predictions), "samples"}."""
    session = open_session(model_path, threads=threads, providers=providers)
    data = load_eval_npz(data_npz)
    check_input(session, data.inputs[: input_spec(session)[0].shape[0] or 1])
    return evaluate_session(session, data, batch_size)


def _megabytes(value: int | None) -> str:
    return "?" if value is None else f"{value / 1e6:.1f} MB"


def format_table(result: dict[str, Any]) -> str:
    """Readable console summary of bench_model()'s result."""
    model, env = result["model"], result["environment"]
    lines = [f"model    {model['path']}  ({model['size_bytes'] / 1024:.1f} KiB)  input "
             f"{result['input']['name']} {result['input']['dims']} {result['input']['dtype']}",
             f"machine  {env.get('description') or describe(env)}  onnxruntime {env.get('onnxruntime')}"]
    if result.get("accuracy") is not None:
        agreement = result.get("agreement")
        lines.append(f"accuracy {result['accuracy']:.4f} on {result['accuracy_samples']} samples"
                     + ("" if agreement is None else f"  agreement with teacher {agreement:.4f}"))
    memory = result.get("memory")
    if memory:
        lines.append(f"memory   peak {_megabytes(memory['peak_bytes'])}  (model adds "
                     f"{_megabytes(memory['model_increment_bytes'])} over numpy+onnxruntime "
                     f"{_megabytes(memory['baseline_bytes'])})")
    header = (f"{'threads':>7} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9} "
              f"{'std':>7} {'items/s':>10} {'1st run':>8} {'create':>8}  provider")
    lines += ["", header, "-" * len(header)]
    for row in result["rows"]:
        provider = (row.get("providers") or ["?"])[0].replace("ExecutionProvider", "")
        lines.append(f"{row['threads']:>7} {row['batch']:>5} {row['p50']:>9.3f} {row['p90']:>9.3f} "
                     f"{row['p99']:>9.3f} {row['mean']:>9.3f} {row['std']:>7.3f} {row['throughput_ips']:>10.1f} "
                     f"{row['first_run_ms']:>8.2f} {row['session_create_ms'] or 0:>8.1f}  {provider}")
    mobile = result.get("mobile") or {}
    operators = mobile.get("operators")
    if operators:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(operators["op_counts"].items(), key=lambda kv: -kv[1]))
        lines += ["", f"operators {operators['node_count']} nodes ({operators['quantized_nodes']} quantized): {ops}"]
    usability = mobile.get("usability")
    if usability and usability.get("available"):
        verdicts = "; ".join(f"{ep}: {v.get('as_is', '?')} as is, {v.get('fixed_shapes', '?')} with fixed shapes"
                             for ep, v in usability["verdicts"].items())
        lines.append(f"mobile   {verdicts}")
    elif usability:
        lines.append(f"mobile   usability check unavailable: {usability.get('reason')}")
    if mobile.get("reason"):
        lines.append(f"mobile   {mobile['reason']}")
    if result.get("profile"):
        lines += ["", format_profile(result["profile"])]
    lines += [f"note     {note}" for note in result.get("notes", [])]
    return "\n".join(lines)
