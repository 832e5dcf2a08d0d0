"""The distill stage: config errors, hint layers, the frozen teacher during a KD epoch, and a tiny
teacher+distill run through the runner (artifacts, manifest metrics, skip on rerun)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from edgekd.runner import loop as pipeline
from edgekd.config import validate_config
from edgekd.data.bundle import load_data
from edgekd.errors import ConfigError, InputError
from edgekd.train.hints import FeatureHint, build_hint
from edgekd.train.objectives import make_kd_objective
from edgekd.models import create_model
from edgekd.stages import distill
from edgekd.train.loop import fit

CPU = torch.device("cpu")


def _raw(tmp_path: Path | None = None, **distill_settings: Any) -> dict[str, Any]:
    """A tiny synthetic pipeline: 4 classes of 12x12 patterns, small models, few epochs."""
    raw: dict[str, Any] = {
        "name": "kd-test",
        "seed": 0,
        "device": "cpu",
        "data": {
            "dataset": "synthetic", "batch_size": 32, "eval_batch_size": 256,
            "synthetic": {"num_samples": 400, "num_classes": 4, "image_size": 12, "noise": 0.6},
        },
        "teacher": {"model": "cnn", "model_kwargs": {"widths": [16, 32], "blocks": 1},
                    "train": {"epochs": 3, "lr": 0.01, "augment": False}},
        "student": {"model": "cnn", "model_kwargs": {"widths": [8, 16], "blocks": 1}},
        "distill": {"epochs": 6, "lr": 0.02, "augment": False, "temperature": 4.0, "alpha": 0.1, **distill_settings},
        "prune": None,
        "quantize": None,
    }
    if tmp_path is not None:
        raw["output_dir"] = str(tmp_path / "run")
    return raw


def _models(cfg: Any, data: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    meta = data.meta
    shape = dict(num_classes=meta.num_classes, in_channels=meta.channels, input_size=meta.height)
    teacher = create_model(cfg.teacher.model, kwargs=cfg.teacher.model_kwargs, **shape)
    student = create_model(cfg.student.model, kwargs=cfg.student.model_kwargs, **shape)
    return teacher.eval(), student


# --------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": -1}, "pipeline.yaml: distill.temperature: must be > 0 (got -1)"),
        ({"temperature": 0}, "pipeline.yaml: distill.temperature: must be > 0 (got 0)"),
        ({"alpha": 1.5}, "pipeline.yaml: distill.alpha: must be <= 1 (got 1.5)"),
        ({"alpha": -0.1}, "pipeline.yaml: distill.alpha: must be >= 0 (got -0.1)"),
        (
            {"hint": {"teacher_layer": "stage1", "student_layer": "stage1", "weight": -0.5}},
            "pipeline.yaml: distill.hint.weight: must be >= 0 (got -0.5)",
        ),
    ],
)
def test_validate_config_names_the_bad_distill_setting(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(_raw(**settings))
    assert str(info.value) == message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_build_hint_lists_valid_modules_when_layer_unknown(role: str) -> None:
    layers = {"teacher_layer": "stage2", "student_layer": "stage2", f"{role}_layer": "x"}
    cfg = validate_config(_raw(hint=layers))
    data = load_data(cfg.data, seed=0)
    teacher, student = _models(cfg, data)
    with pytest.raises(InputError) as info:
        build_hint(cfg.distill.hint, teacher, student, data, CPU)
    assert str(info.value).startswith(
        f"distill.hint.{role}_layer: no module 'x' in the {role} (valid: stage1, stage1.0, stage1.0.0, "
    )
    assert "head" in str(info.value) and info.value.exit_code == 2


def test_check_sizes_warns_when_student_is_larger_than_teacher(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgekd"):
        assert distill.check_sizes(student_params=2000, teacher_params=1000) is False
        assert distill.check_sizes(student_params=500, teacher_params=1000) is True
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "larger than the teacher" in warnings[0].getMessage()


# --------------------------------------------------------------------------------------------------
# Hints


@pytest.mark.parametrize(
    ("teacher_layer", "student_layer", "adapter", "shapes"),
    [
        ("stage2", "stage1", torch.nn.Conv2d, {"teacher": [32, 6, 6], "student": [8, 6, 6]}),  # 12x12 pooled to 6x6
        ("head", "stage2", torch.nn.Linear, {"teacher": [4], "student": [16]}),  # map vs vector: pooled to a vector
    ],
)
def test_feature_hint_reconciles_shapes_and_trains_only_student_and_adapter(
    teacher_layer: str, student_layer: str, adapter: type, shapes: dict[str, list[int]]
) -> None:
    cfg = validate_config(_raw(hint={"teacher_layer": teacher_layer, "student_layer": student_layer, "weight": 0.5}))
    data = load_data(cfg.data, seed=0)
    teacher, student = _models(cfg, data)
    hint = build_hint(cfg.distill.hint, teacher, student, data, CPU)
    assert isinstance(hint, FeatureHint) and isinstance(hint.adapter, adapter) and hint.shapes == shapes
    objective = make_kd_objective(cfg.distill.kd(), teacher, data, CPU, augment=False, hint=hint)
    assert objective.cache is None  # the hint needs the teacher's features every batch
    inputs = data.normalize(data.train.images[:8])
    loss, parts = objective(student.train(), inputs, data.train.labels[:8], torch.arange(8), False)
    loss.backward()
    assert set(parts) == {"ce", "kd", "hint"} and float(parts["hint"].detach()) > 0
    assert torch.isclose(loss, 0.1 * parts["ce"] + 0.9 * parts["kd"] + 0.5 * parts["hint"])
    assert all(p.grad is not None for p in objective.extra_parameters())
    assert all(p.grad is None for p in teacher.parameters())
    objective.close()
    assert not student.stage1._forward_hooks and not teacher.stage2._forward_hooks


def test_fit_with_kd_keeps_teacher_batchnorm_statistics_and_logs_loss_parts() -> None:
    cfg = validate_config(_raw(epochs=1, hint={"teacher_layer": "stage2", "student_layer": "stage2", "weight": 1.0}))
    data = load_data(cfg.data, seed=0)
    teacher, student = _models(cfg, data)
    teacher.train()  # the objective must put it back in eval mode itself
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    objective = make_kd_objective(cfg.distill.kd(), teacher, data, CPU, augment=False, hint=build_hint(cfg.distill.hint, teacher, student, data, CPU))
    result = fit(student, data, cfg.distill, device=CPU, seed=0, objective=objective, batch_size=32, log=lambda _: None)
    objective.close()
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. running_mean/var, num_batches_tracked
    row = result.history[0]
    assert {"train_loss", "train_ce", "train_kd", "train_hint", "val_accuracy"} <= set(row)


def test_build_hint_validates_names_but_returns_none_when_weight_is_0() -> None:
    cfg = validate_config(_raw(hint={"teacher_layer": "stage2", "student_layer": "stage2", "weight": 0}))
    data = load_data(cfg.data, seed=0)
    teacher, student = _models(cfg, data)
    assert build_hint(cfg.distill.hint, teacher, student, data, CPU) is None
    bad = validate_config(_raw(hint={"teacher_layer": "stage2", "student_layer": "nope", "weight": 0}))
    with pytest.raises(InputError, match=r"^distill\.hint\.student_layer: no module 'nope' in the student"):
        build_hint(bad.distill.hint, teacher, student, data, CPU)


def test_fit_with_alpha_1_trains_exactly_like_the_ce_baseline() -> None:
    from edgekd.train.objectives import CrossEntropyObjective

    cfg = validate_config(_raw(epochs=1, alpha=1.0))
    data = load_data(cfg.data, seed=0)
    teacher, kd_student = _models(cfg, data)
    _, ce_student = _models(cfg, data)
    ce_student.load_state_dict(kd_student.state_dict())
    quiet = dict(device=CPU, seed=0, batch_size=32, log=lambda _: None)
    fit(kd_student, data, cfg.distill, objective=make_kd_objective(cfg.distill.kd(), teacher, data, CPU, augment=cfg.distill.augment), **quiet)
    fit(ce_student, data, cfg.distill, objective=CrossEntropyObjective(), **quiet)
    ce_state = ce_student.state_dict()
    assert all(torch.allclose(v, ce_state[k], atol=1e-6) for k, v in kd_student.state_dict().items())


# --------------------------------------------------------------------------------------------------
# Through the runner


@pytest.mark.slow
def test_run_pipeline_distill_writes_students_and_metrics_then_skips_on_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # alpha 0.5: a 3-epoch teacher's soft targets at T=4 are nearly flat, so keep a real hard-label term
    cfg = validate_config(_raw(tmp_path, alpha=0.5))
    outcome = pipeline.run_pipeline(cfg, only=["teacher", "distill"])
    run_dir = outcome.run_dir
    assert outcome.ran == ["teacher", "distill"]
    assert (run_dir / "student.pt").is_file() and (run_dir / "student_baseline.pt").is_file()
    record = outcome.manifest.record("distill")
    assert set(record.artifacts) == {"student.pt", "student_baseline.pt"}
    m = record.metrics
    train_size = load_data(cfg.data, seed=0).meta.split_sizes["train"]

    assert m["student_test_accuracy"] > 0.8  # 4 classes: chance is 0.25
    assert m["baseline_test_accuracy"] is not None
    assert m["kd_gain"] == pytest.approx(m["student_test_accuracy"] - m["baseline_test_accuracy"], abs=1e-6)
    assert m["teacher_test_accuracy"] == outcome.manifest.metrics("teacher")["test_accuracy"]
    assert 0 < m["student_params"] < m["teacher_params"]
    assert 0 <= m["student_test_agreement"] <= 1
    assert len(m["history"]) == len(m["baseline_history"]) == 6
    assert {"train_ce", "train_kd", "val_accuracy", "val_agreement"} <= set(m["history"][0])
    assert "train_kd" not in m["baseline_history"][0] and "val_agreement" in m["baseline_history"][0]
    assert 1 <= m["best_epoch"] <= 6 and m["train_wall_s"] > 0
    # each training sample's teacher logits computed exactly once, then reused on the 5 later epochs
    assert m["cache"]["misses"] == train_size and m["cache"]["hits"] == 5 * train_size
    assert m["cache"]["hit_rate"] == pytest.approx(5 / 6, abs=1e-6)

    from edgekd.models.checkpoint import read_checkpoint

    _, meta = read_checkpoint(run_dir / "student.pt")
    assert meta == {"model": "cnn", "model_kwargs": {"widths": [8, 16], "blocks": 1}, "role": "student"}

    again = pipeline.run_pipeline(validate_config(_raw(tmp_path, alpha=0.5)), only=["teacher", "distill"])
    assert again.ran == [] and again.skipped == ["teacher", "distill"]

    # A wrong hint layer is bad input (exit 2), reported once the teacher is known; the teacher stays cached.
    bad = validate_config(_raw(tmp_path, hint={"teacher_layer": "nope", "student_layer": "stage1"}))
    with pytest.raises(InputError, match=r"^distill\.hint\.teacher_layer: no module 'nope' in the teacher \(valid: stage1, "):
        pipeline.run_pipeline(bad, only=["teacher", "distill"])
