"""BatchNorm recalibration in the shared training loop, and the guard against a model that trains well but
infers at chance (issue: short schedules leave running statistics behind fast-moving weights)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgekd.cli import main
from edgekd.config import validate_config
from edgekd.data.bundle import load_data
from edgekd.models import create_model
from edgekd.runtime.evaluate import near_chance_accuracy
from edgekd.train.batchnorm import batch_statistics_accuracy, recalibrate_batchnorm
from edgekd.train.config import TrainConfig
from edgekd.train.loop import fit
from report_fixture import make_run

CPU = torch.device("cpu")


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(2))


def test_recalibrate_batchnorm_gives_the_plain_average_of_the_batches_and_restores_modes() -> None:
    torch.manual_seed(0)
    model = _net()
    model(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    model.train()
    bn = model[1]
    batches = [torch.randn(8, 3, 6, 6) * (i + 1) + i for i in range(3)]
    stats = recalibrate_batchnorm(model, iter(batches), max_batches=2)
    assert stats == {"layers": 1, "batches": 2, "samples": 16}
    with torch.no_grad():
        features = [model[0](b) for b in batches[:2]]
    expected_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    expected_var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in features]).mean(0)
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, expected_var, atol=1e-4)
    assert bn.momentum == 0.1 and all(m.training for m in model.modules())  # as it was before the call


def test_recalibrate_batchnorm_keeps_statistics_without_usable_batches_and_ignores_models_without_bn() -> None:
    model = _net()
    model(torch.randn(2, 3, 6, 6))
    before = model[1].running_mean.clone()
    assert recalibrate_batchnorm(model, iter([torch.randn(1, 3, 6, 6)]), max_batches=4)["batches"] == 0
    assert torch.equal(model[1].running_mean, before)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    assert recalibrate_batchnorm(plain, iter([torch.randn(4, 12)]), 4) == {"layers": 0, "batches": 0, "samples": 0}
    assert batch_statistics_accuracy(plain, iter([])) is None


def test_batch_statistics_accuracy_leaves_running_statistics_alone() -> None:
    model = _net()
    model(torch.randn(2, 3, 6, 6))
    model.eval()
    before = [t.clone() for t in (model[1].running_mean, model[1].running_var, model[1].num_batches_tracked)]
    value = batch_statistics_accuracy(model, [(torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,)))])
    assert 0.0 <= value <= 1.0
    after = (model[1].running_mean, model[1].running_var, model[1].num_batches_tracked)
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and not model.training


@pytest.mark.slow
def test_recalibration_rescues_a_torchvision_mobile_student_whose_eval_mode_collapsed(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """mobilenet_v3_small at 32 px, 2 short epochs: eval-mode accuracy near chance without recalibration, clearly
    above it with; the guard names the cause and the knob."""
    monkeypatch.setattr(logging.getLogger("edgekd"), "propagate", True)  # the CLI's console setup may have cut it
    cfg = validate_config({"data": {"dataset": "synthetic", "batch_size": 64, "synthetic": {
        "num_samples": 300, "num_classes": 10, "image_size": 32, "channels": 3}}})
    data = load_data(cfg.data, seed=0)
    results = {}
    for batches in (0, 8):
        torch.manual_seed(0)
        model = create_model("torchvision:mobilenet_v3_small", num_classes=10, in_channels=3, input_size=32)
        settings = TrainConfig(epochs=2, lr=0.005, weight_decay=0.01, augment=False, schedule="constant",
                               bn_recalibration_batches=batches)
        results[batches] = fit(model, data, settings, device=CPU, seed=0, batch_size=64, eval_batch_size=256,
                               log=lambda line: None, config_key="distill", desc="distill")
    collapsed, rescued = results[0].mode_check, results[8].mode_check
    floor = near_chance_accuracy(10)
    assert collapsed["eval_accuracy"] < floor and collapsed["at_chance"] and collapsed["diverged"]
    assert collapsed["batch_stats_accuracy"] > floor  # the weights were fine: only the statistics were wrong
    assert "distill.bn_recalibration_batches" in collapsed["message"] and "WARNING distill" in caplog.text
    assert rescued["eval_accuracy"] >= 0.35 and rescued["eval_accuracy"] >= collapsed["eval_accuracy"] + 0.2
    assert not rescued["at_chance"] and "message" not in rescued
    recalibrated = results[8].history[-1]["bn_recalibrated"]
    assert (recalibrated["batches"], recalibrated["samples"], recalibrated["kept"]) == (4, len(data.train), True)


def test_report_never_deploys_a_chance_level_student_and_says_why(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, budgets={"min_accuracy": 0.9},
                       accuracy={"student": 0.25, "pruned": 0.24, "int8": 0.25})  # 4 classes: chance 0.25
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["stages"]["distill"]["metrics"]["mode_check"] = {
        "eval_accuracy": 0.25, "batch_stats_accuracy": 0.93, "chance": 0.25, "at_chance": True, "diverged": True,
        "message": "distill: eval-mode validation accuracy 0.2500 is at chance level, against 0.9300 with batch "
                   "statistics (chance 0.2500): BatchNorm running statistics do not match the weights"}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["report", str(run_dir)], catch_exceptions=False)
    assert result.exit_code == 1, result.output  # the accuracy budget fails: exit 1 as for any breach
    report = json.loads((run_dir / "report.json").read_text())
    assert report["deployed"]["artifact"] == "teacher" and "only candidate" in report["deployed"]["reason"]
    reasons = {c["artifact"]: c["excluded_reason"] for c in report["candidates"]}
    assert reasons["student"].startswith("not deployable: at chance level: test accuracy 0.2500 < 0.3250")
    kinds = {(f["kind"], f["artifact"]) for f in report["flags"]}
    assert {("at_chance", "student"), ("at_chance", "int8"), ("eval_mode_collapse", "student")} <= kinds
    markdown = (run_dir / "report.md").read_text()
    assert "## Train-mode vs eval-mode accuracy" in markdown and "| student | 0.2500 | 0.9300 |" in markdown
