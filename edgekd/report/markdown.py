"""report.json -> report.md (GitHub-flavoured Markdown; plots referenced as plots/*.png)."""

from __future__ import annotations

from typing import Any

from edgekd.report import tables
from edgekd.report.deploy import USAGE
from edgekd.report.plots import PLOTS


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(table: tables.Table) -> list[str]:
    if table.headers == ["", ""]:  # key/value table
        lines = ["| | |", "|---|---|"]
    else:
        lines = ["| " + " | ".join(_cell(h) for h in table.headers) + " |", "|" + "---|" * len(table.headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    return lines + [""]


def _section(section: tables.Section) -> list[str]:
    lines = [f"## {section.title}", ""]
    for text in section.text:
        lines += [text, ""]
    if section.table is not None:
        lines += md_table(section.table)
    if section.bullets:
        lines += [f"- {b}" for b in section.bullets] + [""]
    return lines


def render_markdown(report: dict[str, Any], plot_names: list[str]) -> str:
    deployed = report["deployed"]
    threads, batch = tables.setting(report)
    passed = report.get("budgets_passed", True)
    lines = [f"# edgekd report: {report['run']['name']}", "",
             f"> **{'✅' if passed else '❌'} {tables.verdict_line(report)}**", "",
             f"**Deployed artifact:** `{deployed['artifact']}` → `{deployed['path']}`. Why: {deployed['reason']}.", ""]
    if report.get("budgets"):
        lines += ["## Budgets", "",
                  f"Evaluated on the deployed artifact; latency at {threads} thread(s), batch {batch}.", ""]
        lines += md_table(tables.budgets_table(report))
    if report.get("flags"):
        lines += ["## Warnings", ""] + [f"- ⚠️ {f['message']}" for f in report["flags"]] + [""]
    lines += ["## Artifacts", "", f"Test accuracy on {_test_size(report)} images; latency from ONNX Runtime "
              f"({report['environment'].get('execution_provider')}), p50/p90/p99 at {threads} thread(s), batch {batch}.", ""]
    lines += md_table(tables.artifacts_table(report))
    if plot_names:
        lines += ["## Plots", ""]
        lines += [f"![{PLOTS.get(name, name)}](plots/{name}.png)" + "\n" for name in plot_names]
    lines += ["## Deployment candidates", "",
              "The deployed artifact is the fastest candidate (at the budget's threads and batch) that meets "
              "every budget, else the fastest meeting the accuracy budgets. int8 fallbacks, the no-KD baseline "
              "and the teacher are not candidates (the teacher only when nothing else exists).", ""]
    lines += md_table(tables.candidates_table(report))
    lines += ["## Latency per threads × batch", ""] + md_table(tables.latency_table(report))
    for section in tables.stage_sections(report):
        lines += _section(section)
    mixed = tables.mixed_precision_section(report)
    for section in [*([mixed] if mixed else []), *tables.profile_sections(report)]:
        lines += _section(section)
    for section in (tables.runtimes_section(report), tables.training_checks_section(report), tables.data_loading_section(report),
                    tables.arm_section(report), tables.devices_section(report)):
        if section is not None:
            lines += _section(section)
    lines += ["## Environment", ""] + md_table(tables.environment_table(report))
    lines += ["## Deploy bundle", "", f"`deploy/` holds: {', '.join(f'`{f}`' for f in _top_files(deployed))}.", "",
              "```python", USAGE.rstrip(), "```", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    lines += [f"<sub>edgekd {report.get('edgekd_version')} · report schema {report['schema_version']} · "
              f"{report.get('created_at')}</sub>", ""]
    return "\n".join(lines)


def _test_size(report: dict[str, Any]) -> str:
    sizes = (report.get("data") or {}).get("split_sizes") or {}
    return f"{sizes['test']:,}" if isinstance(sizes.get("test"), int) else "the test"


def _top_files(deployed: dict[str, Any]) -> list[str]:
    files = [f.removeprefix("deploy/") for f in deployed.get("files") or []]
    top = [f for f in files if "/" not in f]
    return top + (["edgekd_runtime/"] if any(f.startswith("edgekd_runtime/") for f in files) else [])
