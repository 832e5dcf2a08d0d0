"""The Python API (`edgekd.run`, `edgekd.load_config`, `edgekd.runtime`), `--set` overrides, and logging:
the library attaches no console handler and keeps propagation on; the CLI logs to stderr (-v / -q)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from conftest import TINY_CONFIG, write_config

import edgekd
from edgekd.config import apply_overrides, parse_set_options
from edgekd.errors import ConfigError


@pytest.fixture
def cli_console() -> Iterator[None]:
    """CLI invocations in this process install the console handler on the root logger: take it off after."""
    from edgekd.console import StderrHandler

    before = list(logging.getLogger().handlers), logging.getLogger("edgekd").level
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StderrHandler) and h not in before[0]]:
        root.removeHandler(handler)
    logging.getLogger("edgekd").setLevel(before[1])


def invoke(*args: str) -> Any:
    from edgekd.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# --------------------------------------------------------------------------------------------------
# One in-process run (distill 1 epoch, no pruning), shared by the tests that read it


@pytest.fixture(scope="module")
def api_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any], Path]:
    folder = tmp_path_factory.mktemp("api")
    config = write_config(folder, {"budgets": {"min_accuracy": 0.01}})
    root, package = logging.getLogger(), logging.getLogger("edgekd")
    before = {"root": list(root.handlers), "root_level": root.level, "edgekd": list(package.handlers),
              "level": package.level, "propagate": package.propagate}
    records: list[logging.LogRecord] = []
    spy = logging.Handler()
    spy.emit = records.append  # type: ignore[method-assign]
    root.addHandler(spy)  # what a notebook's logging.basicConfig() would install
    try:
        result = edgekd.run(config, output_dir=folder / "out", distill__epochs=1, overrides={"prune": None})
    finally:
        root.removeHandler(spy)
    after = {"root": list(root.handlers), "root_level": root.level, "edgekd": list(package.handlers),
             "level": package.level, "propagate": package.propagate}
    return result, {"before": before, "after": after, "records": records}, config


def test_run_returns_a_typed_result_with_the_deployed_model_budgets_and_report(api_run) -> None:
    result, _, _ = api_run
    assert isinstance(result, edgekd.api.RunResult)
    assert result.run_dir.name == "out" and result.ran == ["teacher", "distill", "export", "quantize", "benchmark",
                                                            "report"]
    assert result.budgets_passed is True
    assert [(v.name, v.passed) for v in result.budgets] == [("min_accuracy", True)]
    assert result.deployed is not None and result.deployed.path == result.run_dir / "deploy" / "model.onnx"
    assert result.deployed.path.is_file() and result.deployed.artifact in {"student", "int8", "teacher"}
    assert result.report_json == result.run_dir / "report.json" and result.report_md.is_file()
    assert result.report()["deployed"]["artifact"] == result.deployed.artifact
    # the overrides are part of the resolved config that ran, and of the record on disk
    assert result.config.distill.epochs == 1 and result.config.prune is None
    recorded = yaml.safe_load((result.run_dir / "resolved-config.yaml").read_text())
    assert recorded["distill"]["epochs"] == 1 and recorded["prune"] is None


def test_run_leaves_logging_configuration_alone_and_propagates(api_run) -> None:
    _, logs, _ = api_run
    assert logs["after"] == logs["before"]  # no handler added or left on the root or edgekd loggers
    assert logs["before"]["propagate"] is True
    messages = [r.getMessage() for r in logs["records"] if r.name.startswith("edgekd")]
    assert any(m.startswith("[teacher] running") for m in messages)  # reached the root handler (a notebook's)
    log_txt = (api_run[0].run_dir / "log.txt").read_text()
    assert "[report] done" in log_txt and " INFO " in log_txt  # the run's own record is complete


def test_cli_logs_to_stderr_and_set_matches_the_api_override(api_run, cli_console) -> None:
    result, _, config = api_run
    args = ["run", str(config), "--output-dir", str(result.run_dir), "--set", "distill.epochs=1", "--set", "prune=null"]
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert again.stdout == ""  # logs are not results
    assert "[teacher] up to date" in again.stderr and "[report] up to date" in again.stderr  # same config as the API's
    quiet = invoke("-q", *args)
    assert quiet.exit_code == 0 and quiet.stderr == ""
    quiet_too = invoke(*args, "-q")  # after the subcommand too
    assert quiet_too.exit_code == 0 and quiet_too.stderr == ""
    verbose = invoke(*args, "-v")
    assert verbose.exit_code == 0 and "[teacher] up to date" in verbose.stderr


def test_set_is_validated_like_the_file(tmp_path: Path, cli_console) -> None:
    config = write_config(tmp_path)
    bad_key = invoke("run", str(config), "--set", "distill.epoch=2")
    assert bad_key.exit_code == 2 and "distill.epoch: unknown key; did you mean 'epochs'?" in bad_key.stderr
    bad_value = invoke("run", str(config), "--set", "distill.temperature=-1")
    assert bad_value.exit_code == 2 and "distill.temperature: must be > 0 (got -1)" in bad_value.stderr
    no_equals = invoke("run", str(config), "--set", "distill.epochs")
    assert no_equals.exit_code == 2 and "expected KEY.PATH=VALUE" in no_equals.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def test_apply_overrides_sets_merges_and_switches_sections() -> None:
    raw = {"distill": {"epochs": 3, "lr": 0.01}, "prune": None, "seed": 0}
    assert apply_overrides(raw, {"distill.epochs": 1}) == {"distill": {"epochs": 1, "lr": 0.01}, "prune": None,
                                                           "seed": 0}
    assert apply_overrides(raw, {"distill": {"temperature": 2}})["distill"] == {"epochs": 3, "lr": 0.01,
                                                                                "temperature": 2}
    assert apply_overrides(raw, {"prune.ratio": 0.5})["prune"] == {"ratio": 0.5}  # a null section switched on
    assert apply_overrides(raw, {"distill": None})["distill"] is None
    assert raw["distill"] == {"epochs": 3, "lr": 0.01}  # the input is not modified
    with pytest.raises(ConfigError, match="seed is not a section"):
        apply_overrides(raw, {"seed.x": 1})
    assert parse_set_options(["distill.lr=1e-3", "benchmark.threads=[1, 2]", "quantize=null", "name=a-b"]) == {
        "distill.lr": 0.001, "benchmark.threads": [1, 2], "quantize": None, "name": "a-b"}


def test_load_config_takes_overrides_and_python_api_takes_a_mapping(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    cfg = edgekd.load_config(config, {"distill.temperature": 2.5})
    assert cfg.distill.temperature == 2.5 and cfg.run_dir == (tmp_path / "runs" / "tiny").resolve()
    from edgekd.api import resolve_config

    mapping = resolve_config({**TINY_CONFIG, "output_dir": str(tmp_path / "o")}, {"student__model": "cnn_small"})
    assert mapping.student.model == "cnn_small"
    with pytest.raises(ConfigError, match="distill.epochs: must be"):
        resolve_config(cfg, {"distill__epochs": 0})


def test_runtime_api_benchmarks_and_evaluates_without_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    import numpy as np
    import onnx
    from onnx_models import tiny_classifier

    model, data = tmp_path / "m.onnx", tmp_path / "eval.npz"
    onnx.save(tiny_classifier(hidden=2, classes=3, size=8), str(model))
    np.savez(data, inputs=np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32),
             labels=np.zeros(16, dtype=np.int64))
    code = f"""
import json, sys
import edgekd.runtime as rt
result = rt.bench_model({str(model)!r}, {str(data)!r}, warmup=1, iterations=3, memory=False, mobile=False)
evaluated = rt.evaluate_model({str(model)!r}, {str(data)!r})
print(json.dumps({{"schema": result["schema_version"], "rows": len(result["rows"]), "same": evaluated["accuracy"]
                  == result["accuracy"], "samples": evaluated["samples"], "torch": "torch" in sys.modules}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"schema": 1, "rows": 1, "same": True, "samples": 16,
                                                                "torch": False}
