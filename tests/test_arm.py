"""Emulated aarch64 check (edgekd.gate.armcheck): output comparison logic, and a real qemu run on a tiny bundle.

The emulated test builds/uses the cache in $EDGEKD_ARM_CACHE (default ~/.cache/edgekd/arm64); a cold
cache costs about a minute of downloads, a warm run ~20 s. It is skipped, with the reason, only when
ensure_emulator() says the pieces cannot be installed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgekd.gate import armcheck
from edgekd.gate.armcheck import ArmUnavailable, compare_outputs, judge

LABELS = [f"class_{i}" for i in range(10)]


def make_tiny_model(path: Path, channels: int = 3, size: int = 8, classes: int = 10, seed: int = 0) -> None:
    """Conv+Relu+GlobalAveragePool+Flatten+Gemm, `input` [N,C,H,W] (dynamic N) -> `logits` [N,classes]."""
    onnx = pytest.importorskip("onnx")
    from onnx_models import conv_classifier

    rng = np.random.default_rng(seed)
    conv_w, conv_b = rng.normal(0, 0.5, (8, channels, 3, 3)), rng.normal(0, 0.1, 8)
    fc_w, fc_b = rng.normal(0, 1.0, (classes, 8)), rng.normal(0, 0.1, classes)
    onnx.save(conv_classifier(conv_w, conv_b, fc_w.T, fc_b, size), str(path))


def make_bundle(root: Path, samples: int = 64, seed: int = 0) -> Path:
    """A deploy bundle like the pipeline writes: model, labels, preprocess, eval.npz (normalized inputs)."""
    import onnxruntime as ort

    deploy = root / "deploy"
    deploy.mkdir(parents=True, exist_ok=True)
    make_tiny_model(deploy / "model.onnx", seed=seed)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    (deploy / "labels.json").write_text(json.dumps(LABELS))
    (deploy / "preprocess.json").write_text(json.dumps({
        "layout": "NCHW", "channels": 3, "height": 8, "width": 8, "mean": mean, "std": std,
        "scale": 1 / 255, "input_name": "input", "output_name": "logits"}))
    rng = np.random.default_rng(seed + 1)
    # A random colour per sample plus noise: after global average pooling, plain noise would look the same
    # to the model for every sample (one predicted class); per-sample colours spread the predictions.
    colour = rng.integers(0, 256, (samples, 3, 1, 1))
    pixels = np.clip(colour + rng.normal(0, 40, (samples, 3, 8, 8)), 0, 255).round().astype(np.float32)
    inputs = ((pixels / 255 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]).astype(np.float32)
    preds = ort.InferenceSession(str(deploy / "model.onnx")).run(None, {"input": inputs})[0].argmax(1)
    labels = np.where(rng.random(samples) < 0.8, preds, rng.integers(0, 10, samples)).astype(np.int64)
    np.savez(deploy / "eval.npz", inputs=inputs, labels=labels)
    return deploy


def test_compare_outputs_identical_logits_agree_fully_with_zero_diff():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]], dtype=np.float32)
    out = compare_outputs(logits, logits.copy(), np.array([1, 2]))
    assert out["agreement"] == 1.0 and out["max_abs_diff"] == 0.0 and out["mean_abs_diff"] == 0.0
    assert out["x86_accuracy"] == out["arm_accuracy"] == 0.5
    assert out["samples"] == 2 and out["classes"] == 3 and out["finite"] is True


def test_compare_outputs_counts_top1_flips_and_max_abs_diff():
    x86 = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.9], [0.0, 5.0]])
    arm = np.array([[1.0, 0.0], [0.0, 1.0], [1.8, 1.9], [0.0, 5.25]])  # sample 2 flips 0 -> 1
    out = compare_outputs(x86, arm, np.array([0, 1, 0, 1]))
    assert out["agreement"] == 0.75
    assert out["max_abs_diff"] == pytest.approx(0.25)
    assert out["x86_accuracy"] == 1.0 and out["arm_accuracy"] == 0.75
    assert out["max_abs_logit"] == 5.0


def test_compare_outputs_without_labels_reports_no_accuracy():
    out = compare_outputs(np.eye(3), np.eye(3), None)
    assert out["x86_accuracy"] is None and out["arm_accuracy"] is None and out["agreement"] == 1.0


def test_compare_outputs_rejects_shape_mismatch_and_label_count():
    with pytest.raises(ValueError, match="equal"):
        compare_outputs(np.zeros((2, 3)), np.zeros((2, 4)), None)
    with pytest.raises(ValueError, match="labels"):
        compare_outputs(np.zeros((2, 3)), np.zeros((2, 3)), np.array([0]))


def test_judge_fails_on_nan_and_on_large_diff_but_passes_small_fp32_noise():
    base = compare_outputs(np.eye(4), np.eye(4) + 1e-6, None)
    assert judge(base, "fp32")[0] is True
    nan = np.eye(4)
    nan[0, 0] = np.nan
    assert judge(compare_outputs(np.eye(4), nan, None), "fp32")[:2] == (False, "non-finite logits")
    big = compare_outputs(np.eye(4) * 10, np.eye(4) * 10 + 0.5, None)  # same top-1, diff 0.5 > 1e-3 * 10
    passed, reason, tol = judge(big, "fp32")
    assert not passed and "max abs logit diff" in reason and tol["max_abs_diff"] == pytest.approx(0.01)
    assert judge(big, "int8")[0] is True  # int8 allows a quantization step (10% of the logit range)


def test_arm_check_rejects_a_run_dir_without_bundle(tmp_path):
    from edgekd.errors import InputError

    with pytest.raises(InputError, match="model.onnx"):
        armcheck.arm_check(tmp_path)


def test_arm_check_records_unavailable_reason_when_emulation_cannot_be_set_up(tmp_path, monkeypatch):
    make_bundle(tmp_path, samples=4)

    def unavailable(*args, **kwargs):
        raise ArmUnavailable("no qemu here")

    monkeypatch.setattr(armcheck, "ensure_emulator", unavailable)
    with pytest.raises(ArmUnavailable, match="no qemu here"):
        armcheck.arm_check(tmp_path)
    written = json.loads((tmp_path / "arm_check.json").read_text())
    assert written["status"] == "unavailable" and written["reason"] == "no qemu here"
    assert written["schema_version"] == 1 and written["emulated"] is True
    assert "unavailable - no qemu here" in armcheck.summary(written)


@pytest.fixture(scope="module")
def emulator():
    try:
        return armcheck.ensure_emulator()
    except ArmUnavailable as exc:
        pytest.skip(f"emulated aarch64 unavailable: {exc.reason}")


def test_arm_check_emulated_aarch64_matches_x86_on_tiny_model(tmp_path, emulator):
    make_bundle(tmp_path, samples=64)
    result = armcheck.arm_check(tmp_path, samples=48)
    assert emulator.versions["machine"] == "aarch64"
    assert result["emulator"]["machine"] == "aarch64" and result["host"]["machine"] != "aarch64"
    assert result["emulator"]["onnxruntime"] == armcheck.ARM_ORT_VERSION
    cmp_ = result["comparison"]
    assert result["status"] == "passed", result["reason"]
    assert cmp_["samples"] == 48 and cmp_["agreement"] == 1.0 and cmp_["max_abs_diff"] < 1e-4
    assert cmp_["x86_accuracy"] == cmp_["arm_accuracy"] and 0.5 < cmp_["x86_accuracy"] <= 1.0
    on_disk = json.loads((tmp_path / "arm_check.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    text = armcheck.summary(result)
    assert "emulated" in text and "no latency" in text and " ms" not in text and "agreement 1.0000" in text


# A stand-in for the bundle's run_on_device.py with the same flags and device.json shape ("artifacts").
RUNNER = """
import argparse, json, sys
import numpy as np, onnxruntime as ort
p = argparse.ArgumentParser()
for flag in ("--model", "--data", "--out", "--threads", "--batch", "--iterations", "--warmup"):
    p.add_argument(flag)
p.add_argument("--no-memory", action="store_true")
a = p.parse_args()
d = np.load(a.data)
top1 = ort.InferenceSession(a.model).run(None, {"input": d["inputs"]})[0].argmax(1)
json.dump({"artifacts": [{"name": "model", "accuracy": float((top1 == d["labels"]).mean())}]}, open(a.out, "w"))
"""


def test_arm_check_runs_the_bundles_device_runner_under_emulation(tmp_path, emulator):
    deploy = make_bundle(tmp_path, samples=32)
    (deploy / "run_on_device.py").write_text(RUNNER)
    result = armcheck.arm_check(tmp_path)
    runner = result["device_runner"]
    assert result["status"] == "passed", result["reason"]
    assert runner["ok"] and runner["exit_code"] == 0
    assert runner["accuracy"] == pytest.approx(result["comparison"]["arm_accuracy"])
    assert "run_on_device.py: ran, accuracy" in armcheck.summary(result)


def test_arm_check_fails_when_the_device_runner_fails_under_emulation(tmp_path, emulator):
    deploy = make_bundle(tmp_path, samples=8)
    (deploy / "run_on_device.py").write_text("raise SystemExit('boom: unsupported operator')\n")
    result = armcheck.arm_check(tmp_path / "deploy")  # the deploy folder itself is accepted too
    assert result["comparison"]["agreement"] == 1.0  # the model itself is fine ...
    assert result["status"] == "failed" and "boom: unsupported operator" in result["reason"]  # ... the runner not
    assert result["device_runner"]["exit_code"] == 1 and not result["device_runner"]["ok"]
    assert json.loads((tmp_path / "arm_check.json").read_text())["status"] == "failed"


def test_cli_arm_check_exit_codes_for_bad_input_and_unavailable_emulation(tmp_path, monkeypatch):
    click_testing = pytest.importorskip("click.testing")
    from edgekd.cli import main

    runner = click_testing.CliRunner()
    missing = runner.invoke(main, ["arm-check", str(tmp_path)])
    assert missing.exit_code == 2 and "model.onnx" in missing.output
    make_bundle(tmp_path, samples=4)

    def unavailable(*args, **kwargs):
        raise ArmUnavailable("qemu cannot be installed")

    monkeypatch.setattr(armcheck, "ensure_emulator", unavailable)
    failed = runner.invoke(main, ["arm-check", str(tmp_path)])
    assert failed.exit_code == 3 and "qemu cannot be installed" in failed.output
    skipped = runner.invoke(main, ["arm-check", str(tmp_path), "--skip-unavailable"])
    assert skipped.exit_code == 0 and "arm-check skipped: qemu cannot be installed" in skipped.output


def test_arm_check_reports_a_model_onnxruntime_cannot_run_as_bad_input(tmp_path):
    from edgekd.errors import InputError

    deploy = make_bundle(tmp_path, samples=4)
    (deploy / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(InputError, match="onnxruntime cannot run it"):
        armcheck.arm_check(tmp_path)
    (deploy / "eval.npz").write_bytes(b"junk")
    with pytest.raises(InputError, match="eval.npz"):
        armcheck.arm_check(tmp_path)
