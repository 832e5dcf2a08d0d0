"""The benchmark stage on a hand-made run directory: teacher/student ONNX exported from tiny CNNs, an int8
model, eval.npz and the export/quantize metrics the earlier stages record."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from conftest import TINY_CONFIG, deep_merge, run_stage  # noqa: E402
from edgekd.stages.benchmark import measure as bm  # noqa: E402
from edgekd.config import validate_config  # noqa: E402
from edgekd.models import count_parameters, create_model, model_meta  # noqa: E402
from edgekd.models.checkpoint import save_checkpoint  # noqa: E402
from edgekd.stages import benchmark  # noqa: E402

NUM_CLASSES, SIZE = 4, 16
THREADS, BATCHES = [1, 2], [1, 3]


def _export(model: Any, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is legacy
        torch.onnx.export(model, (torch.zeros(1, 1, SIZE, SIZE),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _quantize(source: Path, target: Path, images: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": images[i:i + 1]} for i in range(8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=False,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """teacher.pt/.onnx (cnn_small), student.pt/.onnx (cnn_tiny), model.int8.onnx, eval.npz, no manifest."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((20, 1, SIZE, SIZE)).astype(np.float32)
    for name, spec in (("teacher", "cnn_small"), ("student", "cnn_tiny")):
        model = create_model(spec, num_classes=NUM_CLASSES, in_channels=1, input_size=SIZE).eval()
        save_checkpoint(model, folder / f"{name}.pt", model_meta(spec, {}, name))
        _export(model, folder / f"{name}.onnx")
        if name == "teacher":
            with torch.inference_mode():
                teacher_predictions = model(torch.from_numpy(images)).argmax(-1).numpy()
    _quantize(folder / "student.onnx", folder / "model.int8.onnx", images)
    np.savez(folder / "eval.npz", inputs=images, labels=rng.integers(0, NUM_CLASSES, 20).astype(np.int64),
             teacher_predictions=teacher_predictions.astype(np.int64))
    return folder


def _manifest(run_dir: Path) -> dict[str, Any]:
    def info(name: str, spec: str) -> dict[str, Any]:
        model = create_model(spec, num_classes=NUM_CLASSES, in_channels=1, input_size=SIZE)
        return {"path": f"{name}.onnx", "params": count_parameters(model), "macs": 50_000}

    return {"schema_version": 1, "stages": {
        "teacher": {"status": "done", "artifacts": {"teacher.pt": "-"},
                    "metrics": {"data": {"num_classes": NUM_CLASSES, "input_shape": [1, SIZE, SIZE]}}},
        "distill": {"status": "done", "artifacts": {"student.pt": "-"}, "metrics": {}},
        "export": {"status": "done", "artifacts": {"teacher.onnx": "-", "student.onnx": "-", "eval.npz": "-"},
                   "metrics": {"models": {"teacher": info("teacher", "cnn_small"), "student": info("student", "cnn_tiny")}}},
        "quantize": {"status": "done", "artifacts": {"model.int8.onnx": "-"},
                     "metrics": {"artifact_name": "int8", "source": "student", "path": "model.int8.onnx"}},
    }}


def _config(run_dir: Path, budgets: dict[str, Any] | None = None, **benchmark_options: Any) -> Any:
    options = {"threads": THREADS, "batch_sizes": BATCHES, "warmup": 1, "iterations": 5, "chunk": 2,
               "memory": False, "torch_reference": False, **benchmark_options}
    raw = deep_merge(TINY_CONFIG, {"output_dir": str(run_dir), "benchmark": options, "budgets": budgets or {}})
    return validate_config(raw, base_dir=run_dir)


@pytest.fixture(scope="module")
def metrics(run_dir, tmp_path_factory) -> dict[str, Any]:
    """One full stage run (memory, torch reference and mobile checks on) shared by the assertions below."""
    cfg = _config(run_dir, memory=True, torch_reference=True)
    result = run_stage(benchmark, cfg, _manifest(run_dir))
    assert result.artifacts == []  # metrics only: the stage writes no files
    return result.metrics


def test_benchmark_gives_one_row_per_artifact_teacher_first(metrics):
    rows = metrics["artifacts"]
    assert [(r["name"], r["kind"], r["path"]) for r in rows] == [
        ("teacher", "fp32", "teacher.onnx"), ("student", "fp32", "student.onnx"), ("int8", "int8", "model.int8.onnx")]
    student, int8 = rows[1], rows[2]
    assert (int8["params"], int8["macs"]) == (student["params"], student["macs"])  # inherited from the source
    assert all(len(r["sha256"]) == 64 and r["size_bytes"] > 0 for r in rows)
    assert metrics["budget_setting"] == {"threads": 1, "batch": 1}


def test_benchmark_measures_every_threads_and_batch_with_ordered_percentiles(metrics):
    for row in metrics["artifacts"]:
        settings = sorted((r["threads"], r["batch"]) for r in row["latency_ms"])
        assert settings == [(t, b) for t in THREADS for b in BATCHES], row["name"]
        for entry in row["latency_ms"]:
            assert 0 < entry["min"] <= entry["p50"] <= entry["p90"] <= entry["p99"] <= entry["max"]
            assert entry["iterations"] == 5 and entry["throughput_ips"] > 0
        assert len(row["latency_samples_ms"]) == 5 and row["latency_samples_setting"] == {"threads": 1, "batch": 1}
        assert row["throughput_ips"] == next(r["throughput_ips"] for r in row["latency_ms"] if (r["threads"], r["batch"]) == (1, 3))
        assert row["first_run_ms"] > 0 and row["session_create_ms"] > 0
        assert row["providers"] == ["CPUExecutionProvider"]


def test_benchmark_reports_accuracy_and_teacher_agrees_with_itself(metrics):
    rows = {r["name"]: r for r in metrics["artifacts"]}
    assert rows["teacher"]["agreement"] == 1.0
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["agreement"] <= 1.0


def test_benchmark_gives_compute_bound_and_overhead(metrics):
    peaks = metrics["environment"]["peak_gflops"]
    assert set(peaks) == {"1", "2"} and all(v > 0 for v in peaks.values())
    for row in metrics["artifacts"]:
        assert row["compute_bound_ms"] == pytest.approx(2 * 50_000 / (peaks["1"] * 1e9) * 1e3)
        p50 = next(r["p50"] for r in row["latency_ms"] if (r["threads"], r["batch"]) == (1, 1))
        assert row["overhead_factor"] == pytest.approx(p50 / row["compute_bound_ms"])
        assert all(r["compute_bound_ms"] > 0 for r in row["latency_ms"])


def test_benchmark_records_environment_memory_mobile_and_torch_reference(metrics):
    env = metrics["environment"]
    assert env["torch"] == torch.__version__ and env["threads_measured"] == THREADS and len(env["fingerprint"]) == 16
    assert set(env["peak_gflops_measured"]) == {"1", "2"}
    assert {"cpu", "cores", "arch", "onnxruntime", "python"} <= set(env)
    assert all(r["peak_memory_bytes"] > 0 for r in metrics["artifacts"])
    # int8 plus the smallest fp32 model (the student here), nothing else: bounds the stage's run time
    assert set(metrics["mobile"]) == {"student", "int8"}
    assert metrics["mobile"]["int8"]["operators"]["quantized_nodes"] > 0
    assert isinstance(metrics["mobile"]["int8"]["ort_conversion"]["ok"], bool)
    reference = metrics["torch_reference"]
    assert sorted({(r["name"], r["threads"], r["batch"]) for r in reference}) == sorted(
        (n, t, b) for n in ("teacher", "student") for t in THREADS for b in BATCHES)
    assert all(0 < r["p50"] <= r["p90"] <= r["p99"] for r in reference)
    assert torch.get_num_threads() >= 1


def test_benchmark_leaves_out_int8_when_quantize_is_off(run_dir, monkeypatch):
    monkeypatch.setattr(bm, "mobile_readiness", lambda artifact: {"stub": artifact.name})
    cfg = _config(run_dir, {"latency_batch": 2}, threads=[1], batch_sizes=[2])
    cfg.quantize = None
    manifest = _manifest(run_dir)
    del manifest["stages"]["quantize"]
    metrics = run_stage(benchmark, cfg, manifest).metrics
    assert [r["name"] for r in metrics["artifacts"]] == ["teacher", "student"]
    assert metrics["torch_reference"] == [] and metrics["mobile"] == {"student": {"stub": "student"}}
    # no batch-1 measurement: samples come from the budget setting, the overhead factor is unknown
    student = metrics["artifacts"][1]
    assert student["latency_samples_setting"] == {"threads": 1, "batch": 2} and student["overhead_factor"] is None
    assert student["compute_bound_ms"] > 0 and student["peak_memory_bytes"] is None
    assert benchmark.plan(cfg).depends_on == ("export",)


def test_config_view_and_dependencies_follow_the_config(run_dir):
    cfg = _config(run_dir)
    plan = benchmark.plan(cfg)
    assert plan.depends_on == ("export", "quantize")
    view = plan.view
    assert view["benchmark"]["threads"] == THREADS and view["budgets"] == {"latency_threads": 1, "latency_batch": 1}


def test_benchmark_rejects_an_unknown_provider_as_bad_input_before_measuring(run_dir):
    from edgekd.errors import InputError

    cfg = _config(run_dir, providers=["warpdrive"])
    with pytest.raises(InputError, match="benchmark.providers: execution provider 'warpdrive' is not available") as info:
        run_stage(benchmark, cfg, _manifest(run_dir))
    assert info.value.exit_code == 2


def test_measure_peaks_never_lets_more_threads_lower_the_floor(monkeypatch):
    from edgekd.runtime import peak

    measured = {1: 60.0, 2: 25.0, 4: 150.0}  # 2 threads calibrated while a neighbour was busy
    monkeypatch.setattr(peak, "measure_peak_gflops", lambda threads: measured[threads])
    used, raw = bm.measure_peaks([2, 1, 4])
    assert raw == {"1": 60.0, "2": 25.0, "4": 150.0}
    assert used == {"1": 60.0, "2": 60.0, "4": 150.0}
