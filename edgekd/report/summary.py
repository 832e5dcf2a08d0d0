"""report.md for places that cannot show its PNG plots: a CI job summary (GitHub's $GITHUB_STEP_SUMMARY).

A job summary is one Markdown document with no files beside it, so report.md's relative image links
(`plots/x.png`) break there, and GitHub strips `data:` image URIs. Each plot is replaced here by a Mermaid
chart of the same numbers (GitHub renders ```mermaid blocks; anywhere else they stay readable text):
latency and accuracy per artifact for the accuracy-vs-latency plot, KiB per artifact for the size plot,
p50 / p90 / p99 for the latency distribution.

    python -m edgekd.report.summary runs/ci >> "$GITHUB_STEP_SUMMARY"

Torch- and matplotlib-free: reads report.md and report.json only.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<path>plots/(?P<name>[A-Za-z0-9_]+)\.png)\)\s*$")


def _setting(report: dict[str, Any]) -> tuple[int, int]:
    settings = report.get("budget_settings") or {}
    return int(settings.get("latency_threads", 1)), int(settings.get("latency_batch", 1))


def _latency(row: dict[str, Any], threads: int, batch: int) -> dict[str, Any] | None:
    return next((e for e in row.get("latency_ms") or [] if e.get("threads") == threads and e.get("batch") == batch), None)


def _chart(title: str, names: list[str], series: list[tuple[str, list[float]]], unit: str) -> str:
    labels = ", ".join(json.dumps(n) for n in names)
    lines = ["```mermaid", "xychart-beta", f"    title {json.dumps(title)}", f"    x-axis [{labels}]",
             f"    y-axis {json.dumps(unit)}"]
    lines += [f"    {kind} [{', '.join(f'{v:.4g}' for v in values)}]" for kind, values in series]
    return "\n".join([*lines, "```"])


def charts_for(plot: str, report: dict[str, Any]) -> list[str]:
    """Mermaid charts standing for plots/<plot>.png ([] when there is nothing to chart)."""
    threads, batch = _setting(report)
    rows = report.get("artifacts") or []
    timed = [(r["name"], entry) for r in rows if (entry := _latency(r, threads, batch))]
    if plot == "accuracy_vs_latency":
        charts = []
        if timed:
            charts.append(_chart(f"p50 latency (ms), {threads} thread(s), batch {batch}: lower is better",
                                 [n for n, _ in timed], [("bar", [e["p50"] for _, e in timed])], "ms"))
        scored = [r for r in rows if isinstance(r.get("accuracy"), (int, float))]
        if scored:
            charts.append(_chart("test accuracy: higher is better", [r["name"] for r in scored],
                                 [("bar", [r["accuracy"] for r in scored])], "accuracy"))
        return charts
    if plot == "size":
        sized = [r for r in rows if isinstance(r.get("size_bytes"), (int, float))]
        return [_chart("model file size (KiB)", [r["name"] for r in sized],
                       [("bar", [r["size_bytes"] / 1024 for r in sized])], "KiB")] if sized else []
    if plot == "latency_distribution" and timed:
        return [_chart(f"latency percentiles (ms), {threads} thread(s), batch {batch}: bars p99, lines p90 and p50",
                       [n for n, _ in timed], [("bar", [e["p99"] for _, e in timed]),
                                              ("line", [e["p90"] for _, e in timed]),
                                              ("line", [e["p50"] for _, e in timed])], "ms")]
    return []


def job_summary(run_dir: Path) -> str:
    """report.md with every `![..](plots/x.png)` replaced by Mermaid charts of the same data."""
    markdown = (run_dir / "report.md").read_text(encoding="utf-8")
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    out = []
    for line in markdown.splitlines():
        found = IMAGE.match(line)
        if not found:
            out.append(line)
            continue
        charts = charts_for(found["name"], report)
        out.append(f"**{found['alt']}** ({found['path']} in the run's artifacts)")
        out.extend(f"\n{chart}\n" for chart in charts)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m edgekd.report.summary RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    if not (run_dir / "report.md").is_file() or not (run_dir / "report.json").is_file():
        print(f"{run_dir}: no report.md / report.json (run the pipeline first)", file=sys.stderr)
        return 2
    sys.stdout.write(job_summary(run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
