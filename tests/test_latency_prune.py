"""Latency-first compression: pruning to a measured latency target (the search's stopping logic with an injected
latency function, and one real measured run), round_to chosen by measurement, and the student chosen by
measured latency (decision rule with injected timings, one real measurement). No timing thresholds: the
injected functions are deterministic, and the real runs are only checked for what they record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekd.errors import ConfigError, InputError
from edgekd.models import create_model
from edgekd.stages.distill.choice import ChoiceSettings, choose, limits, measure_candidates
from edgekd.stages.distill.config import CandidateConfig, StudentConfig
from edgekd.stages.prune.latency import LatencyProbe, LatencySettings
from edgekd.stages.prune.pruning import PruneSettings, layer_channels, measure, resolve_ignored
from edgekd.stages.prune.search import (LATENCY_TRIALS, latency_step_goals, pick_round_to, prune_iteratively_to_latency,
                                        prune_to_latency, round_to_candidates)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def student(widths: tuple[int, ...] = (16, 32, 64)) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("cnn", num_classes=10, in_channels=1, input_size=16, kwargs={"widths": list(widths), "blocks": 1})
    return model.eval(), torch.randn(1, 1, 16, 16)


def macs_latency(model: nn.Module, overhead: float = 0.3) -> tuple:
    """A deterministic stand-in for a measurement: a fixed overhead plus time proportional to MACs, like a small
    model on a CPU. Counts its calls."""
    example = torch.zeros(1, 1, 16, 16)
    base = measure(model, example)[0]
    calls: list[float] = []

    def latency(pruned: nn.Module) -> float:
        value = overhead + (1 - overhead) * measure(pruned, example)[0] / base
        calls.append(value)
        return value

    return latency, calls


# --------------------------------------------------------------------------------------------------
# The latency-target loop (injected latency)


def test_prune_to_latency_stops_within_tolerance_of_goal_with_injected_latency() -> None:
    model, x = student()
    latency, calls = macs_latency(model)
    step = prune_to_latency(model, x, 0.7, latency, PruneSettings(), resolve_ignored(model, []))
    assert abs(step.latency_fraction - 0.7) <= 0.05 * 0.7
    assert step.trials == len(calls) == len(step.trace) and 1 <= step.trials <= LATENCY_TRIALS
    # it stopped at the first trial within the tolerance: every earlier one missed it
    assert all(abs(row["latency_fraction"] - 0.7) > 0.035 for row in step.trace[:-1])
    assert step.trace[-1]["latency_fraction"] == pytest.approx(step.latency_fraction, abs=1e-6)
    # MACs fall faster than this latency (the overhead does not shrink): the rows say so
    assert step.trace[-1]["macs_fraction"] < step.trace[-1]["latency_fraction"]
    assert sum(layer_channels(step.model).values()) < sum(layer_channels(model).values())


def test_prune_to_latency_unreachable_goal_stops_and_keeps_least_pruned_equal_copy() -> None:
    model, x = student()
    latency, calls = macs_latency(model, overhead=0.9)  # overhead-bound: at most ~10 % can be saved
    step = prune_to_latency(model, x, 0.5, latency, PruneSettings(), resolve_ignored(model, []))
    assert 1 <= len(calls) <= LATENCY_TRIALS
    assert step.latency_fraction > 0.5 * 1.1  # not reached, and it says so through the numbers
    closest = min(abs(v - 0.5) for v in calls)
    equal = [row for row in step.trace if "latency_fraction" in row and abs(row["latency_fraction"] - 0.5) <= closest + 0.025]
    assert step.channel_ratio == pytest.approx(min(row["channel_ratio"] for row in equal), abs=1e-6)


def test_prune_iteratively_to_latency_steps_toward_cumulative_goals_with_recovery_hook() -> None:
    model, x = student()
    latency, _ = macs_latency(model)
    seen: list[dict] = []
    result = prune_iteratively_to_latency(model, x, 0.6, latency, PruneSettings(), steps=2,
                                          after_step=lambda m, row: seen.append(dict(row)))
    assert [r["latency_goal"] for r in result.steps] == pytest.approx(latency_step_goals(0.6, 2)) == [0.8, 0.6]
    assert [r["step"] for r in seen] == [1, 2]
    for row in result.steps:
        assert abs(row["latency_fraction"] - row["latency_goal"]) <= 0.05 * row["latency_goal"]
        assert row["trials"] and row["search_trials"] == len(row["trials"])
    assert result.steps[1]["macs_fraction"] < result.steps[0]["macs_fraction"] < 1
    assert layer_channels(model)["stage1.0.0"] == 16  # the input model is untouched


def test_latency_step_goals_refuses_fraction_outside_unit_interval() -> None:
    with pytest.raises(ValueError):
        latency_step_goals(1.2, 2)


# --------------------------------------------------------------------------------------------------
# round_to: auto


def test_round_to_candidates_drop_duplicate_shapes_and_pick_most_macs_per_ms() -> None:
    model, x = student((16, 32, 64))
    copies = round_to_candidates(model, x, 0.25, PruneSettings(), resolve_ignored(model, []))
    # 16/32/64 at 0.25 keeps 12/24/48: multiples of 4 already, so round_to 4 adds nothing and is left out
    assert 1 in copies and 4 not in copies and 8 in copies
    assert layer_channels(copies[1])["stage1.0.0"] == 12 and layer_channels(copies[8])["stage1.0.0"] == 8
    rows = [{"round_to": 1, "macs": 1000, "p50_ms": 0.10}, {"round_to": 8, "macs": 800, "p50_ms": 0.07},
            {"round_to": 16, "macs": 500, "p50_ms": 0.06}]
    assert pick_round_to(rows) == 8  # 11.4k MACs/ms beats 10k and 8.3k
    rows[2]["p50_ms"] = 0.0442  # 11.3k MACs/ms: within 2 % of round_to 8's, a tie the coarser rounding wins
    assert pick_round_to(rows) == 16


# --------------------------------------------------------------------------------------------------
# One real measured run: export, time on ONNX Runtime, stop


def test_latency_search_on_onnx_runtime_terminates_and_records_steps(tmp_path: Path) -> None:
    model, x = student((16, 32, 64))
    probe = LatencyProbe((1, 16, 16), LatencySettings(precision="fp32", rounds=1, iterations=20), tmp_path)
    reference = probe.onnx(model, name="reference")

    def latency(pruned: nn.Module) -> float:
        return probe.fractions({"trial": probe.onnx(pruned)}, reference)["trial"]["fraction"]

    result = prune_iteratively_to_latency(model, x, 0.8, latency, PruneSettings(round_to=4), steps=1)
    row = result.steps[0]
    assert 1 <= row["search_trials"] <= LATENCY_TRIALS and len(row["trials"]) == row["search_trials"]
    assert row["latency_fraction"] > 0 and 0 < row["macs_fraction"] < 1
    assert all(c % 4 == 0 for name, c in layer_channels(result.model).items() if name != "head")
    timed = [t for t in row["trials"] if "latency_fraction" in t]  # a ratio that empties a layer is not exported
    assert timed and probe.exported == 1 + len(timed) and (tmp_path / "reference.onnx").is_file()


# --------------------------------------------------------------------------------------------------
# Student choice


def rows(**timings: tuple[int, float, float]) -> list[dict]:
    """label -> (MACs, fp32 p50, int8 p50); p90 = 1.2 x p50."""
    out = []
    for label, (macs, fp32, int8) in timings.items():
        out.append({"label": label, "model": label, "model_kwargs": {}, "macs": macs, "params": macs // 100,
                    "fp32_p50_ms": fp32, "fp32_p90_ms": 1.2 * fp32, "int8_p50_ms": int8, "int8_p90_ms": 1.2 * int8})
    return out


def test_choose_drops_candidates_over_budget_and_picks_largest_that_fits() -> None:
    table = rows(small=(2_000_000, 0.06, 0.08), medium=(7_000_000, 0.19, 0.15), large=(30_000_000, 0.60, 0.40))
    decision = choose(table, ChoiceSettings(latency_p50_ms=0.16), None)
    assert decision["chosen"] == "medium" and decision["precision"] == "int8"  # fits only in int8
    assert [r["fits"] for r in table] == [True, True, False]
    assert "too slow even in int8: large" in decision["reason"] and decision["others_fitting"] == ["small"]
    assert decision["margin"] == pytest.approx(0.16 / 0.15 - 1, abs=1e-4)


def test_choose_turns_min_speedup_into_p50_limit_from_teacher_and_honours_p90() -> None:
    table = rows(small=(2_000_000, 0.06, 0.08), medium=(7_000_000, 0.19, 0.15))
    assert limits(ChoiceSettings(min_speedup=8.0, latency_p50_ms=0.5), 1.36) == {"p50": pytest.approx(0.17)}
    assert choose(table, ChoiceSettings(min_speedup=8.0), 1.36)["chosen"] == "medium"
    # p90 0.18 > 0.17: medium is out, small (fp32 p90 0.072) stays
    assert choose(table, ChoiceSettings(latency_p90_ms=0.17), None)["chosen"] == "small"
    by_params = rows(a=(9_000_000, 0.1, 0.1), b=(8_000_000, 0.1, 0.1))
    by_params[1]["params"] = 10**9
    assert choose(by_params, ChoiceSettings(latency_p50_ms=1, capacity="params"), None)["chosen"] == "b"


def test_choose_none_fits_is_input_error_naming_fastest_and_limit() -> None:
    table = rows(medium=(7_000_000, 0.19, 0.15), large=(30_000_000, 0.60, 0.40))
    with pytest.raises(InputError, match=r"^student\.candidates: none of the 2 candidates meets the latency budget "
                                         r"\(p50 <= 0\.100 ms\) even in int8; the fastest, medium, runs at p50 0\.150 ms"):
        choose(table, ChoiceSettings(latency_p50_ms=0.1), None)


def test_measure_candidates_times_fp32_and_int8_untrained(tmp_path: Path) -> None:
    def build(spec: str, kwargs: dict) -> nn.Module:
        return create_model(spec, num_classes=10, in_channels=1, input_size=16, kwargs=kwargs)

    candidates = [CandidateConfig(model="cnn_tiny"), CandidateConfig(model="cnn", model_kwargs={"widths": [8, 16]})]
    teacher = build("cnn_small", {})
    calibration = np.random.default_rng(0).standard_normal((16, 1, 16, 16)).astype(np.float32)
    table, teacher_p50 = measure_candidates(
        candidates, build, teacher, (1, 16, 16),
        ChoiceSettings(latency=LatencySettings(rounds=1, iterations=20)), calibration, tmp_path)
    assert [r["label"] for r in table] == ["cnn_tiny", "cnn(widths=[8, 16])"] and teacher_p50 > 0
    for row in table:
        assert row["macs"] > 0 and row["params"] > 0
        assert all(row[f"{p}_{s}_ms"] > 0 for p in ("fp32", "int8") for s in ("p50", "p90"))
    assert (tmp_path / "candidate0.int8.onnx").is_file()


# --------------------------------------------------------------------------------------------------
# Configuration


def test_student_config_candidates_accept_bare_specs_and_auto_family() -> None:
    from edgekd.config import validate_config

    cfg = validate_config({"student": {"candidates": ["cnn_tiny", {"model": "cnn", "model_kwargs": {"widths": [8]}}]},
                           "budgets": {"latency_p50_ms": 0.2}})
    assert [c.label() for c in cfg.student.candidate_list()] == ["cnn_tiny", "cnn(widths=[8])"]
    assert cfg.model_factories == (cfg.teacher.model, "cnn_tiny", "cnn")
    auto = StudentConfig(model="auto")
    assert auto.chooses and len(auto.candidate_list()) >= 4
    assert not StudentConfig().chooses


@pytest.mark.parametrize("raw, message", [
    ({"student": {"model": "auto"}}, r"student\.model: auto: needs a latency budget"),
    ({"student": {"candidates": ["cnn_tiny"]}, "budgets": {"min_speedup": 2}, "distill": None, "prune": None},
     r"student\.candidates: chooses the student the distill stage trains"),
    ({"student": {"model": "cnn_tiny", "candidates": ["cnn_small"]}}, r"student: set candidates or model, not both"),
    ({"student": {"candidates": []}}, r"student\.candidates: .*at least one"),
    ({"student": {"model": "auto", "checkpoint": "x.pt"}, "budgets": {"latency_p50_ms": 1}},
     r"student\.checkpoint: applies to a named student, not to one chosen by latency"),
    ({"student": {"top_k": 2}}, r"student\.top_k: 2 needs student\.candidates or student\.model: auto"),
    ({"student": {"candidates": ["cnn_tiny", "cnn_tiny"]}}, r"listed twice: cnn_tiny"),
    ({"prune": {"ratio": 0.2, "target_speedup": 1.5}}, r"prune: set only one of .*\(got ratio, target_speedup\)"),
    ({"prune": {"target_latency_ms": 0.1, "target_macs": 0.5}}, r"\(got target_macs, target_latency_ms\)"),
    ({"prune": {"target_speedup": 1.0}}, r"prune\.target_speedup: must be > 1"),
    ({"prune": {"round_to": "fast"}}, r"prune\.round_to: .*positive integer or auto \(got 'fast'\)"),
    ({"prune": {"round_to": 0}}, r"prune\.round_to: .*positive integer or auto \(got 0\)"),
])
def test_new_fields_are_validated_with_one_line(raw: dict, message: str) -> None:
    from edgekd.config import validate_config

    with pytest.raises(ConfigError, match=message) as info:
        validate_config(raw)
    assert len(str(info.value).splitlines()) == 1


def test_plans_put_latency_settings_in_fingerprinted_view() -> None:
    from edgekd.config import validate_config
    from edgekd.stages import distill, prune

    cfg = validate_config({"prune": {"target_speedup": 1.4, "round_to": "auto"},
                           "student": {"model": "auto"}, "budgets": {"min_speedup": 8, "latency_threads": 2},
                           "benchmark": {"threads": [1, 2]}})
    plan = prune.plan(cfg)
    assert plan.view["latency"] == {"threads": 2, "batch": 1, "precision": "int8", "rounds": 3, "iterations": None,
                                    "opset": 17}
    assert validate_config({"prune": {"target_speedup": 1.4}, "quantize": None}).prune is not None
    assert prune.plan(validate_config({"prune": {"target_speedup": 1.4}, "quantize": None})).view["latency"]["precision"] == "fp32"
    assert "latency" not in prune.plan(validate_config({})).view
    assert not {"target_speedup", "latency_precision"} & set(prune.plan(validate_config({})).view["prune"])
    named = distill.plan(validate_config({})).view
    assert not {"candidates", "capacity", "top_k"} & set(named["student"]) and "student_choice" not in named  # no rerun
    assert {"candidates", "capacity", "top_k"} <= set(distill.plan(cfg).view["student"])
    choice = distill.plan(cfg).view["student_choice"]
    assert choice["budgets"]["min_speedup"] == 8 and choice["latency"]["threads"] == 2


# --------------------------------------------------------------------------------------------------
# The stages end to end: the choice and the measurements recorded, and not redone on a rerun


@pytest.mark.slow
def test_pipeline_chooses_student_prunes_to_latency_and_rerun_does_not_retime(tmp_path: Path) -> None:
    from conftest import write_config

    from edgekd.models.checkpoint import read_checkpoint
    from edgekd.runner.loop import run_pipeline

    config = write_config(tmp_path, {
        "data": {"synthetic": {"num_samples": 240, "image_size": 12}},
        "teacher": {"model": "cnn_small", "train": {"epochs": 1}},
        "student": {"model": "auto", "candidates": ["cnn_tiny", "cnn_small"], "top_k": 2},
        "distill": {"epochs": 1},
        "prune": {"ratio": None, "target_speedup": 1.2, "round_to": "auto", "latency_rounds": 1,
                  "finetune": {"epochs": 1}},
        "budgets": {"latency_p50_ms": 50.0},
    })
    stages = ["teacher", "distill", "prune"]
    outcome = run_pipeline(config, only=stages)
    assert outcome.ran == stages
    choice = outcome.manifest.record("distill").metrics["student_choice"]
    assert [row["label"] for row in choice["candidates"]] == ["cnn_tiny", "cnn_small"]
    assert all(row["fits"] and row["int8_p50_ms"] > 0 for row in choice["candidates"])
    # both fit 50 ms: ranked by MACs, both distilled (top_k 2), the better by validation accuracy kept
    assert [c["label"] for c in choice["decision"]["ranked"]] == ["cnn_small", "cnn_tiny"]
    scores = {row["label"]: row["val_accuracy"] for row in choice["top_k"]}
    assert set(scores) == {"cnn_small", "cnn_tiny"}
    kept = max(scores, key=lambda label: (scores[label], label == "cnn_small"))
    assert choice["decision"]["chosen"] == kept and "kept " + kept in choice["decision"]["reason"]
    assert read_checkpoint(outcome.run_dir / "student.pt")[1]["model"] == kept

    prune = outcome.manifest.record("prune").metrics
    assert read_checkpoint(outcome.run_dir / "pruned.pt")[1]["model"] == kept
    auto = prune["latency"]["round_to_auto"]
    assert auto["chosen"] in [row["round_to"] for row in auto["candidates"]] and prune["round_to"] == auto["chosen"]
    assert all(row["p50_ms"] > 0 and row["macs_per_ms"] > 0 for row in auto["candidates"])
    assert prune["target"] == {"kind": "speedup", "value": 1.2} and isinstance(prune["target_reached"], bool)
    step = prune["latency"]["per_step"][0]
    assert step["trials"] >= 1 and step["macs_speedup"] >= 1 and prune["steps"][0]["trials"]

    rerun = run_pipeline(config, only=stages)  # same config: nothing re-timed, nothing re-chosen
    assert rerun.ran == [] and rerun.manifest.record("distill").metrics["student_choice"] == choice
