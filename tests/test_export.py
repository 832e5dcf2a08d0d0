"""ONNX export: parity with PyTorch (several batch sizes, a pruned model too), metadata, opset handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgekd.errors import InputError, StageFailed
from edgekd.models.cnn import EdgeCNN
from edgekd.stages.export.exporter import (
    INPUT_NAME,
    OUTPUT_NAME,
    build_metadata,
    check_parity,
    count_macs,
    export_onnx,
    parity,
    read_metadata,
)

PREPROCESS = {"layout": "NCHW", "channels": 1, "height": 16, "width": 16, "scale": 1 / 255, "mean": [0.25],
              "std": [0.5], "formula": "input = (pixel * scale - mean[c]) / std[c]", "input_name": "input",
              "output_name": "logits"}


def _tiny_cnn(seed: int = 0, widths: tuple[int, ...] = (8, 16)) -> nn.Module:
    torch.manual_seed(seed)
    model = EdgeCNN(4, 1, 16, widths=widths, blocks=1)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them into Conv matters
        model(torch.randn(64, 1, 16, 16) * 2 + 0.5)
    return model.eval()


def _inputs(n: int = 40, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 16, 16)).astype(np.float32)


class TriuNet(nn.Module):
    """Needs opset 14 (Trilu) with the TorchScript exporter."""

    def __init__(self, num_classes: int = 4, **_: object) -> None:
        super().__init__()
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.triu(x).flatten(1))


def test_export_onnx_matches_pytorch_at_several_batch_sizes(tmp_path: Path) -> None:
    model = _tiny_cnn()
    result = export_onnx(model, torch.from_numpy(_inputs(2)), tmp_path / "m.onnx", opset=17, dynamo=False)
    rows = parity(model, result.path, _inputs(), [1, 7, 64])
    assert [r["batch"] for r in rows] == [1, 7, 64]  # 64 > 40 samples: tiled, not truncated
    assert all(r["max_abs_diff"] <= 1e-4 for r in rows)
    proto = onnx.load(str(result.path))
    assert [i.name for i in proto.graph.input] == [INPUT_NAME] and [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert (result.opset_requested, result.opset_written, result.dynamo) == (17, 17, False)
    assert result.size_bytes == result.path.stat().st_size


def test_export_onnx_pruned_model_keeps_parity(tmp_path: Path) -> None:
    import torch_pruning as tp

    model = _tiny_cnn(widths=(8, 16, 32))
    before = sum(p.numel() for p in model.parameters())
    example = torch.from_numpy(_inputs(2))
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[model.head])
    pruner.step()
    after = sum(p.numel() for p in model.parameters())
    assert after < 0.5 * before
    result = export_onnx(model.eval(), example, tmp_path / "pruned.onnx", opset=17)
    rows = parity(model, result.path, _inputs(), [1, 9])
    assert max(r["max_abs_diff"] for r in rows) <= 1e-4
    conv_out = [init.dims[0] for init in onnx.load(str(result.path)).graph.initializer if len(init.dims) == 4]
    assert conv_out == [4, 8, 16]  # half of (8, 16, 32) channels: the pruned structure is what was exported
    macs, params = count_macs(model, example)
    assert params == after and macs is not None and macs > 0


def test_export_dynamo_without_onnxscript_names_the_extra_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(InputError, match=r"export.dynamo: true needs onnxscript.*pip install 'edgekd\[dynamo\]'"):
        export_onnx(_tiny_cnn(), torch.from_numpy(_inputs(1)), tmp_path / "d.onnx", opset=17, dynamo=True)
    assert not (tmp_path / "d.onnx").exists()


def test_export_onnx_dynamo_records_raised_opset_and_writes_one_file(tmp_path: Path) -> None:
    model = _tiny_cnn()
    result = export_onnx(model, torch.from_numpy(_inputs(1)), tmp_path / "d.onnx", opset=17, dynamo=True)
    assert result.dynamo and result.opset_requested == 17
    assert result.opset_written >= 18  # the dynamo exporter silently targets >= 18
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx"]  # no .onnx.data sidecar
    assert max(r["max_abs_diff"] for r in parity(model, result.path, _inputs(), [1, 5])) <= 1e-4


def test_build_metadata_is_readable_with_onnx_and_onnxruntime(tmp_path: Path) -> None:
    import onnxruntime as ort

    labels = ["cat", "dog", "bird", "fish"]
    metadata = build_metadata(labels=labels, preprocess=PREPROCESS, artifact="student", source_artifact="student.pt",
                              source_sha256="ab" * 32, config_fingerprint="0123456789abcdef")
    path = export_onnx(_tiny_cnn(), torch.from_numpy(_inputs(2)), tmp_path / "s.onnx", opset=17,
                       metadata=metadata).path
    meta = read_metadata(path)
    assert meta["labels"] == labels and meta["num_classes"] == 4
    assert meta["input_name"] == "input" and meta["output_name"] == "logits"
    assert meta["input_layout"] == "NCHW" and meta["input_shape"] == ["batch", 1, 16, 16]
    assert meta["mean"] == [0.25] and meta["std"] == [0.5] and meta["pixel_scale"] == pytest.approx(1 / 255)
    assert meta["source_artifact"] == "student.pt" and meta["config_fingerprint"] == "0123456789abcdef"
    assert meta["preprocess"] == PREPROCESS and meta["edgekd_version"]
    custom = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert custom["labels"] == '["cat", "dog", "bird", "fish"]'


def test_export_onnx_opset_below_model_needs_is_input_error_and_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out" / "triu.onnx"
    with pytest.raises(InputError) as info:
        export_onnx(TriuNet(), torch.from_numpy(_inputs(2)), target, opset=13, name="teacher")
    assert info.value.exit_code == 2
    assert "export.opset: 13" in str(info.value) and "teacher" in str(info.value)
    assert not target.exists() and not any(tmp_path.rglob("*.onnx*"))
    assert export_onnx(TriuNet(), torch.from_numpy(_inputs(2)), target, opset=14).opset_written == 14


def test_check_parity_fails_with_exit_3_naming_every_batch() -> None:
    rows = [{"batch": 1, "max_abs_diff": 2e-5}, {"batch": 7, "max_abs_diff": 3e-3}]
    check_parity(rows, 1e-2, "student")
    with pytest.raises(StageFailed) as info:
        check_parity(rows, 1e-4, "student")
    assert info.value.exit_code == 3
    assert "student" in str(info.value) and "batch 1: 2e-05" in str(info.value) and "batch 7: 0.003" in str(info.value)
    with pytest.raises(StageFailed):
        check_parity([{"batch": 1, "max_abs_diff": float("nan")}], 1e-4, "student")


def test_export_stage_failure_leaves_no_new_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A teacher needing opset 14 exported at opset 13: exit 2, and export wrote nothing into the run dir."""
    from conftest import write_config

    from edgekd.runner.loop import run_pipeline

    checkpoint = tmp_path / "triu.pt"
    torch.save(TriuNet().state_dict(), checkpoint)
    config = write_config(tmp_path, {
        "teacher": {"model": "test_export:TriuNet", "checkpoint": str(checkpoint)},
        "data": {"synthetic": {"num_samples": 120}},
        "distill": None, "prune": None, "quantize": None, "export": {"opset": 13, "ort_format": False},
    })
    with pytest.raises(InputError, match="export.opset: 13"):
        run_pipeline(config)
    run_dir = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in run_dir.iterdir() if p.name != "log.txt") == [
        "manifest.json", "resolved-config.yaml", "teacher.pt"]
