"""edgekd: teacher -> distilled student -> pruned -> int8 ONNX, benchmarked and budget-checked.

Public API: `load_config(path)` and `run(config, ...)`. Importing edgekd is lean (no torch): heavy modules
load when a stage needs them.
"""

from __future__ import annotations

from edgekd.version import __version__

__all__ = ["__version__", "load_config", "run"]


def load_config(path, overrides=None):  # noqa: ANN001, ANN201 - thin lazy wrapper
    """Read and validate a pipeline.yaml (see edgekd.config.load_config)."""
    from edgekd.config import load_config as _load_config

    return _load_config(path, overrides)


def run(config, **options):  # noqa: ANN001, ANN201 - thin lazy wrapper
    """Run the pipeline for a config (path or PipelineConfig); see edgekd.runner.loop.run_pipeline."""
    from edgekd.config import PipelineConfig, load_config
    from edgekd.runner.launch import launch

    return launch(config if isinstance(config, PipelineConfig) else load_config(config), **options)
