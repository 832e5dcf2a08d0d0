"""A teacher from any framework (`teacher.onnx`): ONNX Runtime behind a torch module gives the same soft
targets as the torch model it was exported from, NCHW or NHWC, logits or softmax output; distillation from it
learns like distillation from the torch teacher; malformed files are refused before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from teacher_models import Features, NHWCInput, TwoInputs, export

from edgekd.config import validate_config
from edgekd.data.bundle import load_data
from edgekd.errors import ConfigError, InputError
from edgekd.models import create_model
from edgekd.models.onnx_teacher import OnnxTeacher, inspect_onnx_teacher, nchw_copy
from edgekd.train.loop import accuracy, fit, predict
from edgekd.train.objectives import make_kd_objective

CPU = torch.device("cpu")
CLASSES, SIZE = 4, 12
SHAPE = dict(channels=1, height=SIZE, width=SIZE, num_classes=CLASSES)


def _raw(**distill: Any) -> dict[str, Any]:
    return {
        "name": "onnx-teacher", "seed": 0, "device": "cpu",
        "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 256,
                 "synthetic": {"num_samples": 400, "num_classes": CLASSES, "image_size": SIZE, "noise": 0.6}},
        "teacher": {"model": "cnn", "model_kwargs": {"widths": [16, 32], "blocks": 1},
                    "train": {"epochs": 2, "lr": 0.01, "augment": False, "bn_recalibration_batches": 0}},
        "student": {"model": "cnn", "model_kwargs": {"widths": [8, 16], "blocks": 1}},
        "distill": {"epochs": 3, "lr": 0.02, "augment": False, "baseline": False, "bn_recalibration_batches": 0,
                    **distill},
        "prune": None, "quantize": None,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trained torch teacher and its ONNX exports: NCHW logits, NHWC softmax (Keras-like)."""
    cfg = validate_config(_raw())
    data = load_data(cfg.data, seed=0)
    torch.manual_seed(0)
    teacher = create_model(cfg.teacher.model, num_classes=CLASSES, in_channels=1, input_size=SIZE,
                           kwargs=cfg.teacher.model_kwargs)
    fit(teacher, data, cfg.teacher.train, device=CPU, seed=0, batch_size=32, log=lambda _: None)
    teacher.eval()
    folder = tmp_path_factory.mktemp("onnx-teachers")
    example = torch.zeros(2, 1, SIZE, SIZE)
    return {
        "cfg": cfg, "data": data, "teacher": teacher,
        "nchw": export(teacher, folder / "nchw.onnx", example),
        "nhwc": export(NHWCInput(teacher, softmax=True), folder / "nhwc.onnx", example.permute(0, 2, 3, 1)),
        "folder": folder,
    }


def _inputs(trained: dict[str, Any]) -> torch.Tensor:
    x, _ = trained["data"].normalized("val")
    return torch.from_numpy(x[:50])


def test_onnx_teacher_gives_the_torch_teachers_logits(trained: dict[str, Any]) -> None:
    info = inspect_onnx_teacher(trained["nchw"], **SHAPE)
    assert (info.layout, info.output_kind, info.fixed_batch, info.input_name) == ("NCHW", "logits", None, "image")
    onnx_teacher = OnnxTeacher(trained["nchw"], info)
    x = _inputs(trained)
    with torch.no_grad():
        expected = trained["teacher"](x)
    got = onnx_teacher(x)
    assert got.dtype == torch.float32 and got.shape == (len(x), CLASSES) and not got.requires_grad
    assert torch.allclose(got, expected, atol=1e-4)
    torch_params = sum(p.numel() for p in trained["teacher"].parameters())
    assert 0.95 * torch_params <= onnx_teacher.num_parameters <= torch_params  # BatchNorm is folded into the convs


def test_nhwc_softmax_teacher_is_transposed_and_its_probabilities_read_as_log_probabilities(
        trained: dict[str, Any]) -> None:
    info = inspect_onnx_teacher(trained["nhwc"], **SHAPE)
    assert (info.layout, info.output_kind) == ("NHWC", "probabilities")
    assert info.adaptations() == ["NHWC input: the NCHW batch is transposed to NHWC",
                                  "softmax output: log-probabilities are used as logits"]
    x = _inputs(trained)
    with torch.no_grad():
        expected = torch.log_softmax(trained["teacher"](x), dim=1)  # logits up to a per-sample constant
    got = OnnxTeacher(trained["nhwc"], info)(x)
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_nchw_copy_of_an_nhwc_teacher_takes_nchw_batches_with_the_same_outputs(trained: dict[str, Any],
                                                                                tmp_path: Path) -> None:
    info = inspect_onnx_teacher(trained["nhwc"], **SHAPE)
    nchw_copy(trained["nhwc"], tmp_path / "teacher.onnx", info)
    copy_info = inspect_onnx_teacher(tmp_path / "teacher.onnx", **SHAPE)
    assert copy_info.layout == "NCHW" and copy_info.input_shape[1:] == (1, SIZE, SIZE)
    x = _inputs(trained).numpy()
    original = ort.InferenceSession(str(trained["nhwc"])).run(None, {"image": x.transpose(0, 2, 3, 1)})[0]
    copied = ort.InferenceSession(str(tmp_path / "teacher.onnx")).run(None, {"image_nchw": x})[0]
    np.testing.assert_array_equal(copied, original)
    nchw_copy(trained["nchw"], tmp_path / "same.onnx", inspect_onnx_teacher(trained["nchw"], **SHAPE))
    assert (tmp_path / "same.onnx").read_bytes() == trained["nchw"].read_bytes()  # copied as given


def test_distillation_from_the_onnx_teacher_matches_distillation_from_the_torch_teacher(
        trained: dict[str, Any]) -> None:
    """Same student init, seed, data and schedule; the cached teacher-logit path (augment off) runs through the
    ONNX module. Logits agree to ~1e-6, so the two students end within a hair of each other."""
    cfg, data = trained["cfg"], trained["data"]
    results = {}
    for name, teacher in (("torch", trained["teacher"]),
                          ("onnx", OnnxTeacher(trained["nhwc"], inspect_onnx_teacher(trained["nhwc"], **SHAPE)))):
        torch.manual_seed(1)
        student = create_model(cfg.student.model, num_classes=CLASSES, in_channels=1, input_size=SIZE,
                               kwargs=cfg.student.model_kwargs)
        objective = make_kd_objective(cfg.distill.kd(), teacher, data, CPU, augment=False)
        assert objective.cache is not None
        fit(student, data, cfg.distill, device=CPU, seed=0, objective=objective, batch_size=32, log=lambda _: None)
        assert objective.cache.stats()["hits"] > 0
        results[name] = (accuracy(predict(student, data.test, data, CPU), data.test.labels), student)
    torch_accuracy, torch_student = results["torch"]
    onnx_accuracy, onnx_student = results["onnx"]
    assert onnx_accuracy > 1.5 / CLASSES  # well above chance (0.25)
    assert abs(onnx_accuracy - torch_accuracy) <= 0.02, (onnx_accuracy, torch_accuracy)
    torch_state = torch_student.state_dict()
    worst = max(float((v.float() - torch_state[k].float()).abs().max()) for k, v in onnx_student.state_dict().items())
    assert worst < 1e-2, worst


# --------------------------------------------------------------------------------------------------
# Refused files (unit level; tests/test_bad_inputs_models.py runs them through the command line)


def test_refuses_two_inputs(trained: dict[str, Any], tmp_path: Path) -> None:
    x = torch.zeros(2, 1, SIZE, SIZE)
    path = export(TwoInputs(trained["teacher"]), tmp_path / "two.onnx", (x, x))
    with pytest.raises(InputError, match=r"^teacher\.onnx: two\.onnx has 2 inputs \(image \[batch, 1, 12, 12\], "
                                         r"mask \[batch, 1, 12, 12\]\); a teacher takes one image batch"):
        inspect_onnx_teacher(path, **SHAPE)


def test_refuses_feature_maps_and_the_wrong_class_count(trained: dict[str, Any], tmp_path: Path) -> None:
    path = export(Features(trained["teacher"]), tmp_path / "features.onnx", torch.zeros(2, 1, SIZE, SIZE))
    with pytest.raises(InputError, match=r"^teacher\.onnx: features\.onnx's output 'scores' is \[batch, 16, 12, 12\]; "
                                         r"a teacher gives logits \[batch, 4\]"):
        inspect_onnx_teacher(path, **SHAPE)
    with pytest.raises(InputError, match=r"output 'scores' is \[batch, 4\]; a teacher gives logits \[batch, 10\] "
                                         r"\(one score per class of the data\)"):
        inspect_onnx_teacher(trained["nchw"], **{**SHAPE, "num_classes": 10})


def test_explains_a_size_or_channel_mismatch_with_the_data(trained: dict[str, Any], tmp_path: Path) -> None:
    path = export(trained["teacher"], tmp_path / "fixed.onnx", torch.zeros(1, 1, SIZE, SIZE), dynamic_batch=False)
    with pytest.raises(InputError, match=r"^teacher\.onnx: fixed\.onnx's input 'image' \[1, 1, 12, 12\] \(NCHW\) takes "
                                         r"12x12 images, the data's preprocessing gives 16x16: set data\.crop \(or data\.image_size\)"):
        inspect_onnx_teacher(path, **{**SHAPE, "height": 16, "width": 16})
    with pytest.raises(InputError, match=r"takes 1 channel\(s\), the data has 3"):
        inspect_onnx_teacher(path, **{**SHAPE, "channels": 3})
    nhwc = export(NHWCInput(trained["teacher"]), tmp_path / "nhwc_fixed.onnx", torch.zeros(1, SIZE, SIZE, 1),
                  dynamic_batch=False)
    with pytest.raises(InputError, match=r"\[1, 12, 12, 1\] \(NHWC\) takes 12x12 images, the data's preprocessing gives 16x16"):
        inspect_onnx_teacher(nhwc, **{**SHAPE, "height": 16, "width": 16})
    assert inspect_onnx_teacher(path, **SHAPE).fixed_batch == 1


def test_fixed_batch_teacher_runs_any_batch_size(trained: dict[str, Any], tmp_path: Path) -> None:
    path = export(trained["teacher"], tmp_path / "fixed.onnx", torch.zeros(1, 1, SIZE, SIZE), dynamic_batch=False)
    x = _inputs(trained)[:5]
    with torch.no_grad():
        expected = trained["teacher"](x)
    assert torch.allclose(OnnxTeacher(path, inspect_onnx_teacher(path, **SHAPE))(x), expected, atol=1e-4)


def test_config_refuses_hints_pruning_and_other_sources_with_an_onnx_teacher(tmp_path: Path) -> None:
    (tmp_path / "t.onnx").write_bytes(b"x")
    base = {**_raw(), "teacher": {"onnx": "t.onnx"}}

    def refused(raw: dict[str, Any], message: str) -> None:
        with pytest.raises(ConfigError) as caught:
            validate_config(raw, base_dir=tmp_path)
        assert str(caught.value) == message

    refused({**base, "distill": {"hint": {"teacher_layer": "a", "student_layer": "b"}}},
            "pipeline.yaml: distill.hint: hint losses need the teacher's features, which an ONNX teacher "
            "(teacher.onnx) does not expose; remove distill.hint or use a PyTorch teacher")
    refused({**base, "prune": {"source": "teacher"}},
            "pipeline.yaml: prune.source: an ONNX teacher (teacher.onnx) cannot be pruned; prune the student")
    refused({**base, "teacher": {"onnx": "t.onnx", "model": "cnn_small", "checkpoint": "t.pt"}},
            "pipeline.yaml: teacher.onnx: the teacher is the ONNX file; remove teacher.checkpoint, teacher.model")
    refused({**base, "teacher": {"onnx": "missing.onnx"}},
            f"pipeline.yaml: teacher.onnx: no such file: {tmp_path / 'missing.onnx'}")
