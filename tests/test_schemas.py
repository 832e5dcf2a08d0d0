"""JSON Schemas (edgekd/schemas/): pipeline.yaml's is generated from the pydantic models and kept in sync; the
output schemas (report.json, device.json, arm_check.json, bench --json) validate the real outputs of a tiny run,
and reject documents that break the contract."""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO, TINY_CONFIG, write_config

jsonschema = pytest.importorskip("jsonschema")

from edgekd import schema  # noqa: E402
from edgekd.cli import main  # noqa: E402


def errors(name: str, document: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema.load(name))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_every_shipped_schema_is_a_valid_draft_2020_12_schema() -> None:
    shipped = sorted(p.name for p in (REPO / "edgekd" / "schemas").glob("*.json"))
    assert shipped == sorted(schema.FILES.values())
    for name in schema.FILES:
        jsonschema.Draft202012Validator.check_schema(schema.load(name))


# --------------------------------------------------------------------------------------------------
# pipeline.yaml


def test_config_schema_is_generated_from_the_models_and_in_sync() -> None:
    shipped = (REPO / "edgekd" / "schemas" / "pipeline.schema.json").read_text()
    assert schema.render("config") == shipped, "regenerate: python -m edgekd.schema config > edgekd/schemas/pipeline.schema.json"
    printed = CliRunner().invoke(main, ["schema", "config"])
    assert printed.exit_code == 0 and printed.stdout == shipped
    properties = schema.load("config")["properties"]
    assert set(properties) == {"name", "seed", "device", "output_dir", "data", "teacher", "student", "distill",
                               "prune", "export", "quantize", "benchmark", "budgets", "report"}
    assert properties["seed"]["description"].startswith("Seed of splits, initialisation and shuffling")  # the docstrings


def test_shipped_configs_validate_and_mistakes_are_caught_by_the_schema() -> None:
    shipped = [REPO / "pipeline.yaml", REPO / "edgekd" / "templates" / "pipeline.yaml",
               *sorted((REPO / "benchmarks" / "pipelines").glob("*.yaml"))]
    for path in shipped:
        assert errors("config", yaml.safe_load(path.read_text())) == [], path
    assert errors("config", TINY_CONFIG) == []
    assert errors("config", {**TINY_CONFIG, "prune": None, "quantize": None}) == []  # null switches a stage off
    assert errors("config", {"distill": {"epoch": 2}})  # unknown key (the YAML spelling is checked too)
    assert errors("config", {"prune": {"global": True}}) == [] and errors("config", {"prune": {"global_pruning": True}})
    assert errors("config", {"data": {"dataset": "mnist"}})  # not one of the datasets
    assert errors("config", {"distill": {"temperature": -1}})  # must be > 0
    assert errors("config", {"seed": "zero"})


def test_init_writes_the_schema_beside_the_config_and_points_editors_to_it(tmp_path: Path) -> None:
    target = tmp_path / "configs" / "edge.yaml"
    target.parent.mkdir()
    result = CliRunner().invoke(main, ["init", str(target)])
    assert result.exit_code == 0, result.output
    first = target.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=pipeline.schema.json"
    referenced = target.parent / first.split("$schema=", 1)[1]  # the language server resolves it against the file
    assert referenced.read_text() == schema.render("config")
    root_first = (REPO / "pipeline.yaml").read_text().splitlines()[0]
    assert (REPO / root_first.split("$schema=", 1)[1]).is_file()


# --------------------------------------------------------------------------------------------------
# Outputs of a real tiny run


@dataclass
class HostAsEmulator:
    """arm-check's emulator interface with this machine standing in for qemu (no aarch64 here): the same
    arm_check code path, writing the same arm_check.json a real emulated run writes."""

    cpu: str | None = None
    versions: dict[str, str] | None = None

    def command(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def env(self, extra_path: Path | None = None) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(extra_path or "")}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import numpy as np

    import edgekd
    from edgekd.gate import armcheck

    folder = tmp_path_factory.mktemp("schemas")
    config = write_config(folder, {"teacher": {"train": {"epochs": 1}}, "distill": {"epochs": 1},
                                   "budgets": {"min_accuracy": 0.01, "latency_p90_ms": 1000}})
    result = edgekd.run(config, output_dir=folder / "run")
    run_dir = result.run_dir
    docs: dict[str, Any] = {"run_dir": run_dir, "report": json.loads((run_dir / "report.json").read_text())}

    bench = CliRunner().invoke(main, ["bench", str(run_dir / "deploy" / "model.onnx"), "--data", str(run_dir / "eval.npz"),
                                      "--batch", "1", "--batch", "4", "--warmup", "1", "--iterations", "5",
                                      "--json", str(folder / "bench.json")])
    assert bench.exit_code == 0, bench.output
    docs["bench"] = json.loads((folder / "bench.json").read_text())

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the bundle runs on its own
    device = subprocess.run([sys.executable, "run_on_device.py", "--threads", "1", "--batch", "1", "--iterations", "5",
                             "--warmup", "1", "--out", str(folder / "device.json")], cwd=run_dir / "deploy", env=env,
                            capture_output=True, text=True, timeout=300)
    assert device.returncode == 0, device.stderr[-2000:]
    docs["device"] = json.loads((folder / "device.json").read_text())

    with pytest.MonkeyPatch.context() as patch:
        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise armcheck.ArmUnavailable("no qemu here")

        patch.setattr(armcheck, "ensure_emulator", unavailable)
        with pytest.raises(armcheck.ArmUnavailable):
            armcheck.arm_check(run_dir, samples=16)
        docs["arm_unavailable"] = json.loads((run_dir / "arm_check.json").read_text())
        host = {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
                "onnxruntime": __import__("onnxruntime").__version__, "qemu": "none (host stand-in)"}
        patch.setattr(armcheck, "ensure_emulator", lambda *a, **k: HostAsEmulator(versions=host))
        docs["arm_passed"] = armcheck.arm_check(run_dir, samples=16)

    merged = CliRunner().invoke(main, ["report", str(run_dir), "--merge", str(folder / "device.json")])
    assert merged.exit_code == 0, merged.output
    docs["report_merged"] = json.loads((run_dir / "report.json").read_text())
    return docs


def test_report_json_of_a_tiny_run_matches_its_schema(outputs: dict[str, Any]) -> None:
    report = outputs["report"]
    assert errors("report", report) == []
    assert {row["name"] for row in report["artifacts"]} == {"teacher", "student", "pruned", "int8"}
    merged = outputs["report_merged"]  # with a device's measurements and an arm-check merged in
    assert merged["devices"] and merged["arm_check"]["status"] == "passed"
    assert errors("report", merged) == []


def test_bench_json_matches_its_schema_and_carries_a_schema_version(outputs: dict[str, Any]) -> None:
    bench = outputs["bench"]
    assert bench["schema_version"] == 1 and [r["batch"] for r in bench["rows"]] == [1, 4]
    assert bench["accuracy"] is not None and bench["memory"] is not None
    assert errors("bench", bench) == []


def test_device_json_matches_its_schema(outputs: dict[str, Any]) -> None:
    device = outputs["device"]
    assert device["artifacts"][0]["latency_ms"] and device["artifacts"][0]["accuracy"] is not None
    assert errors("device", device) == []


def test_arm_check_json_matches_its_schema_when_unavailable_and_when_passed(outputs: dict[str, Any]) -> None:
    unavailable, passed = outputs["arm_unavailable"], outputs["arm_passed"]
    assert unavailable["status"] == "unavailable" and errors("arm-check", unavailable) == []
    assert passed["status"] == "passed" and passed["comparison"]["agreement"] == 1.0
    assert passed["device_runner"]["ok"] and errors("arm-check", passed) == []


def test_output_schemas_reject_documents_that_break_the_contract(outputs: dict[str, Any]) -> None:
    report = copy.deepcopy(outputs["report"])
    assert errors("report", {**report, "schema_version": 2})
    assert errors("report", {k: v for k, v in report.items() if k != "deployed"})
    report["artifacts"][0]["latency_ms"][0]["p50"] = "fast"
    assert any("latency_ms/0/p50" in e for e in errors("report", report))
    assert errors("report", {**outputs["report"], "budgets": [{"name": "latency_ms", "limit": 1, "value": 1,
                                                                  "passed": True, "artifact": "x", "message": ""}]})
    assert errors("bench", {k: v for k, v in outputs["bench"].items() if k != "schema_version"})
    assert errors("device", {**outputs["device"], "artifacts": []})
    assert errors("arm-check", {**outputs["arm_passed"], "status": "ok"})
    assert errors("arm-check", {**outputs["arm_unavailable"], "comparison": {"samples": 1}})  # unavailable: no comparison
    assert errors("report", {**outputs["report"], "extra_key_from_a_newer_edgekd": 1}) == []  # readers ignore new keys
