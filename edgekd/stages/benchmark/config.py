"""The `benchmark:` section of pipeline.yaml and what the benchmark stage's run() receives."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, field_validator

from edgekd.validation import Section, distinct_names, positive_ints


class BenchmarkConfig(Section):
    threads: list[int] = [1, 2]
    """Intra-op thread counts measured."""
    batch_sizes: list[int] = [1, 32]
    """Batch sizes measured."""
    warmup: int = Field(20, ge=0)
    """Warm-up runs per model and setting."""
    iterations: int = Field(200, ge=5)
    """Timed runs per model and setting (interleaved across models)."""
    chunk: int = Field(10, ge=1)
    """Runs per model before moving to the next (round-robin interleaving; between turns each session parks
    its thread-pool workers, so one model's idle threads never slow the next)."""
    memory: bool = True
    """Measure peak memory per model in a fresh process."""
    torch_reference: bool = True
    """Also time PyTorch eager teacher and student as a reference row."""
    profile_runs: int = Field(30, ge=0, le=10000)
    """Runs profiled per model with ONNX Runtime's profiler at the budgets' threads and batch (time per op type
    and per node, for the report's profile section); 0 switches the profile off."""
    providers: list[str] = ["CPUExecutionProvider"]
    """ONNX Runtime execution providers."""

    _sizes = field_validator("threads", "batch_sizes")(positive_ints)
    _names = field_validator("providers")(distinct_names)


@dataclass(frozen=True)
class BenchmarkJob:
    benchmark: BenchmarkConfig
    latency_threads: int
    """budgets.latency_threads: the setting budgets (and the report's headline figures) use."""
    latency_batch: int
    """budgets.latency_batch."""
