"""Shared fixtures: tiny configs that run in seconds on 2 CPU cores."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# A pipeline small enough for end-to-end tests: 16x16 synthetic images, tiny CNNs, 1-2 epochs.
TINY_CONFIG: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "data": {"dataset": "synthetic", "batch_size": 32, "synthetic": {"num_samples": 400, "image_size": 16}},
    "teacher": {"model": "cnn_small", "train": {"epochs": 2, "lr": 0.01}},
    "student": {"model": "cnn_tiny"},
    "distill": {"epochs": 3, "lr": 0.01, "baseline": False},
    "prune": {"ratio": 0.25, "finetune": {"epochs": 1}},
    "quantize": {"calibration": {"samples": 64}, "search": False},
    "benchmark": {"threads": [1], "batch_sizes": [1], "warmup": 2, "iterations": 10, "memory": False, "torch_reference": False},
}


# What `edgekd run` logs on stderr before a stage fails: progress, not the error. A test of "one line names the
# failure" drops these first (the CLI logs to stderr; the error is the line that remains, always the last).
PROGRESS_LINE = re.compile(r"^(edgekd \S+: run directory |\[[a-z]+\] |  +\S)")  # "  data: ..." details too


def error_lines(stderr: str) -> list[str]:
    """The non-empty stderr lines that are not `edgekd run` progress logs."""
    return [line for line in stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_config(folder: Path, override: dict | None = None, name: str = "pipeline.yaml", base: dict | None = None) -> Path:
    config = deep_merge(base if base is not None else TINY_CONFIG, override or {})
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_edgekd(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command line in a fresh process (exit codes and stderr as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "edgekd", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Intra-op threads spin-wait on a shared, busy CPU: one thread is several times faster there. For a module
    of small-model tests: `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def run_stage(module: Any, cfg: Any, manifest: Any) -> Any:
    """Plan and run one stage module alone, as the runner would, on a hand-made manifest (dict or Manifest)."""
    from edgekd.runner.contract import Manifest
    from edgekd.runner.loop import context_for

    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_json(manifest, "test manifest")
    plan = module.plan(cfg)
    ctx = context_for(cfg, manifest)
    ctx.stage, ctx.depends_on = module.NAME, plan.depends_on
    return module.run(plan.settings, ctx)
