"""The Python API behind `edgekd.run` / `edgekd.load_config`: what a notebook or another tool calls.

    import edgekd
    result = edgekd.run("pipeline.yaml", output_dir="runs/try", distill__epochs=2)
    result.budgets_passed, result.deployed.path, result.report_html

Nothing here touches logging's configuration: messages go to the `edgekd` logger (and to the run's log.txt);
what a notebook shows is the notebook's choice (e.g. `logging.basicConfig(level=logging.INFO)`).
A breached budget is a result (`budgets_passed` False), not an exception; bad input raises
`edgekd.errors.InputError` (ConfigError for the config), a failed stage `edgekd.errors.StageFailed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig
    from edgekd.runner.contract import Manifest


@dataclass(frozen=True)
class Deployed:
    """The artifact the report chose to ship (deploy/model.onnx)."""

    artifact: str
    """Artifact name: teacher, student, pruned, int8, ..."""
    path: Path
    """The deployed model file, inside the run directory's deploy/ bundle."""
    reason: str
    """Why it was chosen."""


@dataclass(frozen=True)
class BudgetVerdict:
    """One budget of `budgets:` evaluated on the deployed artifact."""

    name: str
    limit: float
    value: float | None
    passed: bool
    message: str


@dataclass(frozen=True)
class RunResult:
    """What `edgekd.run` returns: where everything is and whether the budgets were met."""

    run_dir: Path
    config: PipelineConfig
    """The resolved config that ran (also written to run_dir/resolved-config.yaml)."""
    ran: list[str]
    """Stages run this time."""
    skipped: list[str]
    """Stages skipped as up to date."""
    budgets_passed: bool
    """True when every budget is met (or none is set) — `edgekd run` exits 1 when False."""
    budgets: list[BudgetVerdict] = field(default_factory=list)
    deployed: Deployed | None = None
    """None when the report stage did not run (e.g. `only=["teacher"]`)."""
    report_json: Path | None = None
    report_md: Path | None = None
    report_html: Path | None = None
    """None when `report.html: false`."""
    manifest: Manifest | None = None

    def report(self) -> dict[str, Any]:
        """report.json, parsed (its JSON Schema: edgekd/schemas/report.schema.json)."""
        import json

        if self.report_json is None:
            raise FileNotFoundError(f"{self.run_dir}: no report.json (the report stage did not run)")
        return json.loads(self.report_json.read_text())


def resolve_config(config: str | Path | Mapping[str, Any] | PipelineConfig,
                   overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """A validated PipelineConfig from a path, a mapping (relative paths against the current folder) or an
    existing PipelineConfig, with `overrides` (dotted key paths, or `__` for the dots) applied first."""
    from edgekd.config import PipelineConfig, apply_overrides, load_config, validate_config

    dotted = {str(k).replace("__", "."): v for k, v in (overrides or {}).items()}
    if isinstance(config, PipelineConfig):
        return validate_config(apply_overrides(config.to_dict(), dotted), "config") if dotted else config
    if isinstance(config, Mapping):
        return validate_config(apply_overrides(dict(config), dotted), "config")
    return load_config(config, dotted or None)


def run(config: str | Path | Mapping[str, Any] | PipelineConfig, *, output_dir: str | Path | None = None,
        only: list[str] | None = None, from_stage: str | None = None, force: list[str] | None = None,
        device: str | None = None, overrides: Mapping[str, Any] | None = None, **more_overrides: Any) -> RunResult:
    """Run the pipeline in-process; up-to-date stages are skipped, as with `edgekd run`.

    `config`: a pipeline.yaml path, a mapping of the same keys, or a PipelineConfig. Overrides are config
    keys, validated like the file: `overrides={"distill.epochs": 2}` or as keywords with `__` for the dots
    (`distill__epochs=2`, `seed=1`, `prune=None` switches pruning off). `only` / `from_stage` / `force` /
    `device` are `edgekd run`'s --only / --from / --force / --device.
    """
    from edgekd.runner.launch import launch

    cfg = resolve_config(config, {**(overrides or {}), **more_overrides, **({"device": device} if device else {})})
    outcome = launch(cfg, only=list(only or []), from_stage=from_stage, force=list(force or []),
                     output_dir=Path(output_dir) if output_dir is not None else None, device=device)
    if outcome is None:  # a rank other than 0 under torchrun
        raise RuntimeError("edgekd.run returns its result on rank 0 only")
    return result_of(cfg, outcome.run_dir, outcome.ran, outcome.skipped, outcome.manifest)


def result_of(cfg: PipelineConfig, run_dir: Path, ran: list[str], skipped: list[str], manifest: Manifest) -> RunResult:
    """The typed result from a run directory's manifest (the report stage's metrics)."""
    metrics = manifest.metrics("report")
    deployed = metrics.get("deployed")
    verdicts = [BudgetVerdict(name=v["name"], limit=v["limit"], value=v.get("value"), passed=bool(v["passed"]),
                              message=str(v.get("message", ""))) for v in metrics.get("budgets", [])]

    def existing(name: str) -> Path | None:
        path = run_dir / name
        return path if metrics and path.is_file() else None

    return RunResult(
        run_dir=run_dir, config=cfg, ran=list(ran), skipped=list(skipped),
        budgets_passed=bool(metrics.get("budgets_passed", True)), budgets=verdicts,
        deployed=Deployed(deployed["artifact"], run_dir / deployed["path"], deployed["reason"]) if deployed else None,
        report_json=existing("report.json"), report_md=existing("report.md"), report_html=existing("report.html"),
        manifest=manifest)
