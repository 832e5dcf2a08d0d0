"""Stage 7: the deployment report, the deployed artifact and the budget verdicts.

Reads only the manifest (every earlier stage's metrics) and the model files the benchmark measured, so
`edgekd report RUN_DIR` can re-render the same report without rerunning anything. Never imports torch.
"""

from __future__ import annotations

from typing import Any

from edgekd.config import PipelineConfig
from edgekd.pipeline import RunContext, StageResult, log
from edgekd.stages import section

NAME = "report"


def enabled(cfg: PipelineConfig) -> bool:
    return True


def depends_on(cfg: PipelineConfig) -> list[str]:
    stages = ["teacher"]
    if cfg.distill_enabled:
        stages.append("distill")
    if cfg.prune_enabled:
        stages.append("prune")
    stages.append("export")
    if cfg.quantize_enabled:
        stages.append("quantize")
    return [*stages, "benchmark"]


def config_view(cfg: PipelineConfig) -> dict[str, Any]:
    # The run name is shown in the report; budgets and report options decide its content. The benchmark
    # section is here because the benchmark stage writes no file: without it, new measurements (e.g. more
    # iterations) would not change this stage's fingerprint and a stale report would be kept.
    return {"name": cfg.name, "budgets": section(cfg.budgets), "report": section(cfg.report),
            "benchmark": section(cfg.benchmark)}


def run(cfg: PipelineConfig, ctx: RunContext) -> StageResult:
    from edgekd.budgets import normalize_budgets
    from edgekd.report.render import log_verdicts, stage_metrics, write_report

    view = config_view(cfg)
    budgets = normalize_budgets(view["budgets"], "budgets")
    report, files = write_report(ctx.manifest, ctx.run_dir, budgets, html=cfg.report.html, plots=cfg.report.plots,
                                 run_name=cfg.name)
    log_verdicts(report)
    failed = [b["name"] for b in report["budgets"] if not b["passed"]]
    summary = (f"deployed {report['deployed']['artifact']}; "
               + (f"budgets FAILED: {', '.join(failed)}" if failed else
                  f"{len(report['budgets'])} budget(s) met" if report["budgets"] else "no budgets set"))
    if failed:
        log.info("  report: %s", ctx.run_dir / "report.md")
    return StageResult(files, stage_metrics(report), summary)
