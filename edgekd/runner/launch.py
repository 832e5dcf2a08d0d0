"""Start a run, in one process or as one rank of a torchrun job (process group set up and torn down here)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgekd.runner.loop import RunOutcome, run_pipeline
from edgekd.train import distributed

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig


def launch(cfg: PipelineConfig, **options: Any) -> RunOutcome | None:
    """Run the pipeline; returns the RunOutcome (None on ranks other than 0 under torchrun)."""
    if distributed.world_size() <= 1:
        return run_pipeline(cfg, **options)
    options["device"] = distributed.init(options.get("device") or cfg.device)
    try:
        outcome = run_pipeline(cfg, **options)
        distributed.barrier()
    finally:
        distributed.shutdown()
    return outcome if distributed.is_main() else None
