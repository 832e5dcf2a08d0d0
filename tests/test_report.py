"""The report stage and `edgekd report`: files written, deploy bundle, re-render, flags, ARM and device rows."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnx")  # the fixture builds real (tiny) ONNX models
pytest.importorskip("matplotlib")

import conftest  # noqa: E402
from edgekd.atomic import sha256_file  # noqa: E402
from edgekd.runner.contract import StageRecord  # noqa: E402
from edgekd.runner.loop import fingerprint, read_manifest, write_manifest  # noqa: E402
from edgekd.cli import main  # noqa: E402
from edgekd.config import PipelineConfig  # noqa: E402
from edgekd.report.build import strip_volatile  # noqa: E402
from edgekd.report.deploy import USAGE  # noqa: E402
from edgekd.report.plots import pareto_front  # noqa: E402
from edgekd.stages import report as report_stage  # noqa: E402
from report_fixture import make_run  # noqa: E402

BUDGETS = {"latency_p90_ms": 1.0, "size_kb": 100, "min_accuracy": 0.95, "max_accuracy_drop": 0.02, "min_speedup": 2.0}
PNG = b"\x89PNG\r\n\x1a\n"


def run_stage(run_dir: Path, budgets: dict[str, Any] | None = None, **report: Any) -> dict[str, Any]:
    """Run the report stage the way the pipeline does (manifest entry written); returns report.json."""
    cfg = PipelineConfig(name=run_dir.name, output_dir=run_dir, budgets=BUDGETS if budgets is None else budgets,
                         report=report)
    manifest = read_manifest(run_dir)
    result = conftest.run_stage(report_stage, cfg, manifest)
    manifest.stages[report_stage.NAME] = StageRecord(
        fingerprint=fingerprint(report_stage.NAME, report_stage.plan(cfg), manifest),
        config=report_stage.plan(cfg).view, artifacts={name: sha256_file(run_dir / name) for name in result.artifacts},
        metrics=result.metrics)
    write_manifest(run_dir, manifest)
    return json.loads((run_dir / "report.json").read_text())


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


NO_PLOTS = {"plots": False}  # plots cost ~2 s a render on a loaded 2-core box; most tests do not look at them


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path, budgets=BUDGETS, report=NO_PLOTS)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """One full render (plots and html) shared by the tests that only read its output."""
    run_dir = make_run(tmp_path_factory.mktemp("rendered"), budgets=BUDGETS)
    logger = logging.getLogger("edgekd")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        report = run_stage(run_dir)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return run_dir, report, "\n".join(records)


def test_report_stage_writes_every_file_it_lists(rendered: tuple[Path, dict[str, Any], str]) -> None:
    run_dir, report, console = rendered
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["report"]
    files = set(entry["artifacts"])
    assert {"report.json", "report.md", "report.html", "deploy/model.onnx", "deploy/labels.json",
            "deploy/preprocess.json", "deploy/README.md", "deploy/eval.npz"} <= files
    assert {f"plots/{n}.png" for n in ("accuracy_vs_latency", "size", "latency_distribution")} <= files
    assert all((run_dir / f).is_file() for f in files)
    assert entry["metrics"]["budgets_passed"] is True and report["budgets_passed"] is True
    assert entry["metrics"]["deployed"] == {k: report["deployed"][k] for k in ("artifact", "path", "reason")}
    assert "PASS latency_p90_ms" in console and "deployed: int8 -> deploy/model.onnx" in console


def test_report_json_has_contract_keys_and_one_row_per_artifact(rendered: tuple[Path, dict[str, Any], str]) -> None:
    report = rendered[1]
    assert report["schema_version"] == 1
    for key in ("environment", "artifacts", "distill", "pruning", "quantization", "budgets", "deployed", "flags"):
        assert key in report
    assert [r["name"] for r in report["artifacts"]] == ["teacher", "student", "student_baseline", "pruned", "int8"]
    env = report["environment"]
    assert env["cpu"] and env["cores"] == 2 and env["onnxruntime"] and env["flags_enabled"] == ["avx2"]
    assert env["execution_provider"] == "CPUExecutionProvider" and env["fingerprint"]
    assert report["distill"]["kd_gain"] == pytest.approx(0.007)
    int8 = report["artifacts"][-1]
    assert int8["speedup_vs_teacher"] == pytest.approx(0.40 / 0.06, rel=1e-3) and int8["sha256"]
    assert {b["name"] for b in report["budgets"]} == set(BUDGETS)
    assert report["deployed"] == {**report["deployed"], "artifact": "int8", "path": "deploy/model.onnx"}


def test_report_plots_are_non_empty_pngs(rendered: tuple[Path, dict[str, Any], str]) -> None:
    from PIL import Image

    run_dir = rendered[0]
    for name in ("accuracy_vs_latency", "size", "latency_distribution"):
        path = run_dir / "plots" / f"{name}.png"
        assert path.read_bytes().startswith(PNG)
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 300
        assert pixels.std() > 5  # drawn, not a blank canvas


def test_report_html_is_self_contained(rendered: tuple[Path, dict[str, Any], str]) -> None:
    run_dir = rendered[0]
    html = (run_dir / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<link" not in html
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", html)
    assert html.count('src="data:image/png;base64,') == 3
    markdown = (run_dir / "report.md").read_text()
    assert "![Accuracy vs p50 latency](plots/accuracy_vs_latency.png)" in markdown
    assert "| int8 (deployed) |" in markdown and "✅ PASS: all 5 budgets met" in markdown


def test_report_rerender_from_manifest_gives_same_report(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, budgets=BUDGETS)  # with plots: the re-render must redo them too
    first = run_stage(run_dir)
    result = cli("report", str(run_dir))
    assert result.exit_code == 0, result.output
    second = json.loads((run_dir / "report.json").read_text())
    assert strip_volatile(second) == strip_volatile(first)
    record = read_manifest(run_dir).record("report")  # the next run still skips it: its artifacts are intact
    assert record.artifacts == {name: sha256_file(run_dir / name) for name in record.artifacts}


def test_deploy_bundle_has_model_labels_preprocess_and_working_snippet(rendered: tuple[Path, dict[str, Any], str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, report, _ = rendered
    deploy = run_dir / "deploy"
    assert (deploy / "model.onnx").read_bytes() == (run_dir / "model.int8.onnx").read_bytes()
    assert json.loads((deploy / "labels.json").read_text()) == ["circle", "square", "cross", "line"]
    pre = json.loads((deploy / "preprocess.json").read_text())
    assert {"layout", "height", "width", "mean", "std", "scale", "input_name", "size"} <= set(pre)
    readme = (deploy / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert code.strip() == USAGE.strip()
    monkeypatch.chdir(deploy)
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # the README's snippet, as a user would paste it
    from PIL import Image

    from edgekd.runtime.preprocess import image_to_input, load_preprocess

    photo = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(photo).save(deploy / "photo.png")  # a colour photo of another size, for a grey 8x8 model
    assert namespace["classify"]("photo.png") in ["circle", "square", "cross", "line"]
    # the snippet is the preprocessing contract: the same input as edgekd's runtime, bit for bit
    np.testing.assert_array_equal(namespace["to_input"]("photo.png"),
                                  image_to_input(deploy / "photo.png", load_preprocess(deploy / "preprocess.json")))
    (deploy / "photo.png").unlink()
    assert "deploy/run_on_device.py" in report["deployed"]["files"] and (deploy / "run_on_device.py").is_file()


def test_int8_fallback_deploys_pruned_with_its_ort_copy(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, budgets=BUDGETS, int8_deployable=False)
    report = run_stage(run_dir, **NO_PLOTS)
    assert report["deployed"]["artifact"] == "pruned"
    assert (run_dir / "deploy" / "model.onnx").read_bytes() == (run_dir / "pruned.onnx").read_bytes()
    assert (run_dir / "deploy" / "model.ort").read_bytes() == b"fake ort flatbuffer"
    assert "int8 not deployable" in (run_dir / "report.md").read_text()


def test_report_cli_exit_one_and_misses_when_no_artifact_meets_budgets(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, budgets={"latency_p90_ms": 0.01, "min_accuracy": 0.95}, report=NO_PLOTS)
    result = cli("report", str(run_dir))
    assert result.exit_code == 1
    assert "FAIL latency_p90_ms: 0.062 ms > 0.010 ms at 1 thread, batch 1: over by 0.052 ms" in result.output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["budgets_passed"] is False and report["deployed"]["artifact"] == "int8"
    markdown = (run_dir / "report.md").read_text()
    assert "❌ FAIL: 1 of 2 budgets breached (latency_p90_ms)" in markdown
    assert "pruned | candidate | 0.100 | 0.9720 | latency_p90_ms: 0.103 ms > 0.010 ms" in markdown


def test_report_flags_pruning_that_did_nothing(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, budgets={}, p50={"pruned": 0.1195})  # student 0.120: < 2% faster
    report = run_stage(run_dir, budgets={}, **NO_PLOTS)
    flags = [f for f in report["flags"] if f["artifact"] == "pruned"]
    assert [f["kind"] for f in flags] == ["no_speed_gain"]
    assert "pruning did nothing for speed" in (run_dir / "report.md").read_text()


def test_report_teacher_deployed_only_as_sole_candidate(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, budgets={}, with_int8=False, with_baseline=False)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    bench = manifest["stages"]["benchmark"]["metrics"]
    bench["artifacts"] = [r for r in bench["artifacts"] if r["name"] == "teacher"]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    report = run_stage(run_dir, budgets={}, **NO_PLOTS)
    assert report["deployed"]["artifact"] == "teacher" and "only candidate" in report["deployed"]["reason"]


def test_report_shows_arm_check_as_emulated_correctness(run_dir: Path) -> None:
    (run_dir / "arm_check.json").write_text(json.dumps({
        "status": "passed", "reason": "within tolerance", "emulator": {"onnxruntime": "1.26.0", "cpu": "max"},
        "comparison": {"agreement": 1.0, "max_abs_diff": 2.5e-6, "samples": 16}}))
    report = run_stage(run_dir, **NO_PLOTS)
    assert report["arm_check"]["agreement"] == 1.0 and report["arm_check"]["onnxruntime_version"] == "1.26.0"
    markdown = (run_dir / "report.md").read_text()
    assert "emulated — correctness only, no latency" in markdown and "2.5e-06" in markdown


def test_report_merge_device_json_adds_device_rows_once(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("edgekd.runtime.device_report")
    run_stage(run_dir, **NO_PLOTS)
    device = {"schema_version": 1, "device": {"cpu": "Cortex-A72", "arch": "aarch64", "cores": 4},
              "artifacts": [{"name": "model", "path": "model.onnx", "accuracy": 0.97,
                             "latency_ms": [{"threads": 1, "batch": 1, "p50": 0.9, "p90": 1.0, "p99": 1.2, "mean": 0.95}]}]}
    path = tmp_path / "device.json"
    path.write_text(json.dumps(device))
    for _ in range(2):
        assert cli("report", str(run_dir), "--merge", str(path)).exit_code == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["devices"]) == 1 and report["devices"][0]["artifacts"][0]["artifact"] == "int8"
    assert "Cortex-A72" in (run_dir / "report.md").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1')
    assert cli("report", str(run_dir), "--merge", str(bad)).exit_code == 2


def test_report_options_turn_off_html_and_plots(run_dir: Path) -> None:
    run_stage(run_dir, html=False, plots=False)
    assert not (run_dir / "report.html").exists() and not list((run_dir / "plots").glob("*.png"))
    assert "![" not in (run_dir / "report.md").read_text()


def test_report_cli_exit_two_on_missing_run_dir(tmp_path: Path) -> None:
    result = cli("report", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "manifest.json" in result.output


def test_report_stage_depends_on_every_enabled_stage() -> None:
    full = PipelineConfig()
    assert report_stage.plan(full).depends_on == ("teacher", "distill", "prune", "export", "quantize", "benchmark")
    lean = PipelineConfig(distill=None, prune=None, quantize=None)
    assert report_stage.plan(lean).depends_on == ("teacher", "export", "benchmark")
    assert set(report_stage.plan(full).view) == {"name", "budgets", "report", "benchmark"}


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(0.4, 0.99), (0.1, 0.97), (0.12, 0.96), (0.06, 0.95), (0.2, 0.97)]
    assert pareto_front(points) == [(0.06, 0.95), (0.1, 0.97), (0.4, 0.99)]
