"""Pipeline stages, in order: teacher, distill, prune, export, quantize, benchmark, report.

Each module has NAME, enabled(cfg), depends_on(cfg), config_view(cfg) and run(cfg, ctx) -> StageResult.
Helpers shared by several stages live here.
"""

from __future__ import annotations

from typing import Any

from edgekd.config import PipelineConfig


def section(value: Any) -> Any:
    """A config section as plain JSON data (for fingerprints and the manifest)."""
    return value.model_dump(mode="json", by_alias=True) if hasattr(value, "model_dump") else value


def data_view(cfg: PipelineConfig) -> dict[str, Any]:
    """The parts of the config that decide the data every training stage sees."""
    return {"data": section(cfg.data), "seed": cfg.seed}


def build_model(ctx: Any, spec: str, kwargs: dict[str, Any], field: str) -> Any:
    """Create an untrained model shaped for this run's data, its initial weights drawn from the run's seed
    (so two runs of one config start from, and end with, the same weights)."""
    import torch

    from edgekd.models import create_model

    meta = ctx.data.meta
    torch.manual_seed(ctx.cfg.seed)
    return create_model(
        spec, num_classes=meta.num_classes, in_channels=meta.channels, input_size=meta.height, kwargs=kwargs, field=field
    )


def model_factories(cfg: PipelineConfig) -> tuple[str, ...]:
    """The model specs this config names: the only `pkg.module:factory` a checkpoint's meta may rebuild."""
    return (cfg.teacher.model, cfg.student.model)


def load_artifact_model(ctx: Any, name: str) -> Any:
    """Load a model checkpoint written by an earlier stage (e.g. 'teacher.pt') onto the run's device."""
    from edgekd.models import load_model

    meta = ctx.data.meta
    model = load_model(ctx.artifact(name), num_classes=meta.num_classes, in_channels=meta.channels, input_size=meta.height,
                       factories=model_factories(ctx.cfg))
    return model.to(ctx.device).eval()
