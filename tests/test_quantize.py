"""int8 quantization: calibration data, QDQ/QOperator/dynamic graphs, exclusions, CPU choice, fallback, runner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.stages.quantize import quantization as qz
from edgekd.data.config import DataConfig
from edgekd.data.bundle import load_data
from edgekd.errors import InputError
from edgekd.models.cnn import EdgeCNN
from edgekd.stages.export.exporter import export_onnx
from edgekd.stages.quantize.stage import calibration_inputs, fallback_decision, resolve_source


@pytest.fixture(scope="module")
def data():
    cfg = DataConfig(dataset="synthetic", synthetic={"num_samples": 480, "image_size": 16})
    return load_data(cfg, seed=0)


@pytest.fixture(scope="module")
def prepared(data, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A briefly trained ~24k-parameter CNN, exported and pre-processed for quantization."""
    torch.manual_seed(0)
    model = EdgeCNN(data.meta.num_classes, 1, 16, widths=(16, 32, 64), blocks=1)
    x_train, y_train = (torch.from_numpy(a) for a in data.normalized("train"))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(3):
        for start in range(0, len(x_train), 32):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x_train[start:start + 32]), y_train[start:start + 32]).backward()
            optimizer.step()
    folder = tmp_path_factory.mktemp("quant")
    fp32 = export_onnx(model.eval(), x_train[:2], folder / "fp32.onnx", opset=17).path
    pre = folder / "pre.onnx"
    qz.preprocess(fp32, pre)
    calib = calibration_inputs(data, 64, seed=0)
    val_x, val_y = data.normalized("val")
    test_x, _ = data.normalized("test")
    samples = np.concatenate([val_x, test_x])
    return {"folder": folder, "fp32": fp32, "pre": pre, "calib": calib, "samples": samples,
            "fp32_pred": qz.predictions(fp32, samples), "val": (val_x, val_y)}


def _image_keys(array: np.ndarray) -> set[bytes]:
    return {np.ascontiguousarray(sample).tobytes() for sample in array}


def test_calibration_reader_yields_exactly_n_training_samples_none_from_test(data) -> None:
    calib = calibration_inputs(data, 50, seed=3)
    reader = qz.ArrayCalibrationReader(calib, batch_size=16)
    batches = list(iter(reader.get_next, None))
    assert [len(b["input"]) for b in batches] == [16, 16, 16, 2] and reader.samples_yielded == 50
    assert reader.get_next() is None and reader.fresh().samples_yielded == 0  # a drained reader stays empty
    yielded = _image_keys(np.concatenate([b["input"] for b in batches]))
    assert len(yielded) == 50
    assert yielded <= _image_keys(data.normalized("train")[0])
    assert not yielded & _image_keys(data.normalized("test")[0])
    assert not yielded & _image_keys(data.normalized("val")[0])
    np.testing.assert_array_equal(calib, calibration_inputs(data, 50, seed=3))  # deterministic per seed
    assert not np.array_equal(calib, calibration_inputs(data, 50, seed=4))
    assert len(calibration_inputs(data, 10**6, seed=3)) == len(data.train)  # capped at the split


def test_calibration_reader_refuses_an_empty_set() -> None:
    with pytest.raises(InputError, match="no calibration samples") as info:
        qz.ArrayCalibrationReader(np.zeros((0, 1, 16, 16), np.float32))
    assert info.value.exit_code == 2


def test_quantize_static_qdq_is_smaller_has_qdq_nodes_and_agrees_with_fp32(prepared: dict) -> None:
    target = prepared["folder"] / "qdq.onnx"
    settings = qz.QuantSettings(format="qdq", per_channel=True, activation_type="uint8", weight_type="int8")
    options = qz.quantize_model(prepared["pre"], target, settings, qz.ArrayCalibrationReader(prepared["calib"]))
    assert options["quant_format"] == "qdq" and options["calibrate_method"] == "minmax"
    counts = qz.op_counts(target)
    weighted = counts.get("Conv", 0) + counts.get("Gemm", 0) + counts.get("MatMul", 0)
    assert weighted == 4
    assert counts["DequantizeLinear"] >= 2 * weighted  # each weighted op: its input and its weight dequantized
    assert counts["QuantizeLinear"] >= weighted
    assert target.stat().st_size < 0.45 * prepared["fp32"].stat().st_size
    agreement = np.mean(qz.predictions(target, prepared["samples"]) == prepared["fp32_pred"])
    assert agreement >= 0.97


def test_quantize_static_qoperator_uses_qlinear_ops(prepared: dict) -> None:
    target = prepared["folder"] / "qop.onnx"
    # 16 batches of 4: a batch count that once lost all calibration data (see quantize_model)
    qz.quantize_model(prepared["pre"], target, qz.QuantSettings(format="qoperator"),
                      qz.ArrayCalibrationReader(prepared["calib"], batch_size=4))
    counts = qz.op_counts(target)
    assert counts.get("QLinearConv") == 3 and "Conv" not in counts
    assert np.mean(qz.predictions(target, prepared["samples"]) == prepared["fp32_pred"]) >= 0.97


def test_quantize_dynamic_mode_quantizes_weights_without_calibration(prepared: dict) -> None:
    target = prepared["folder"] / "dyn.onnx"
    qz.quantize_model(prepared["pre"], target, qz.QuantSettings(mode="dynamic", weight_type="uint8"), None)
    counts = qz.op_counts(target)
    assert counts.get("DynamicQuantizeLinear", 0) >= 1 and counts.get("ConvInteger", 0) == 3
    assert target.stat().st_size < 0.45 * prepared["fp32"].stat().st_size
    assert np.mean(qz.predictions(target, prepared["samples"]) == prepared["fp32_pred"]) >= 0.97


def test_quantize_model_keeps_excluded_nodes_in_float(prepared: dict) -> None:
    first, last = qz.edge_layers(prepared["pre"])
    qz.validate_exclusions(prepared["pre"], [first, last], [])
    target = prepared["folder"] / "edges.onnx"
    qz.quantize_model(prepared["pre"], target, qz.QuantSettings(exclude_nodes=(first, last)),
                      qz.ArrayCalibrationReader(prepared["calib"]))
    nodes = {n.name: n for n in qz.graph_nodes(target)}
    producers = {out: n.op_type for n in nodes.values() for out in n.output}
    for name in (first, last):
        assert producers.get(nodes[name].input[1]) != "DequantizeLinear"  # float weight, straight from the file
    middle = [n for n in nodes.values() if n.op_type == "Conv" and n.name != first]
    assert middle and all(producers.get(n.input[1]) == "DequantizeLinear" for n in middle)


def test_validate_exclusions_unknown_node_is_input_error_listing_valid_names(prepared: dict) -> None:
    first, _ = qz.edge_layers(prepared["pre"])
    with pytest.raises(InputError) as info:
        qz.validate_exclusions(prepared["pre"], ["conv1", first], [])
    assert info.value.exit_code == 2
    assert "'conv1'" in str(info.value) and first in str(info.value) and "quantize.exclude_nodes" in str(info.value)
    with pytest.raises(InputError, match="quantize.exclude_op_types: 'Softmax'"):
        qz.validate_exclusions(prepared["pre"], [], ["Softmax"])


@pytest.mark.parametrize(("arch", "flags", "expected"), [
    ("x86_64", {"avx2": True, "avx512f": True, "avx512_vnni": True}, ("uint8", False)),
    ("x86_64", {"avx2": True, "avx512_vnni": False, "avx_vnni": False}, ("uint8", True)),
    ("aarch64", {"asimd": True, "asimddp": True}, ("int8", False)),
    (None, {}, ("uint8", True)),
])
def test_choose_for_cpu_resolves_auto_from_flags(arch: str | None, flags: dict, expected: tuple) -> None:
    act, reduce, why = qz.choose_for_cpu("auto", "auto", "int8", {"arch": arch, "flags": flags})
    assert (act, reduce) == expected and why
    assert qz.choose_for_cpu("int8", False, "int8", {"arch": arch, "flags": flags})[:2] == ("int8", False)
    assert qz.choose_for_cpu("auto", "auto", "uint8", {"arch": arch, "flags": flags})[0] == "uint8"


def test_settings_int8_activations_with_uint8_weights_is_input_error() -> None:
    with pytest.raises(InputError, match="quantize.weight_type"):
        qz.QuantSettings(activation_type="int8", weight_type="uint8").check()


def test_fallback_triggers_when_measured_drop_exceeds_a_tiny_tolerance(prepared: dict) -> None:
    """A deliberately coarse int8 model (per-tensor, 7-bit weights) loses some top-1 decisions on noise."""
    target = prepared["folder"] / "coarse.onnx"
    qz.quantize_model(prepared["pre"], target, qz.QuantSettings(per_channel=False, reduce_range=True),
                      qz.ArrayCalibrationReader(prepared["calib"]))
    noise = np.random.default_rng(0).standard_normal((2000, 1, 16, 16)).astype(np.float32) * 3
    labels = qz.predictions(prepared["fp32"], noise)  # fp32 scores 100 % on its own decisions
    drop = 1.0 - float(np.mean(qz.predictions(target, noise) == labels))
    assert drop > 0
    deployable, reason, warning = fallback_decision(drop, 0.0, True, "student")
    assert not deployable and "student fp32 stays the deployable candidate" in reason and warning is None
    assert fallback_decision(drop, 0.0, False, "student")[0] is True  # fallback off: kept, with a warning
    assert fallback_decision(drop, 1.0, True, "student") == (True, None, None)


def test_resolve_source_prefers_the_last_model_of_the_chain() -> None:
    assert resolve_source("auto", {"teacher": {}, "student": {}, "pruned": {}}) == "pruned"
    assert resolve_source("auto", {"teacher": {}, "student": {}}) == "student"
    assert resolve_source("auto", {"teacher": {}}) == "teacher"
    with pytest.raises(InputError, match="quantize.source: 'pruned'"):
        resolve_source("pruned", {"teacher": {}})


def test_pipeline_teacher_export_quantize_writes_artifacts_and_metrics(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """distill and prune off; benchmark/report not selected: teacher -> export -> quantize only."""
    from conftest import write_config

    from edgekd.runner import loop as pipeline
    from edgekd.stages.export.exporter import read_metadata

    config = write_config(tmp_path, {
        "data": {"synthetic": {"num_samples": 240}}, "teacher": {"train": {"epochs": 1}},
        "distill": None, "prune": None, "export": {"ort_format": True},
        "quantize": {"calibration": {"samples": 40}, "search": True},
    })
    outcome = pipeline.run_pipeline(config, only=["teacher", "export", "quantize"])
    assert outcome.ran == ["teacher", "export", "quantize"]
    run_dir = outcome.run_dir
    for name in ("teacher.onnx", "model.int8.onnx", "eval.npz", "val.npz"):
        assert (run_dir / name).is_file(), name
    with np.load(run_dir / "eval.npz") as archive:
        assert archive["inputs"].dtype == np.float32 and archive["inputs"].shape[1:] == (1, 16, 16)
        assert archive["labels"].dtype == np.int64 and archive["teacher_predictions"].dtype == np.int64
        assert len(archive["labels"]) == outcome.manifest.metrics("teacher")["data"]["split_sizes"]["test"]
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    export, quant = stages["export"]["metrics"], stages["quantize"]["metrics"]
    teacher = export["models"]["teacher"]
    assert teacher["opset_written"] == 17 and teacher["params"] > 0 and teacher["macs"] > 0
    assert [r["batch"] for r in teacher["parity"]] == [1, 7, 64]
    assert (teacher["ort_path"] is not None) == (run_dir / "teacher.ort").is_file()
    assert teacher["ort_path"] or teacher["ort_error"]
    assert quant["source"] == "teacher" and quant["artifact_name"] == "int8" and quant["calibration"]["split"] == "train"
    assert quant["calibration"]["samples_used"] == 40
    assert set(stages["quantize"]["artifacts"]) >= {"model.int8.onnx"}
    assert quant["deployable"] == (quant["accuracy_drop"] <= 0.01) and quant["cpu_flags"]["why"]
    attempts = quant["attempts"]
    assert attempts[0]["label"] == "configured" and all({"settings", "size_bytes", "p50_ms", "val_accuracy",
                                                          "agreement"} <= set(a) for a in attempts if not a["error"])
    if attempts[0]["speedup"] <= 1.0:  # not faster: the search must have tried the alternatives
        assert len(attempts) >= 5
    meta = read_metadata(run_dir / "model.int8.onnx")
    assert meta["artifact"] == "int8" and meta["source_artifact"] == "teacher.onnx" and len(meta["labels"]) == 4
    # Switching to dynamic int8 reruns only the quantize stage (teacher and export are cached).
    config = write_config(tmp_path, {
        "data": {"synthetic": {"num_samples": 240}}, "teacher": {"train": {"epochs": 1}},
        "distill": None, "prune": None, "export": {"ort_format": True},
        "quantize": {"mode": "dynamic", "search": False},
    })
    outcome = pipeline.run_pipeline(config, only=["teacher", "export", "quantize"])
    assert outcome.ran == ["quantize"] and outcome.skipped == ["teacher", "export"]
    quant = outcome.manifest.metrics("quantize")
    assert quant["mode"] == "dynamic" and quant["artifact_name"] == "int8_dynamic" and "calibration" not in quant
    assert len(quant["attempts"]) == 1 and quant["chosen"]["mode"] == "dynamic"
    assert read_metadata(run_dir / "model.int8.onnx")["artifact"] == "int8_dynamic"
    assert quantized_ops(run_dir / "model.int8.onnx") > 0


def quantized_ops(path: Path) -> int:
    return qz.quantized_node_count(qz.op_counts(path))
