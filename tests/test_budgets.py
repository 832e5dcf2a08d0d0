"""Budgets, artifact choice, `edgekd check`, `edgekd compare` and JUnit output, on hand-made reports."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgekd.gate.budgets import evaluate_report, load_report, normalize_budgets
from edgekd.gate.compare import compare_reports
from edgekd.gate.junit import write_junit_for_report
from edgekd.cli import main
from edgekd.errors import InputError
from edgekd.report.build import build_report
from edgekd.report.choice import choose_artifact
from edgekd.gate.compare import parse_fraction
from report_fixture import latency_rows, make_manifest, samples

BUDGETS = {"latency_p90_ms": 1.0, "size_kb": 100, "min_accuracy": 0.95, "max_accuracy_drop": 0.02, "min_speedup": 2.0}


def report_doc(tmp_path: Path, budgets: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    manifest = make_manifest(tmp_path, **options)
    return build_report(manifest, tmp_path, normalize_budgets(BUDGETS if budgets is None else budgets), run_name="t")


def write(tmp_path: Path, name: str, report: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return path


def slowed(report: dict[str, Any], artifact: str, factor: float, teacher_factor: float = 1.0) -> dict[str, Any]:
    """A copy of `report` whose artifact (and optionally teacher) latencies are scaled."""
    new = copy.deepcopy(report)
    for row in new["artifacts"]:
        scale = factor if row["name"] == artifact else teacher_factor if row["name"] == "teacher" else 1.0
        for entry in row["latency_ms"]:
            for key in ("p50", "p90", "p99", "mean", "std", "min", "max"):
                entry[key] = entry[key] * scale
        row["latency_samples_ms"] = [s * scale for s in row["latency_samples_ms"]]
    return new


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# --------------------------------------------------------------------------------------------------
# Budget validation and verdicts


def test_normalize_budgets_rejects_unknown_name_with_suggestion() -> None:
    with pytest.raises(InputError) as info:
        normalize_budgets({"min_acuracy": 0.9})
    assert str(info.value) == "budgets: min_acuracy: unknown key; did you mean 'min_accuracy'?"


@pytest.mark.parametrize("raw, message", [
    ({"size_kb": -1}, "budgets: size_kb: must be > 0 (got -1)"),
    ({"min_accuracy": 95}, "budgets: min_accuracy: must be <= 1 (got 95)"),
    ({"latency_threads": 0}, "budgets: latency_threads: must be >= 1 (got 0)"),
    ({"size_kb": "big"}, "budgets: size_kb: must be a number (got 'big')"),
    ({"size_kb": True}, "budgets: size_kb: must be a number (got True)"),
    ({"size_kb": float("nan")}, "budgets: size_kb: must be a finite number (got nan)"),
])
def test_normalize_budgets_rejects_bad_values(raw: dict, message: str) -> None:
    with pytest.raises(InputError) as info:
        normalize_budgets(raw)
    assert str(info.value) == message


def test_evaluate_report_says_which_budget_fails_and_by_how_much(tmp_path: Path) -> None:
    report = report_doc(tmp_path, {"latency_p90_ms": 0.05, "min_accuracy": 0.95})
    verdicts = {v["name"]: v for v in evaluate_report(report, normalize_budgets({"latency_p90_ms": 0.05}))}
    latency = verdicts["latency_p90_ms"]
    assert latency["passed"] is False and latency["artifact"] == "int8"
    assert latency["value"] == pytest.approx(0.0618) and latency["over"] == pytest.approx(0.0118)
    assert "over by 0.012 ms (23.6%)" in latency["message"]


def test_evaluate_report_max_accuracy_drop_and_speedup_are_relative_to_teacher(tmp_path: Path) -> None:
    report = report_doc(tmp_path, {})
    verdicts = {v["name"]: v for v in evaluate_report(report, normalize_budgets(
        {"max_accuracy_drop": 0.01, "min_speedup": 8.0}))}
    assert verdicts["max_accuracy_drop"]["value"] == pytest.approx(0.988 - 0.970)
    assert verdicts["max_accuracy_drop"]["passed"] is False
    assert verdicts["min_speedup"]["value"] == pytest.approx(0.40 / 0.06, rel=1e-4)
    assert "short by" in verdicts["min_speedup"]["message"]


# --------------------------------------------------------------------------------------------------
# Artifact choice


def test_choose_artifact_picks_fastest_meeting_accuracy_budgets(tmp_path: Path) -> None:
    # int8 is fastest but below min_accuracy: pruned (next fastest, accurate enough) is deployed.
    report = report_doc(tmp_path, {"min_accuracy": 0.971}, accuracy={"int8": 0.95})
    assert report["deployed"]["artifact"] == "pruned"
    assert report["deployed"]["reason"].startswith("fastest artifact meeting the accuracy budgets")
    assert report["budgets_passed"] is True


def test_choose_artifact_skips_int8_fallback(tmp_path: Path) -> None:
    report = report_doc(tmp_path, {}, int8_deployable=False)
    assert report["deployed"]["artifact"] == "pruned"
    int8 = next(c for c in report["candidates"] if c["artifact"] == "int8")
    assert int8["eligible"] is False and "int8 fallback" in int8["excluded_reason"]
    assert any(f["kind"] == "int8_fallback" for f in report["flags"])


def test_choose_artifact_never_deploys_teacher_or_baseline_unless_only_candidate(tmp_path: Path) -> None:
    fast = {"teacher": 0.01, "student_baseline": 0.02}  # even when they are the fastest
    report = report_doc(tmp_path, {}, p50=fast)
    assert report["deployed"]["artifact"] == "int8"
    rows = [r for r in make_manifest(tmp_path).metrics("benchmark")["artifacts"] if r["name"] == "teacher"]
    choice, _ = choose_artifact(rows, normalize_budgets({}))
    assert choice["artifact"] == "teacher" and "only candidate" in choice["reason"]


def test_choose_artifact_without_any_passing_candidate_reports_misses(tmp_path: Path) -> None:
    report = report_doc(tmp_path, {"latency_p90_ms": 0.01, "min_accuracy": 0.95, "size_kb": 1})
    assert report["budgets_passed"] is False
    assert report["deployed"]["artifact"] == "int8"  # fastest meeting the accuracy budget
    assert report["deployed"]["reason"].startswith("no artifact meets every budget")
    for candidate in report["candidates"]:
        assert {m["name"] for m in candidate["misses"]} >= {"latency_p90_ms", "size_kb"}
        assert all(m["over"] > 0 for m in candidate["misses"])


def test_choose_artifact_falls_back_to_most_accurate_when_none_is_accurate(tmp_path: Path) -> None:
    report = report_doc(tmp_path, {"min_accuracy": 0.99})
    assert report["deployed"]["artifact"] == "student"  # 0.975: most accurate non-reference candidate
    assert "no artifact meets the accuracy budgets" in report["deployed"]["reason"]


# --------------------------------------------------------------------------------------------------
# edgekd check


def test_check_exit_code_zero_when_budgets_met(tmp_path: Path) -> None:
    result = run_cli("check", str(write(tmp_path, "r.json", report_doc(tmp_path))))
    assert result.exit_code == 0, result.output
    assert "PASS latency_p90_ms" in result.output and "FAIL" not in result.output


def test_check_exit_code_one_with_flag_override_naming_budget_and_amount(tmp_path: Path) -> None:
    path = write(tmp_path, "r.json", report_doc(tmp_path))
    result = run_cli("check", str(path), "--latency-p90-ms", "0.05", "--junit", str(tmp_path / "j.xml"))
    assert result.exit_code == 1
    assert "FAIL latency_p90_ms: 0.062 ms > 0.050 ms at 1 thread, batch 1: over by 0.012 ms" in result.output
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite.get("failures") == "1" and suite.get("tests") == str(len(BUDGETS))


def test_check_budgets_file_replaces_report_budgets(tmp_path: Path) -> None:
    path = write(tmp_path, "r.json", report_doc(tmp_path))
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("budgets:\n  size_kb: 1.0\n")
    result = run_cli("check", str(path), "--budgets", str(budgets))
    assert result.exit_code == 1
    assert "FAIL size_kb" in result.output and "latency_p90_ms" not in result.output


@pytest.mark.parametrize("content, message", [
    ('{"schema_version": 99, "artifacts": []}', "schema_version 99 is not supported"),
    ('{"schema_version": 1, "artifacts": [{"na', "not valid JSON, truncated?"),
])
def test_check_exit_code_two_on_bad_report(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "r.json"
    path.write_text(content)
    result = run_cli("check", str(path))
    assert result.exit_code == 2 and message in result.output  # click's output holds stderr too


def test_check_exit_code_two_on_unknown_budget_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "r.json", report_doc(tmp_path))
    budgets = tmp_path / "b.json"
    budgets.write_text('{"max_latency_ms": 1}')
    result = run_cli("check", str(path), "--budgets", str(budgets))
    assert result.exit_code == 2 and "max_latency_ms: unknown key" in result.output


def test_write_junit_for_report_one_case_per_budget(tmp_path: Path) -> None:
    report = report_doc(tmp_path, {"latency_p90_ms": 0.05, "min_accuracy": 0.9})
    write_junit_for_report(write(tmp_path, "r.json", report), tmp_path / "out.xml")
    suite = ET.parse(tmp_path / "out.xml").getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == {"latency_p90_ms", "min_accuracy", "deployed_artifact"}
    assert cases["latency_p90_ms"].find("failure") is not None and cases["min_accuracy"].find("failure") is None
    assert "over by" in cases["latency_p90_ms"].find("failure").get("message")


def test_load_report_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        load_report(tmp_path / "nope.json")


# --------------------------------------------------------------------------------------------------
# edgekd compare


def test_compare_flags_20_percent_regression_and_passes_3_percent(tmp_path: Path) -> None:
    base = report_doc(tmp_path)
    base_path = write(tmp_path, "base.json", base)
    bad = run_cli("compare", str(base_path), str(write(tmp_path, "bad.json", slowed(base, "int8", 1.20))),
                  "--max-latency-regression", "10%")
    assert bad.exit_code == 1, bad.output
    assert "REGRESSION" in bad.output and "+20.0%" in bad.output
    ok = run_cli("compare", str(base_path), str(write(tmp_path, "ok.json", slowed(base, "int8", 1.03))),
                 "--max-latency-regression", "10%")
    assert ok.exit_code == 0, ok.output
    assert "verdict: PASS" in ok.output


def test_compare_inconclusive_when_noise_exceeds_threshold(tmp_path: Path) -> None:
    base = report_doc(tmp_path)
    for row in base["artifacts"]:  # few, widely spread runs
        row["latency_samples_ms"] = samples(0.06, spread=0.8, n=8, seed=1)
    result = compare_reports(base, slowed(base, "int8", 1.2), max_latency_regression=0.10)
    assert result["verdict"] == "inconclusive" and result["exit_code"] == 4
    gated = [r for r in result["rows"] if r["gated"] and r["metric"].startswith("p50 ms")]
    assert gated[0]["noise"] > 0.10 and "noise" in gated[0]["note"]


def test_compare_different_environment_gates_only_ratio(tmp_path: Path) -> None:
    base = report_doc(tmp_path)
    slower_runner = slowed(base, "int8", 1.5, teacher_factor=1.5)  # everything 50% slower: the ratio is unchanged
    slower_runner["environment"].update(cpu="Other CPU", fingerprint="0000000000000000")
    result = compare_reports(base, slower_runner, max_latency_regression=0.10)
    assert result["verdict"] == "pass" and result["mode"] == "relative" and not result["same_environment"]
    assert "DIFFERENT environments" in result["warnings"][0]
    absolute = next(r for r in result["rows"] if r["artifact"] == "int8" and r["metric"].startswith("p50 ms"))
    assert absolute["gated"] is False and absolute["change"] == pytest.approx(0.5)
    forced = compare_reports(base, slower_runner, max_latency_regression=0.10, allow_env_mismatch=True)
    assert forced["verdict"] == "regression" and forced["mode"] == "both"


def test_compare_relative_mode_catches_artifact_only_slowdown(tmp_path: Path) -> None:
    base = report_doc(tmp_path)
    result = compare_reports(base, slowed(base, "int8", 1.3), latency_mode="relative", max_latency_regression=0.10)
    ratio = next(r for r in result["rows"] if r["gated"] and "teacher" in r["metric"])
    assert result["verdict"] == "regression" and ratio["change"] == pytest.approx(0.3)


def test_compare_accuracy_drop_is_a_regression(tmp_path: Path) -> None:
    base = report_doc(tmp_path)
    new = copy.deepcopy(base)
    next(r for r in new["artifacts"] if r["name"] == "int8")["accuracy"] -= 0.01
    result = run_cli("compare", str(write(tmp_path, "b.json", base)), str(write(tmp_path, "n.json", new)),
                     "--max-accuracy-drop", "0.005", "--junit", str(tmp_path / "c.xml"))
    assert result.exit_code == 1
    assert ET.parse(tmp_path / "c.xml").getroot().find("testsuite").get("failures") == "1"


def test_parse_fraction_accepts_percent_and_fraction_rejects_ambiguous() -> None:
    assert parse_fraction("10%", "x") == pytest.approx(0.10) and parse_fraction("0.005", "x") == 0.005
    with pytest.raises(InputError, match="percentage like 10%"):
        parse_fraction("10", "--max-latency-regression")


def test_latency_rows_fixture_is_ordered() -> None:
    for entry in latency_rows(0.1):
        assert entry["p50"] <= entry["p90"] <= entry["p99"]


# --------------------------------------------------------------------------------------------------
# deploy/ci


REPO = Path(__file__).resolve().parents[1]


def test_ci_workflow_parses_and_uses_existing_options() -> None:
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((REPO / "deploy/ci/edgekd-budgets.yml").read_text())
    steps = workflow["jobs"]["budgets"]["steps"]
    script = "\n".join(step.get("run", "") for step in steps)
    assert "edgekd run" in script and "--junit" in script and "edgekd compare" in script
    for command, options in (("run", ["--output-dir", "--junit"]),
                             ("compare", ["--latency-mode", "--max-latency-regression", "--max-accuracy-drop",
                                          "--noise-floor", "--junit"])):
        help_text = run_cli(command, "--help").output
        assert all(option in help_text for option in options), command


def test_ci_gate_script_checks_and_compares_an_existing_report(tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess

    if shutil.which("edgekd") is None:
        pytest.skip("the edgekd console script is not on PATH (pip install -e .)")
    report = report_doc(tmp_path)
    run_dir = tmp_path / "runs" / "ci"
    run_dir.mkdir(parents=True)
    write(run_dir, "report.json", report)
    write(tmp_path, "baseline.json", slowed(report, "int8", 0.5))  # the new run is 2x slower than the baseline
    env = {**os.environ, "EDGEKD_CHECK_ONLY": "1", "EDGEKD_RUN_DIR": str(run_dir)}
    done = subprocess.run(["sh", str(REPO / "deploy/ci/gate.sh"), "unused.yaml", str(tmp_path / "baseline.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "every budget met" in done.stdout and "REGRESSION" in done.stdout
    assert (tmp_path / "ci-results" / "budgets.xml").is_file() and (tmp_path / "ci-results" / "compare.xml").is_file()


def test_check_and_compare_import_neither_torch_nor_matplotlib(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write(tmp_path, "r.json", report_doc(tmp_path))
    code = ("import sys\nfrom click.testing import CliRunner\nfrom edgekd.cli import main\n"
            f"assert CliRunner().invoke(main, ['check', {str(path)!r}]).exit_code == 0\n"
            f"assert CliRunner().invoke(main, ['compare', {str(path)!r}, {str(path)!r}]).exit_code == 0\n"
            "print(sorted(m for m in ('torch', 'matplotlib', 'onnx', 'yaml') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # a CI runner with only the runtime install (pydantic included) can gate
