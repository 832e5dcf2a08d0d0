"""Launching: a plain process runs the pipeline directly; under torchrun the training stages use DDP."""

from __future__ import annotations

import os
from typing import Any

from edgekd.config import PipelineConfig


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch(cfg: PipelineConfig, **options: Any) -> Any:
    """Run the pipeline; returns the RunOutcome (None on ranks other than 0 under torchrun)."""
    from edgekd.pipeline import run_pipeline

    return run_pipeline(cfg, **options)
