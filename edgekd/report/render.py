"""Write a run's report files (report.json/.md/.html, plots/*.png, deploy/) from its manifest.

Used by the report stage and by `edgekd report RUN_DIR` (re-render, optionally merging device results).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from edgekd import atomic
from edgekd.errors import InputError
from edgekd.gate.budgets import normalize_budgets, verdict_lines
from edgekd.report.build import build_report
from edgekd.report.deploy import write_deploy_bundle
from edgekd.report.plots import PLOTS
from edgekd.runner.contract import Manifest
from edgekd.runner.files import MANIFEST, RESOLVED_CONFIG, RunFiles, read_manifest, write_manifest

log = logging.getLogger("edgekd")
DEVICES_DIR = "devices"


def write_report(manifest: Manifest, files: RunFiles, budgets: dict[str, Any], *, html: bool = True,
                 plots: bool = True, run_name: str | None = None,
                 deploy_runtime: str = "onnx") -> tuple[dict[str, Any], list[str]]:
    """Build and write everything (through `files`: only paths edgekd owns); returns (report, files written
    relative to the run directory).

    report.json is written last, so its presence means the rest of the report is there too.
    """
    run_dir = files.run_dir
    from edgekd.stages.report.config import DEPLOY_RUNTIMES

    report = build_report(manifest, run_dir, budgets, run_name=run_name,
                          deploy_runtime=DEPLOY_RUNTIMES.get(deploy_runtime, deploy_runtime))
    written = write_deploy_bundle(report, manifest, files)
    report["deployed"]["files"] = written
    images: dict[str, bytes] = {}
    if plots:
        from edgekd.report.plots import render_plots

        images = render_plots(report)
    for name in PLOTS:  # drop plots of an earlier render that are not drawn now
        if name not in images:
            files.remove(f"plots/{name}.png")
    for name, png in images.items():
        atomic.write_bytes(files.path(f"plots/{name}.png"), png)
        written.append(f"plots/{name}.png")
    from edgekd.report.markdown import render_markdown

    atomic.write_text(files.path("report.md"), render_markdown(report, list(images)))
    written.append("report.md")
    if html:
        from edgekd.report.html import render_html

        atomic.write_text(files.path("report.html"), render_html(report, images))
        written.append("report.html")
    else:
        files.remove("report.html")
    atomic.write_json(files.path("report.json"), report)
    written.append("report.json")
    return report, written


def stage_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """What the report stage records in the manifest (RunOutcome.budgets_passed reads budgets_passed)."""
    deployed = report["deployed"]
    return {"budgets_passed": bool(report["budgets_passed"]),
            "deployed": {k: deployed[k] for k in ("artifact", "path", "reason")},
            "budgets": report["budgets"], "flags": report["flags"]}


def log_verdicts(report: dict[str, Any]) -> None:
    """The console lines: each budget's verdict (failures first, with by how much), then the choice."""
    deployed = report["deployed"]
    settings = report.get("budget_settings") or {}
    if report["budgets"]:
        log.info("  budgets of %s (latency at %s thread(s), batch %s):", deployed["artifact"],
                 settings.get("latency_threads", 1), settings.get("latency_batch", 1))
        for line in verdict_lines(report["budgets"]):
            log.info("    %s", line)
    else:
        log.info("  no budgets set")
    # The rule only: the misses were just printed as FAIL lines.
    log.info("  deployed: %s -> %s (%s)", deployed["artifact"], deployed["path"], deployed.get("rule") or deployed["reason"])
    for flag in report.get("flags") or []:
        log.warning("  warning: %s", flag["message"])
    for candidate in report.get("candidates") or []:
        if candidate["eligible"] and candidate["misses"] and not report["budgets_passed"]:
            log.info("    candidate %s misses: %s", candidate["artifact"],
                     "; ".join(m["message"] for m in candidate["misses"]))


# --------------------------------------------------------------------------------------------------
# Re-render from a run directory (`edgekd report RUN_DIR [--merge device.json]`)


def _settings_of_run(run_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """The report stage's config as recorded in the manifest; before the stage ran, the resolved config's."""
    record = manifest.record("report")
    if record is not None:
        return record.config
    config = run_dir / RESOLVED_CONFIG
    if config.is_file():
        from edgekd.yamlio import load_yaml_file

        raw = load_yaml_file(config) or {}
        return {"name": raw.get("name"), "budgets": raw.get("budgets") or {}, "report": raw.get("report") or {}}
    return {}


def add_device_file(files: RunFiles, device_json: Path) -> Path:
    """Validate a device.json and keep it in RUN_DIR/devices/ (one file per board), so every later render,
    including one by `edgekd run`, merges it."""
    from edgekd.runtime.device_report import load_device_json
    from edgekd.runtime.errors import RuntimeInputError

    try:
        device = load_device_json(device_json)
    except RuntimeInputError as exc:
        raise InputError(str(exc)) from None
    key = device.get("fingerprint")
    if not key:
        from edgekd.runtime.cpu import environment_fingerprint

        key = environment_fingerprint(device["device"])
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}", str(key)):  # it names a file: no '/' or '..'
        raise InputError(f"{device_json}: fingerprint {str(key)[:80]!r} is not a plain name (letters, digits, "
                         "'.', '_', '-')")
    target = files.path(f"{DEVICES_DIR}/{key}.json")
    atomic.write_text(target, json.dumps(device, indent=2) + "\n")
    return target


def render_run_dir(run_dir: Path, merge: list[Path] | None = None) -> dict[str, Any]:
    """Re-render RUN_DIR's report from its manifest (nothing is rerun); returns the report."""
    from edgekd.runner.lock import run_lock

    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        raise InputError(f"{run_dir}: no {MANIFEST} (not an edgekd run directory?)")
    with run_lock(run_dir):
        manifest = read_manifest(run_dir)
        files = RunFiles(run_dir, manifest)
        for path in merge or []:
            add_device_file(files, Path(path))
        settings = _settings_of_run(run_dir, manifest)
        options = settings.get("report") or {}
        budgets = normalize_budgets(settings.get("budgets"), "budgets")
        report, written = write_report(manifest, files, budgets, html=options.get("html", True),
                                       plots=options.get("plots", True), run_name=settings.get("name"),
                                       deploy_runtime=options.get("deploy_runtime", "onnx"))
        record = manifest.record("report")
        if record is not None:  # keep the manifest true, so the next `edgekd run` sees an intact, up-to-date report
            record.artifacts = {name: atomic.sha256_file(run_dir / name) for name in written}
            record.metrics = stage_metrics(report)
        write_manifest(run_dir, manifest)
    return report
