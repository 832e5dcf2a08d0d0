"""JUnit XML for CI systems that read it (GitLab, Jenkins, Azure, GitHub test-report actions).

One <testcase> per budget (run / check) or per compared metric (compare): a breach is a <failure>, an
inconclusive comparison is <skipped> (noise, not a verdict), a missing/unreadable report is an <error>.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from edgekd import atomic
from edgekd.errors import InputError


def junit_xml(suite: str, cases: list[dict[str, Any]]) -> str:
    """cases: {name, classname?, status: passed|failed|skipped|error, message?, detail?}."""
    counts = {s: sum(1 for c in cases if c["status"] == s) for s in ("failed", "skipped", "error")}
    root = ET.Element("testsuites", name="edgekd", tests=str(len(cases)), failures=str(counts["failed"]),
                      errors=str(counts["error"]), skipped=str(counts["skipped"]))
    node = ET.SubElement(root, "testsuite", name=suite, tests=str(len(cases)), failures=str(counts["failed"]),
                         errors=str(counts["error"]), skipped=str(counts["skipped"]), time="0")
    for case in cases:
        element = ET.SubElement(node, "testcase", name=case["name"], classname=case.get("classname", suite), time="0")
        tag = {"failed": "failure", "skipped": "skipped", "error": "error"}.get(case["status"])
        if tag:
            child = ET.SubElement(element, tag, message=case.get("message", ""), type=case["status"])
            child.text = case.get("detail") or case.get("message", "")
        elif case.get("message"):
            ET.SubElement(element, "system-out").text = case["message"]
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path: Path, suite: str, cases: list[dict[str, Any]]) -> Path:
    return atomic.write_text(path, junit_xml(suite, cases))


def budget_cases(verdicts: list[dict[str, Any]], classname: str = "edgekd.budgets") -> list[dict[str, Any]]:
    return [{"name": v["name"], "classname": classname, "status": "passed" if v["passed"] else "failed",
             "message": v["message"]} for v in verdicts]


def write_junit_for_report(report_path: Path, junit_path: Path) -> None:
    """The budget verdicts of report.json as JUnit; an unreadable report becomes one <error> case."""
    from edgekd.gate.budgets import load_report

    try:
        report = load_report(report_path)
    except InputError as exc:
        write_junit(junit_path, "edgekd.budgets", [{"name": "report", "status": "error", "message": str(exc)}])
        return
    cases = budget_cases(report.get("budgets") or [])
    deployed = report.get("deployed") or {}
    cases.append({"name": "deployed_artifact", "classname": "edgekd.budgets", "status": "passed",
                  "message": f"{deployed.get('artifact')}: {deployed.get('reason')}"})
    write_junit(junit_path, "edgekd.budgets", cases)


def write_junit_for_failure(junit_path: Path, stage: str | None, message: str) -> None:
    """A run that stopped on an error: one <error> case naming the stage (CI shows it like a failed test)."""
    write_junit(junit_path, "edgekd.budgets", [{"name": f"stage {stage}" if stage else "run",
                                                "classname": "edgekd.run", "status": "error", "message": message}])
