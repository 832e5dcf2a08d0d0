"""report.html opened in a real browser (headless Chromium): plots decode, one table row per artifact,
budget verdicts visible. A screenshot is saved in the test's tmp dir.

DOM facts come from `chromium --dump-dom` on a copy of the report with a small script appended that, on
load, writes what it measured into `document.body.dataset.check` (the shipped report has no script).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnx")
pytest.importorskip("matplotlib")

from report_fixture import make_run  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((found for name in BROWSERS if (found := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="headless Chromium not installed (apt-get install -y chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio"]

CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const visible = (el) => {
    const box = el.getBoundingClientRect(), style = getComputedStyle(el);
    return box.width > 0 && box.height > 0 && style.visibility !== "hidden" && style.display !== "none"
      && parseFloat(style.opacity) > 0;
  };
  const external = [...document.querySelectorAll("[src],[href]")]
    .map((el) => el.getAttribute("src") || el.getAttribute("href"))
    .filter((url) => /^(https?:)?\\/\\//i.test(url));
  document.body.dataset.check = JSON.stringify({
    images: [...document.querySelectorAll("img.plot")].map((img) => ({
      alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight, visible: visible(img)})),
    artifactRows: [...document.querySelectorAll("table.artifacts tbody tr")].map((tr) => tr.cells[0].textContent),
    verdicts: [...document.querySelectorAll("table.budgets .verdict")].map((el) => ({
      text: el.textContent, visible: visible(el), color: getComputedStyle(el).color})),
    banner: {text: document.getElementById("verdict").textContent, visible: visible(document.getElementById("verdict"))},
    external: external,
  });
});
</script>"""


def chromium(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"  # fresh profile per launch
    env = {**os.environ, "HOME": str(tmp_path)}  # nothing written to the real home
    return subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from click.testing import CliRunner

    from edgekd.cli import main

    # One budget breached (int8 p90 is 0.062 ms), so both PASS and FAIL verdicts are on the page.
    budgets = {"latency_p90_ms": 0.05, "min_accuracy": 0.95, "size_kb": 100, "min_speedup": 2.0}
    run_dir = make_run(tmp_path_factory.mktemp("browser"), budgets=budgets)
    result = CliRunner().invoke(main, ["report", str(run_dir)], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    return run_dir / "report.html", json.loads((run_dir / "report.json").read_text())


def test_report_html_renders_plots_rows_and_verdicts_in_chromium(report_html: tuple[Path, dict[str, Any]],
                                                                 tmp_path: Path) -> None:
    page, report = report_html
    probe = tmp_path / "report_probe.html"
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    done = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'data-check="([^"]*)"', done.stdout)
    assert found, f"the check script did not run; DOM starts: {done.stdout[:500]!r}"
    check = json.loads(html.unescape(found.group(1)))

    assert len(check["images"]) == 3
    for image in check["images"]:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0 and image["visible"], image
    assert len(check["artifactRows"]) == len(report["artifacts"]) == 5
    assert check["artifactRows"][-1] == "int8 (deployed)"
    verdicts = {v["text"] for v in check["verdicts"]}
    assert verdicts == {"PASS", "FAIL"} and len(check["verdicts"]) == 4
    assert all(v["visible"] for v in check["verdicts"])
    assert check["banner"]["visible"] and check["banner"]["text"].startswith("FAIL: 1 of 4 budgets breached")
    assert check["external"] == []


def test_report_html_screenshot(report_html: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    page, _ = report_html
    shot = tmp_path / "report.png"
    done = chromium(tmp_path, "--window-size=1280,3600", f"--screenshot={shot}", page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 50_000  # a page with tables and plots, not a blank one
