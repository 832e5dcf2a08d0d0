"""edgekd: teacher -> distilled student -> pruned -> int8 ONNX, benchmarked and budget-checked.

Public API (see the README's "Python API"):

  run(config, output_dir=..., **overrides) -> RunResult   the pipeline, in-process (edgekd.api)
  load_config(path, overrides=None) -> PipelineConfig     read and validate a pipeline.yaml
  edgekd.runtime                                          torch-free ONNX Runtime bench / evaluate

Importing edgekd is lean (no torch): heavy modules load when a stage needs them. The library logs through
the `edgekd` logger and configures no console output; the `edgekd` command line does that.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekd.version import __version__

if TYPE_CHECKING:
    from collections.abc import Mapping

    from edgekd.api import RunResult
    from edgekd.config import PipelineConfig

__all__ = ["__version__", "load_config", "run"]


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Read and validate a pipeline.yaml; `overrides` maps dotted keys (`distill.epochs`) to values.

    Raises edgekd.errors.ConfigError (`file: key: problem` lines) on a bad config."""
    from edgekd.config import load_config as _load_config

    return _load_config(path, dict(overrides) if overrides else None)


def run(config: str | Path | Mapping[str, Any] | PipelineConfig, *, output_dir: str | Path | None = None,
        **options: Any) -> RunResult:
    """Run the pipeline in-process and return a RunResult (deployed artifact, budget verdicts, report paths).

    Keywords other than only / from_stage / force / device / overrides are config overrides, `__` standing
    for the dots: `edgekd.run("pipeline.yaml", output_dir="runs/x", distill__epochs=2)`. See edgekd.api.run.
    """
    from edgekd.api import run as _run

    return _run(config, output_dir=output_dir, **options)
