"""report.json -> report.html: one self-contained file (inline CSS, plots as data: URIs, no scripts, no
network access), readable offline and attachable to a CI run."""

from __future__ import annotations

import base64
import re
from html import escape
from typing import Any

from edgekd.report import tables
from edgekd.report.deploy import USAGE
from edgekd.report.plots import PLOTS

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px;background:#fff}
h1{font-size:24px;margin:0 0 12px}h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f3f6}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.deployed td{background:#eef6ff;font-weight:600}
.banner{padding:12px 16px;border-radius:6px;font-size:16px;font-weight:600;margin:8px 0 10px}
.banner.pass{background:#dafbe1;border:1px solid #4ac26b}.banner.fail{background:#ffebe9;border:1px solid #ff8182}
.verdict{font-weight:700;padding:1px 6px;border-radius:4px}
.verdict.pass{color:#116329;background:#dafbe1}.verdict.fail{color:#82071e;background:#ffebe9}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px;border-radius:6px;margin:4px 0}
.plots{display:flex;flex-wrap:wrap;gap:16px}.plots figure{margin:0;flex:1 1 520px}
.plots img{max-width:100%;height:auto;border:1px solid #d0d7de;border-radius:4px}
figcaption{font-size:12px;color:#59636e}
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:10px;overflow-x:auto;font-size:12px}
.muted{color:#59636e;font-size:12px}.scroll{overflow-x:auto}
"""


_NUMBER = re.compile(r"^[+-]?(\d{1,3}(,\d{3})*|\d+)(\.\d+)?(e[+-]?\d+)?\s*(x|%|KiB|MiB)?$")


def _is_number(text: str) -> bool:
    return bool(_NUMBER.match(text.strip()))


def html_table(table: tables.Table) -> str:
    head = "" if table.headers == ["", ""] else (
        "<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in table.headers) + "</tr></thead>")
    body = []
    for index, row in enumerate(table.rows):
        css = table.row_classes[index] if index < len(table.row_classes) else ""
        cells = []
        for col, cell in enumerate(row):
            if table.css == "budgets" and col == 3:
                cells.append(f'<td><span class="verdict {css}">{escape(cell)}</span></td>')
            elif table.headers == ["", ""] and col == 0:
                cells.append(f"<th>{escape(cell)}</th>")
            else:
                numeric = col and table.headers != ["", ""] and _is_number(cell)  # key/value tables stay left-aligned
                cells.append(f'<td class="n">{escape(cell)}</td>' if numeric else f"<td>{escape(cell)}</td>")
        body.append(f'<tr class="{css}">' + "".join(cells) + "</tr>" if css else "<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table class="{table.css}">{head}<tbody>{"".join(body)}</tbody></table></div>'


def _section(section: tables.Section) -> str:
    parts = [f'<section id="{section.key}"><h2>{escape(section.title)}</h2>']
    parts += [f"<p>{escape(t)}</p>" for t in section.text]
    if section.table is not None:
        parts.append(html_table(section.table))
    if section.bullets:
        parts.append("<ul>" + "".join(f"<li>{escape(b)}</li>" for b in section.bullets) + "</ul>")
    return "".join(parts) + "</section>"


def render_html(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    deployed = report["deployed"]
    threads, batch = tables.setting(report)
    state = "pass" if report.get("budgets_passed", True) else "fail"
    out = [f'<h1>edgekd report: {escape(report["run"]["name"])}</h1>',
           f'<div id="verdict" class="banner {state}">{escape(tables.verdict_line(report))}</div>',
           f"<p><b>Deployed artifact:</b> <code>{escape(str(deployed['artifact']))}</code> → "
           f"<code>{escape(str(deployed['path']))}</code>. Why: {escape(deployed['reason'])}.</p>"]
    if report.get("budgets"):
        out.append(f'<section id="budgets"><h2>Budgets</h2><p>Evaluated on the deployed artifact; latency at '
                   f"{threads} thread(s), batch {batch}.</p>{html_table(tables.budgets_table(report))}</section>")
    if report.get("flags"):
        out.append('<section id="flags"><h2>Warnings</h2>'
                   + "".join(f'<div class="warn">⚠ {escape(f["message"])}</div>' for f in report["flags"]) + "</section>")
    out.append(f'<section id="artifacts"><h2>Artifacts</h2><p>One row per artifact; latency p50/p90/p99 at {threads} '
               f"thread(s), batch {batch} ({escape(str(report['environment'].get('execution_provider')))}).</p>"
               f"{html_table(tables.artifacts_table(report))}</section>")
    if plots:
        figures = "".join(
            f'<figure><img class="plot" alt="{escape(PLOTS.get(n, n))}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}"><figcaption>{escape(PLOTS.get(n, n))}</figcaption></figure>'
            for n, png in plots.items())
        out.append(f'<section id="plots"><h2>Plots</h2><div class="plots">{figures}</div></section>')
    out.append('<section id="candidates"><h2>Deployment candidates</h2><p>The deployed artifact is the fastest '
               "candidate that meets every budget, else the fastest meeting the accuracy budgets. int8 fallbacks, "
               "the no-KD baseline and the teacher are not candidates (the teacher only when nothing else exists).</p>"
               f"{html_table(tables.candidates_table(report))}</section>")
    out.append(f'<section id="latency"><h2>Latency per threads × batch</h2>'
               f"{html_table(tables.latency_table(report))}</section>")
    for section in tables.stage_sections(report):
        out.append(_section(section))
    mixed = tables.mixed_precision_section(report)
    for section in [*([mixed] if mixed else []), *tables.profile_sections(report)]:
        out.append(_section(section))
    for section in (tables.runtimes_section(report), tables.training_checks_section(report), tables.data_loading_section(report),
                    tables.arm_section(report), tables.devices_section(report)):
        if section is not None:
            out.append(_section(section))
    out.append(f'<section id="environment"><h2>Environment</h2>{html_table(tables.environment_table(report))}</section>')
    files = ", ".join(escape(f.removeprefix("deploy/")) for f in deployed.get("files") or [] if f.count("/") == 1)
    out.append(f'<section id="deploy"><h2>Deploy bundle</h2><p><code>deploy/</code> holds: {files}.</p>'
               f"<pre><code>{escape(USAGE.rstrip())}</code></pre></section>")
    if report.get("notes"):
        out.append('<section id="notes"><h2>Notes</h2><ul>' + "".join(f"<li>{escape(n)}</li>" for n in report["notes"])
                   + "</ul></section>")
    out.append(f'<p class="muted">edgekd {escape(str(report.get("edgekd_version")))} · report schema '
               f'{report["schema_version"]} · {escape(str(report.get("created_at")))}</p>')
    title = escape(f"edgekd report: {report['run']['name']}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{title}</title><style>{CSS}</style></head>'
            f'<body><main>{"".join(out)}</main></body></html>\n')
