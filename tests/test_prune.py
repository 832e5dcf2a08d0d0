"""Pruning: targets met, structure kept valid, ONNX export, safe save/load, recovery, the stage end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import write_config
from edgekd.config import validate_config
from edgekd.data.config import DataConfig, SyntheticConfig
from edgekd.train.config import TrainConfig
from edgekd.errors import ConfigError, InputError
from edgekd.models import create_model, load_model, model_meta
from edgekd.models.checkpoint import save_checkpoint
from edgekd.models.structure import apply_structure, record_structure
from edgekd.stages.prune.pruning import (PruneSettings, PruneTarget, layer_channels, measure, prune_channels,
                                         resolve_ignored, taylor_gradients)
from edgekd.stages.prune.search import prune_iteratively, prune_to

CPU = torch.device("cpu")
ARCHS = {  # spec -> (channels, input size): the built-in family and torchvision adapted to small inputs
    "cnn_medium": (1, 28),
    "cnn_small_ds": (1, 28),
    "torchvision:resnet18": (3, 32),
    "torchvision:mobilenet_v2": (3, 32),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(spec: str, num_classes: int = 10) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    channels, size = ARCHS[spec]
    model = create_model(spec, num_classes=num_classes, in_channels=channels, input_size=size).eval()
    return model, torch.randn(2, channels, size, size)


class GroupedResidual(nn.Module):
    """Grouped conv, depthwise-separable pair and two residual adds: the couplings pruning must respect."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU())
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.grouped(y)
        y = y + self.pointwise(self.depthwise(y))
        return self.head(y.mean((2, 3)))


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# --------------------------------------------------------------------------------------------------
# Targets


@pytest.fixture(scope="module", params=["cnn_medium", "cnn_small_ds", "torchvision:resnet18", "torchvision:mobilenet_v2"])
def halved(request: pytest.FixtureRequest) -> dict:
    """Each architecture pruned once to half its MACs (local ranking), shared by the tests below."""
    model, x = build(request.param)
    macs, params = measure(model, x[:1])
    result = prune_to(model, x[:1], "macs", 0.5 * macs, PruneSettings(), resolve_ignored(model, []))
    return {"spec": request.param, "model": model, "x": x, "macs": macs, "params": params, "result": result}


def test_prune_to_meets_target_macs_within_5_percent(halved: dict) -> None:
    result, x = halved["result"], halved["x"]
    if halved["spec"] == "cnn_small_ds":  # 16/32/64 channels, local ranking: the reachable MACs are coarse
        assert abs(result.macs / halved["macs"] - 0.5) <= 0.1 * 0.5
    else:
        assert abs(result.macs / halved["macs"] - 0.5) <= 0.05 * 0.5
    assert result.params < halved["params"]
    assert measure(halved["model"], x[:1]) == (halved["macs"], halved["params"])  # the input model is untouched


def test_prune_to_keeps_residual_and_depthwise_layers_valid(halved: dict) -> None:
    model, pruned, x = halved["model"], halved["result"].model.eval(), halved["x"]
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape  # residual adds still line up
    originals, convs = _convs(model), _convs(pruned)
    depthwise = [n for n, c in originals.items() if c.groups > 1 and c.groups == c.in_channels == c.out_channels]
    assert bool(depthwise) == (halved["spec"] in ("cnn_small_ds", "torchvision:mobilenet_v2"))
    for name in depthwise:
        assert convs[name].groups == convs[name].in_channels == convs[name].out_channels
    assert sum(c.out_channels for c in convs.values()) < sum(c.out_channels for c in originals.values())
    head = resolve_ignored(model, [])[0]
    assert layer_channels(pruned)[head] == 10  # the classifier keeps every class


def test_load_model_restores_pruned_structure_with_weights_only(halved: dict, tmp_path: Path) -> None:
    spec, pruned, x = halved["spec"], halved["result"].model.eval(), halved["x"]
    structure = record_structure(pruned)
    json.dumps(structure)  # JSON-able: it travels in the checkpoint meta
    path = save_checkpoint(pruned, tmp_path / "pruned.pt", {**model_meta(spec, {}, "pruned"), "structure": structure})
    assert torch.load(path, map_location="cpu", weights_only=True)["meta"]["structure"] == structure
    channels, size = ARCHS[spec]
    loaded = load_model(path, num_classes=10, in_channels=channels, input_size=size)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert record_structure(loaded) == structure


def test_prune_to_meets_target_params_with_global_ranking() -> None:
    model, x = build("cnn_medium")
    _, params = measure(model, x[:1])
    result = prune_to(model, x[:1], "params", 0.3 * params, PruneSettings(global_pruning=True), resolve_ignored(model, []))
    assert abs(result.params / params - 0.3) <= 0.05 * 0.3


def test_prune_channels_ratio_counts_channels_not_parameters() -> None:
    model, x = build("cnn_medium")
    _, params = measure(model, x[:1])
    result = prune_channels(model, x[:1], 0.5, PruneSettings(), resolve_ignored(model, []))
    before, after = layer_channels(model), layer_channels(result.model)
    assert after["stage2.1.0"] == before["stage2.1.0"] // 2 and after["head"] == before["head"]
    assert 0.2 < result.params / params < 0.32  # half the channels keeps about a quarter of the weights


def test_prune_iteratively_reaches_the_same_macs_target_in_steps() -> None:
    model, x = build("cnn_medium")
    macs, _ = measure(model, x[:1])
    seen: list[int] = []
    result = prune_iteratively(model, x[:1], PruneTarget("macs", 0.4), PruneSettings(), steps=3,
                               after_step=lambda m, row: seen.append(row["step"]))
    fractions = [row["macs_fraction"] for row in result.steps]
    assert seen == [1, 2, 3]
    assert fractions == sorted(fractions, reverse=True)
    assert abs(measure(result.model, x[:1])[0] / macs - 0.4) <= 0.05 * 0.4


def test_prune_iteratively_ratio_in_steps_matches_one_shot_channels() -> None:
    model, x = build("cnn_medium")
    one = prune_iteratively(model, x[:1], PruneTarget("ratio", 0.5), PruneSettings(), steps=1)
    two = prune_iteratively(model, x[:1], PruneTarget("ratio", 0.5), PruneSettings(), steps=2)
    assert abs(two.steps[-1]["channels_fraction"] - one.steps[-1]["channels_fraction"]) < 0.05


@pytest.mark.parametrize("importance", ["l1", "taylor", "bn_scale"])
def test_prune_channels_supports_each_importance(importance: str) -> None:
    model, x = build("cnn_medium")
    grads = None
    if importance == "taylor":
        grads = taylor_gradients(model, [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))])
        assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind
    result = prune_channels(model, x[:1], 0.4, PruneSettings(importance=importance), resolve_ignored(model, []), grads)
    assert result.params < measure(model, x[:1])[1]


# --------------------------------------------------------------------------------------------------
# Structure safety


def test_prune_channels_keeps_grouped_conv_and_residual_adds_valid() -> None:
    torch.manual_seed(0)
    model, x = GroupedResidual().eval(), torch.randn(2, 3, 16, 16)
    result = prune_channels(model, x[:1], 0.5, PruneSettings(), resolve_ignored(model, []))
    pruned = result.model.eval()
    assert result.params < measure(model, x[:1])[1]
    assert pruned(x).shape == (2, 5)
    grouped, depthwise = pruned.grouped[0], pruned.depthwise
    assert grouped.groups == 4 and grouped.in_channels % 4 == 0 and grouped.out_channels % 4 == 0
    assert grouped.out_channels < 16
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == pruned.pointwise.out_channels


def test_resolve_ignored_keeps_user_listed_layers_whole() -> None:
    model, x = build("cnn_medium")
    ignored = resolve_ignored(model, ["stage1"], what="student")
    assert ignored == ["head", "stage1"]
    pruned = prune_channels(model, x[:1], 0.5, PruneSettings(), ignored).model
    before, after = layer_channels(model), layer_channels(pruned)
    assert after["stage1.0.0"] == before["stage1.0.0"] and after["stage2.1.0"] < before["stage2.1.0"]


def test_resolve_ignored_names_examples_when_module_unknown() -> None:
    model, _ = build("cnn_medium")
    with pytest.raises(InputError, match=r"^prune\.ignore: no module 'x' in the student \(e\.g\. stage1, stage2, "):
        resolve_ignored(model, ["x"], what="student")


@pytest.mark.parametrize("kind", ["ratio", "macs"])
def test_prune_reports_input_error_when_target_would_empty_a_layer(kind: str) -> None:
    model, x = build("cnn_medium")
    target = PruneTarget("ratio", 0.99) if kind == "ratio" else PruneTarget("macs", 0.0001)
    with pytest.raises(InputError, match="with no channels") as info:
        prune_iteratively(model, x[:1], target, PruneSettings())
    assert info.value.exit_code == 2 and "stage" in str(info.value)


@pytest.mark.parametrize("ratio", [0, 1, 1.5])
def test_validate_config_rejects_ratio_outside_open_unit_interval(ratio: float) -> None:
    with pytest.raises(ConfigError, match=r"prune\.ratio: must be [<>] [01] \(got"):
        validate_config({"prune": {"ratio": ratio}})


# --------------------------------------------------------------------------------------------------
# Export and save/load


@pytest.mark.parametrize("spec", ["cnn_small_ds", "grouped"])
def test_pruned_model_exports_to_onnx_matching_torch(spec: str, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    if spec == "grouped":
        torch.manual_seed(0)
        model, x = GroupedResidual().eval(), torch.randn(2, 3, 16, 16)
    else:
        model, x = build(spec)
    pruned = prune_channels(model, x[:1], 0.4, PruneSettings(), resolve_ignored(model, [])).model.eval()
    path = tmp_path / "pruned.onnx"
    torch.onnx.export(pruned, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    assert onnx.load(str(path)).opset_import[0].version == 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, pruned(x).numpy(), atol=1e-4, rtol=1e-4)


def test_apply_structure_rejects_a_record_from_another_architecture() -> None:
    small, _ = build("cnn_small_ds")
    other, _ = build("cnn_medium")
    with pytest.raises(InputError, match="checkpoint structure"):
        apply_structure(copy.deepcopy(other), record_structure(small))


# --------------------------------------------------------------------------------------------------
# Recovery and the stage


@pytest.fixture(scope="module")
def trained() -> tuple:
    from edgekd.data.bundle import load_data
    from edgekd.train.loop import fit

    data = load_data(DataConfig(dataset="synthetic", batch_size=32, synthetic=SyntheticConfig(
        num_samples=400, num_classes=4, image_size=12, noise=1.0)), seed=0)
    model = create_model("cnn_small", num_classes=4, in_channels=1, input_size=12)
    fit(model, data, TrainConfig(epochs=3, lr=0.01, augment=False), device=CPU, seed=0, batch_size=32, log=lambda _: None)
    return model.eval(), data


def test_kd_recovery_raises_accuracy_of_pruned_model(trained: tuple) -> None:
    from edgekd.train.objectives import DistillationObjective
    from edgekd.train.loop import accuracy, fit, predict

    teacher, data = trained
    rows: list[dict] = []

    def recover(model: nn.Module, row: dict) -> None:
        row["before"] = accuracy(predict(model, data.val, data, CPU), data.val.labels)
        objective = DistillationObjective(copy.deepcopy(teacher), 4.0, 0.1)
        fit(model, data, TrainConfig(epochs=2, lr=3e-3, augment=False), device=CPU, seed=0, batch_size=32,
            objective=objective, log=lambda _: None)
        row["after"] = accuracy(predict(model, data.val, data, CPU), data.val.labels)
        rows.append(row)

    teacher_accuracy = accuracy(predict(teacher, data.val, data, CPU), data.val.labels)
    prune_iteratively(teacher, torch.randn(1, 1, 12, 12), PruneTarget("ratio", 0.5), PruneSettings(), after_step=recover)
    assert rows[0]["before"] < teacher_accuracy
    assert rows[0]["after"] > rows[0]["before"]


def test_prune_stage_depends_on_distill_only_when_pruning_the_student() -> None:
    from edgekd.stages import prune as stage

    student = validate_config({"prune": {"source": "student"}})
    teacher = validate_config({"distill": None, "prune": {"source": "teacher", "global": True}})
    assert stage.plan(student).depends_on == ("teacher", "distill") and stage.plan(teacher).depends_on == ("teacher",)
    plan = stage.plan(teacher)
    assert (plan.settings.kd.temperature, plan.settings.kd.alpha) == (4.0, 0.1)  # KD defaults without distill
    assert plan.view["kd"]["temperature"] == 4.0 and plan.view["source_model"]["model"] == teacher.teacher.model
    assert plan.view["prune"]["global"] is True and plan.settings.model == teacher.teacher.model
    with pytest.raises(ConfigError, match=r"prune\.source: 'student' needs the distill stage"):
        validate_config({"distill": None, "prune": {"source": "student"}})


@pytest.mark.slow
def test_run_pipeline_prune_writes_pruned_checkpoint_and_metrics(tmp_path: Path) -> None:
    from edgekd.runner.loop import run_pipeline

    config = write_config(tmp_path, {
        "data": {"synthetic": {"num_samples": 240, "image_size": 12}},
        "teacher": {"train": {"epochs": 1}},
        "distill": None, "quantize": None,
        "prune": {"source": "teacher", "ratio": None, "target_macs": 0.5, "importance": "taylor", "steps": 2,
                  "finetune": {"epochs": 1}},
    })
    outcome = run_pipeline(config, only=["teacher", "prune"])
    assert outcome.ran == ["teacher", "prune"]
    entry = outcome.manifest.record("prune")
    metrics = entry.metrics
    assert set(entry.artifacts) == {"pruned.pt"}
    assert metrics["source"] == "teacher" and metrics["target"] == {"kind": "macs", "value": 0.5}
    assert abs(metrics["macs_after"] / metrics["macs_before"] - 0.5) <= 0.025 and metrics["target_reached"] is True
    assert metrics["params_after"] < metrics["params_before"]
    assert [row["step"] for row in metrics["steps"]] == [1, 2]
    assert {"accuracy_before_prune", "accuracy_after_prune", "accuracy_after_recovery", "test_accuracy"} <= set(metrics)
    assert metrics["layers"]["head"] == {"before": 4, "after": 4}
    assert {row["step"] for row in metrics["history"]} == {1, 2}
    meta = outcome.run_dir / "pruned.pt"
    loaded = load_model(meta, num_classes=4, in_channels=1, input_size=12)
    assert sum(p.numel() for p in loaded.parameters()) == metrics["params_after"]
    # an unknown ignore entry is bad input (exit 2) naming the pruned model
    bad = write_config(tmp_path, {"prune": {"source": "teacher", "ignore": ["x"]}, "distill": None,
                                  "data": {"synthetic": {"num_samples": 240, "image_size": 12}},
                                  "teacher": {"train": {"epochs": 1}}}, name="bad.yaml")
    with pytest.raises(InputError, match=r"prune\.ignore: no module 'x' in the teacher \(e\.g\. stage1, stage2"):
        run_pipeline(bad, only=["teacher", "prune"], output_dir=outcome.run_dir)
