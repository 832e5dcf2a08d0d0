"""Stage 7: the deployment report, the deployed artifact and the budget verdicts.

Reads only the manifest (every earlier stage's metrics) and the model files the benchmark measured, so
`edgekd report RUN_DIR` can re-render the same report without rerunning anything. Never imports torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgekd.gate.budgets import BudgetsConfig
from edgekd.runner.contract import StagePlan, StageResult
from edgekd.stages import benchmark, distill, export, mobile, prune, quantize, teacher
from edgekd.stages.report.config import ReportConfig

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig
    from edgekd.runner.context import RunContext

log = logging.getLogger("edgekd")

NAME = "report"


@dataclass(frozen=True)
class ReportJob:
    name: str
    """The run's name, shown in the report."""
    budgets: BudgetsConfig
    report: ReportConfig


def plan(cfg: PipelineConfig) -> StagePlan:
    optional = ((distill.NAME, cfg.distill), (prune.NAME, cfg.prune), (quantize.NAME, cfg.quantize),
                (mobile.NAME, mobile.plan(cfg)))
    depends_on = (teacher.NAME, *(name for name, section in optional[:2] if section is not None), export.NAME,
                  *(name for name, section in optional[2:] if section is not None), benchmark.NAME)
    # The benchmark section is in the view because the benchmark stage writes no file: without it, new
    # measurements (e.g. more iterations) would not change this stage's fingerprint and a stale report would stay.
    view = {"name": cfg.name, "budgets": cfg.budgets.view(), "report": cfg.report.view(),
            "benchmark": cfg.benchmark.view()}
    return StagePlan(settings=ReportJob(cfg.name, cfg.budgets, cfg.report), view=view, depends_on=depends_on,
                     libraries=("matplotlib",) if cfg.report.plots else ())


def run(job: ReportJob, ctx: RunContext) -> StageResult:
    from edgekd.report.render import log_verdicts, stage_metrics, write_report

    report, files = write_report(ctx.manifest, ctx.files, job.budgets.as_dict(), html=job.report.html,
                                 plots=job.report.plots, run_name=job.name, deploy_runtime=job.report.deploy_runtime)
    log_verdicts(report)
    failed = [b["name"] for b in report["budgets"] if not b["passed"]]
    summary = (f"deployed {report['deployed']['artifact']}; "
               + (f"budgets FAILED: {', '.join(failed)}" if failed else
                  f"{len(report['budgets'])} budget(s) met" if report["budgets"] else "no budgets set"))
    if failed:
        log.info("  report: %s", ctx.run_dir / "report.md")
    return StageResult(files, stage_metrics(report), summary)
