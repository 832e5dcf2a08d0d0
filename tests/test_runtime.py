"""edgekd.runtime: torch-free sessions, timing, evaluation, memory, CPU info, mobile checks, bench."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")  # only to build test models; the runtime itself never imports it
from onnx import TensorProto, helper  # noqa: E402
from onnx_models import tiny_classifier  # noqa: E402

from edgekd.runtime import cpu, evaluate, memory, mobile, peak, proto, session, timing  # noqa: E402
from edgekd.runtime.bench import bench_model, format_table  # noqa: E402
from edgekd.runtime.errors import RuntimeInputError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNTIME_MODULES = ["errors", "proto", "session", "timing", "evaluate", "memory", "peak", "mobile", "cpu",
                   "bench", "device_runner", "device_report", "bundle"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.onnx"
    onnx.save(tiny_classifier(), str(path))
    return path


@pytest.fixture(scope="module")
def eval_npz(tmp_path_factory, model_path) -> Path:
    rng = np.random.default_rng(1)
    inputs = rng.standard_normal((40, 1, 28, 28)).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "eval.npz"
    np.savez(path, inputs=inputs, labels=rng.integers(0, 10, 40).astype(np.int64),
             teacher_predictions=rng.integers(0, 10, 40).astype(np.int64))
    return path


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ClockedSession:
    """A real session whose every run advances a fake clock by the next scripted duration."""

    def __init__(self, real, clock: FakeClock, durations: list[float]) -> None:
        self.real, self.clock, self.durations = real, clock, list(durations)

    def get_inputs(self):
        return self.real.get_inputs()

    def get_providers(self):
        return self.real.get_providers()

    def run(self, output_names, feed):
        self.clock.now += self.durations.pop(0)
        return self.real.run(output_names, feed)


def test_runtime_modules_import_without_torch_or_onnx():
    imports = "; ".join(f"import edgekd.runtime.{name}" for name in RUNTIME_MODULES)
    code = (f"{imports}; import sys; leaked = [m for m in ('torch', 'onnx', 'pydantic', 'click') "
            "if m in sys.modules]; assert not leaked, leaked")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_summarize_gives_numpy_linear_percentiles_in_ms():
    stats = timing.summarize([i / 1000 for i in range(1, 11)])  # 1..10 ms
    assert (stats.p50, stats.p90, stats.p99) == pytest.approx((5.5, 9.1, 9.91))
    assert stats.mean == pytest.approx(5.5) and stats.std == pytest.approx(np.sqrt(8.25))
    assert (stats.min, stats.max, stats.iterations) == (pytest.approx(1.0), pytest.approx(10.0), 10)
    assert set(stats.to_dict()) == {"p50", "p90", "p99", "mean", "std", "min", "max", "iterations"}
    with pytest.raises(ValueError):
        timing.summarize([])


def test_time_session_separates_first_run_from_steady_state_samples(model_path):
    clock = FakeClock()
    real = session.open_session(model_path)
    # first run 50 ms, 2 untimed warm-up runs, then samples of 1, 2, 3, 4 ms
    fake = ClockedSession(real, clock, [0.050, 0.5, 0.5, 0.001, 0.002, 0.003, 0.004])
    result = timing.time_session(fake, np.zeros((8, 1, 28, 28), np.float32), warmup=3, iterations=4,
                                 clock=clock, session_create_ms=12.0)
    assert result.first_run_ms == pytest.approx(50.0)
    assert result.stats.iterations == 4 and result.stats.p50 == pytest.approx(2.5)
    assert result.stats.max == pytest.approx(4.0)
    assert result.throughput_ips == pytest.approx(8 / 0.0025)
    assert result.session_create_ms == 12.0 and result.providers == ["CPUExecutionProvider"]


def test_time_session_stops_at_time_budget(model_path):
    clock = FakeClock()
    fake = ClockedSession(session.open_session(model_path), clock, [0.01] * 20)
    result = timing.time_session(fake, np.zeros((1, 1, 28, 28), np.float32), warmup=1, time_budget_s=0.035,
                                 clock=clock)
    assert result.stats.iterations == 4  # 10+10+10 ms < 35 ms, the 4th reaches it


def test_interleaved_benchmark_runs_models_in_round_robin_chunks():
    calls: list[str] = []
    clock = FakeClock()

    def factory(path, threads, providers):
        def run(output_names, feed):
            calls.append(path)
            clock.now += 0.001
            return [np.zeros((1, 10), np.float32)]
        inputs = [SimpleNamespace(name="input", shape=["batch", 1, 28, 28], type="tensor(float)")]
        return SimpleNamespace(run=run, get_inputs=lambda: inputs, get_providers=lambda: [f"{providers}"])

    rows = timing.interleaved_benchmark({"A": "a", "B": "b"}, {1: np.zeros((1, 1, 28, 28), np.float32)},
                                        threads_list=[1], warmup=2, iterations=25, chunk=10, clock=clock,
                                        providers={"A": ["cpu"], "B": ["xnnpack"]}, session_factory=factory)
    expected = list("aabb") + ["a"] * 10 + ["b"] * 10 + ["a"] * 10 + ["b"] * 10 + ["a"] * 5 + ["b"] * 5
    assert calls == expected
    row = rows["A"][0]
    assert set(row) == {"threads", "batch", "p50", "p90", "p99", "mean", "std", "min", "max", "iterations",
                        "throughput_ips", "session_create_ms", "first_run_ms", "providers"}
    assert row["iterations"] == 25 and row["p50"] == pytest.approx(1.0) and row["providers"] == ["['cpu']"]
    assert rows["B"][0]["providers"] == ["['xnnpack']"]


def test_interleaved_sessions_park_their_workers_after_each_run_only_when_taking_turns(model_path, monkeypatch):
    key = "session.force_spinning_stop"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ORT's default: not set
        session.open_session(model_path, threads=2).get_session_options().get_session_config_entry(key)
    parked = session.open_session(model_path, threads=2, stop_spinning_after_run=True)
    assert parked.get_session_options().get_session_config_entry(key) == "1"
    assert parked.run(None, {"input": np.zeros((1, 1, 28, 28), np.float32)})[0].shape == (1, 10)

    opened: list[bool] = []

    def recording_open(path, threads, providers=None, stop_spinning_after_run=False):
        opened.append(stop_spinning_after_run)
        return session.open_session(path, threads, providers, stop_spinning_after_run)

    monkeypatch.setattr(timing, "open_session", recording_open)
    x = {1: np.zeros((1, 1, 28, 28), np.float32)}
    timing.interleaved_benchmark({"a": model_path, "b": model_path}, x, threads_list=[2], warmup=1, iterations=2)
    timing.interleaved_benchmark({"a": model_path}, x, threads_list=[2], warmup=1, iterations=2)
    assert opened == [True, True, False]  # several models take turns; a lone model keeps ORT's default


def test_interleaved_benchmark_gives_one_row_per_threads_and_batch(model_path):
    rows = timing.interleaved_benchmark(
        {"m": model_path}, {1: np.zeros((1, 1, 28, 28), np.float32), 3: np.zeros((3, 1, 28, 28), np.float32)},
        threads_list=[1, 2], warmup=1, iterations=3)["m"]
    assert [(r["threads"], r["batch"]) for r in rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert all(r["min"] <= r["p50"] <= r["p90"] <= r["p99"] <= r["max"] for r in rows)


def test_open_session_pins_threads_and_reports_providers(model_path):
    sess = session.open_session(model_path, threads=3)
    options = sess.get_session_options()
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert sess.get_providers() == ["CPUExecutionProvider"]
    assert session.resolve_providers(["cpu"]) == ["CPUExecutionProvider"]


def test_open_session_rejects_a_file_that_is_not_onnx(tmp_path):
    bogus = tmp_path / "notes.onnx"
    bogus.write_text("definitely not a protobuf\n")
    with pytest.raises(RuntimeInputError, match=r"notes\.onnx: not an ONNX model \(Protobuf parsing failed"):
        session.open_session(bogus)
    with pytest.raises(RuntimeInputError, match=r"missing\.onnx: not an ONNX model \(file not found\)"):
        session.open_session(tmp_path / "missing.onnx")


def test_open_session_rejects_unknown_provider_listing_available_ones(model_path):
    with pytest.raises(RuntimeInputError, match=r"'NoSuchProvider' is not available .*available: .*CPUExecutionProvider"):
        session.open_session(model_path, providers=["NoSuchProvider"])


def test_check_input_rejects_wrong_shape_and_dtype(model_path):
    sess = session.open_session(model_path)
    with pytest.raises(RuntimeInputError) as info:
        session.check_input(sess, np.zeros((1, 3, 32, 32), np.float32))
    assert str(info.value) == "input shape (1, 3, 32, 32) does not match the model's input 'input' [batch, 1, 28, 28]"
    with pytest.raises(RuntimeInputError, match="input dtype float64"):
        session.check_input(sess, np.zeros((1, 1, 28, 28), np.float64))
    spec = session.input_spec(sess)[0]
    assert (spec.name, spec.shape, spec.dtype) == ("input", (None, 1, 28, 28), np.dtype(np.float32))


def test_open_session_loads_external_data_only_from_beside_the_model(tmp_path):
    model = tiny_classifier()
    inside = tmp_path / "inside"
    inside.mkdir()
    onnx.save(model, str(inside / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.weights", size_threshold=0)
    assert proto.read_model_summary(inside / "m.onnx").external_data  # really external
    out = session.open_session(inside / "m.onnx").run(None, {"input": np.ones((1, 1, 28, 28), np.float32)})
    assert out[0].shape == (1, 10)

    escaping = onnx.load(str(inside / "m.onnx"), load_external_data=False)
    for tensor in escaping.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../stolen.weights"
    (tmp_path / "stolen.weights").write_bytes((inside / "m.weights").read_bytes())
    onnx.save(escaping, str(inside / "escaping.onnx"))
    with pytest.raises(RuntimeInputError, match="outside the model's folder"):
        session.open_session(inside / "escaping.onnx")


def test_read_model_summary_counts_ops_including_subgraphs(tmp_path):
    branch = lambda op: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["x"], ["y"])], op, [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["x2"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=branch("Relu"), else_branch=branch("Sigmoid"))],
        "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    summary = proto.parse_model_bytes(model.SerializeToString())
    assert dict(summary.op_counts) == {"Identity": 1, "If": 1, "Relu": 1, "Sigmoid": 1}
    assert summary.opsets == {"": 17, "com.microsoft": 1}
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(tiny_classifier().SerializeToString()[:200])
    with pytest.raises(proto.ProtoError):
        proto.read_model_summary(truncated)


def test_accuracy_agreement_and_diffs():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])
    labels = np.array([1, 0, 1, 0])
    assert evaluate.accuracy(logits, labels) == 0.75  # ties go to the lower class, like argmax
    assert evaluate.accuracy(np.array([1, 0, 2, 0]), labels) == 0.75
    assert evaluate.agreement(logits, np.array([1, 2, 2, 1])) == 0.5
    assert evaluate.max_abs_diff(logits, logits + 0.25) == pytest.approx(0.25)
    assert evaluate.top_k(logits, 2).tolist() == [[1, 0], [0, 1], [2, 1], [0, 1]]
    with pytest.raises(RuntimeInputError):
        evaluate.accuracy(logits, labels[:3])


def test_predict_logits_matches_one_big_run(model_path, eval_npz):
    sess = session.open_session(model_path)
    data = evaluate.load_eval_npz(eval_npz)
    chunked = evaluate.predict_logits(sess, data.inputs, batch_size=7)
    whole = sess.run(None, {"input": data.inputs})[0]
    assert chunked.shape == (40, 10) and evaluate.max_abs_diff(chunked, whole) < 1e-5
    result = evaluate.evaluate_session(sess, data)
    assert result["accuracy"] == evaluate.accuracy(whole, data.labels)
    assert result["agreement"] == evaluate.agreement(whole, data.teacher_predictions)


def test_load_eval_npz_rejects_bad_files(tmp_path, eval_npz):
    data = evaluate.load_eval_npz(eval_npz)
    assert data.inputs.dtype == np.float32 and data.labels.dtype == np.int64 and len(data) == 40
    no_labels = tmp_path / "no_labels.npz"
    np.savez(no_labels, inputs=data.inputs)
    with pytest.raises(RuntimeInputError, match=r"missing key\(s\) \['labels'\]"):
        evaluate.load_eval_npz(no_labels)
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes(eval_npz.read_bytes()[:500])
    with pytest.raises(RuntimeInputError, match="not a readable .npz"):
        evaluate.load_eval_npz(truncated)
    doubles = tmp_path / "doubles.npz"
    np.savez(doubles, inputs=data.inputs.astype(np.float64), labels=data.labels)
    with pytest.raises(RuntimeInputError, match="'inputs' must be float32"):
        evaluate.load_eval_npz(doubles)


def test_peak_memory_exceeds_interpreter_baseline(model_path):
    profile = memory.memory_profile(model_path, threads=1, batch=4)
    assert profile["baseline_bytes"] > 10_000_000  # numpy + onnxruntime alone are tens of MB
    assert profile["peak_bytes"] > profile["baseline_bytes"]
    assert profile["model_increment_bytes"] == profile["peak_bytes"] - profile["baseline_bytes"]


def test_peak_gflops_and_compute_bound():
    assert peak.compute_bound_ms(macs=1e9, batch=2, peak_gflops=100.0) == pytest.approx(40.0)
    assert peak.measure_peak_gflops(1, budget_s=0.1, size=128) > 0


def test_cpu_info_has_stable_keys_and_fingerprint():
    info = cpu.cpu_info()
    assert {"cpu", "cores", "usable_cores", "arch", "os", "flags", "python", "onnxruntime", "numpy",
            "providers"} <= set(info)
    assert set(info["flags"]) == set(cpu.FLAGS_OF_INTEREST)
    assert "CPUExecutionProvider" in info["providers"]
    fingerprint = cpu.environment_fingerprint(info)
    assert fingerprint == cpu.environment_fingerprint(dict(info)) and len(fingerprint) == 16
    assert fingerprint != cpu.environment_fingerprint({**info, "cores": (info["cores"] or 0) + 1})
    json.dumps(info)


def test_parse_cpuinfo_names_arm_cores_and_features():
    raspberry_pi = ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
                    "CPU part\t: 0xd08\n\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
    name, flags, board = cpu._parse_cpuinfo(raspberry_pi)
    assert (name, board) == ("Cortex-A72", "Raspberry Pi 4 Model B Rev 1.4")
    interest = cpu._flags_of_interest(flags, "aarch64")
    assert interest["asimd"] and interest["neon"] and not interest["asimddp"] and not interest["avx2"]
    x86 = "model name\t: Intel Xeon\nmodel\t\t: 85\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_tile\n"
    name, flags, board = cpu._parse_cpuinfo(x86)
    assert (name, board) == ("Intel Xeon", None)
    interest = cpu._flags_of_interest(flags, "x86_64")
    assert interest["avx512_vnni"] and interest["amx"] and not interest["avx_vnni"]


def test_operator_summary_counts_quantized_nodes(tmp_path):
    path = tmp_path / "qdq.onnx"
    onnx.save(tiny_classifier(quantize_input=True), str(path))
    summary = mobile.operator_summary(path)
    assert summary["op_counts"]["QuantizeLinear"] == 1 and summary["quantized_nodes"] == 2
    assert summary["node_count"] == 7 and summary["opsets"] == {"": 17}


def test_check_mobile_usability_parses_the_checker_verdicts(monkeypatch, model_path):
    output = ("INFO:  Model should perform well with NNAPI as is: NO\n"
              "INFO:  Model should perform well with NNAPI if modified to have fixed input shapes: YES\n"
              "INFO:  Model should perform well with CoreML MLProgram as is: MAYBE\n"
              "INFO:  For optimal performance the model should be used with the CPU EP. \n")
    monkeypatch.setattr(mobile, "_run_ort_tool", lambda *a, **k: SimpleNamespace(returncode=0, stdout="", stderr=output))
    result = mobile.check_mobile_usability(model_path)
    assert result["available"] is True
    assert result["verdicts"] == {"NNAPI": {"as_is": "NO", "fixed_shapes": "YES"}, "CoreML MLProgram": {"as_is": "MAYBE"}}
    assert result["recommendation"] == "For optimal performance the model should be used with the CPU EP."


def test_check_mobile_usability_runs_ort_checker_for_real(model_path):
    result = mobile.check_mobile_usability(model_path)
    assert result["available"] is True, result["reason"]
    assert result["verdicts"]["NNAPI"]["as_is"] == "NO"  # dynamic batch: NNAPI needs fixed shapes
    assert result["verdicts"]["NNAPI"]["fixed_shapes"] == "YES"


def test_convert_to_ort_writes_a_model_that_runs_like_the_onnx(tmp_path, model_path):
    target = mobile.convert_to_ort(model_path, tmp_path / "ort")
    assert target == tmp_path / "ort" / "tiny.ort" and sorted(p.name for p in target.parent.iterdir()) == [
        "tiny.ort", "tiny.required_operators.config"]
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    expected = session.open_session(model_path).run(None, {"input": x})[0]
    assert evaluate.max_abs_diff(session.open_session(target).run(None, {"input": x})[0], expected) < 1e-5
    bogus = tmp_path / "bogus.onnx"
    bogus.write_text("nope")
    path, reason = mobile.convert_to_ort_with_reason(bogus, tmp_path / "ort")
    assert path is None and "not an ONNX model" in reason


def test_bench_model_reports_rows_accuracy_and_memory(model_path, eval_npz):
    result = bench_model(model_path, eval_npz, threads=[1, 2], batches=[1, 4], warmup=2, iterations=5,
                         mobile=False)
    json.dumps(result)
    assert {(r["threads"], r["batch"]) for r in result["rows"]} == {(1, 1), (1, 4), (2, 1), (2, 4)}
    data = evaluate.load_eval_npz(eval_npz)
    logits = session.open_session(model_path).run(None, {"input": data.inputs})[0]
    assert result["accuracy"] == evaluate.accuracy(logits, data.labels)
    assert result["agreement"] == evaluate.agreement(logits, data.teacher_predictions)
    assert result["peak_memory_bytes"] > result["memory"]["baseline_bytes"]
    assert result["input"] == {"name": "input", "shape": [None, 1, 28, 28], "dims": ["batch", 1, 28, 28],
                               "dtype": "float32"}
    table = format_table(result)
    assert "p50 ms" in table and "accuracy" in table and table.count("CPU") >= 4


def test_bench_model_skips_batches_a_fixed_batch_model_cannot_take(tmp_path):
    path = tmp_path / "fixed.onnx"
    onnx.save(tiny_classifier(batch=1), str(path))
    result = bench_model(path, threads=[1], batches=[1, 4], warmup=1, iterations=3, mobile=False, memory=False)
    assert [r["batch"] for r in result["rows"]] == [1]
    assert result["accuracy"] is None and "batch 4 skipped" in result["notes"][0]
