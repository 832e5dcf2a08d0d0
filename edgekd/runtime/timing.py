"""Latency measurement: percentile stats, single-session timing, interleaved multi-model benchmark."""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import RuntimeInputError
from .session import check_input, open_session

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
DEFAULT_ITERATIONS = 100


@dataclass(frozen=True)
class LatencyStats:
    """Steady-state latency of one configuration, all in milliseconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float
    iterations: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(samples_seconds: Sequence[float] | np.ndarray) -> LatencyStats:
    """Stats in ms; percentiles by numpy's linear interpolation, std is the population std (ddof=0)."""
    samples_ms = np.asarray(samples_seconds, dtype=np.float64) * 1e3
    if samples_ms.ndim != 1 or samples_ms.size == 0:
        raise ValueError("summarize() needs a non-empty 1-D sequence of latencies")
    try:
        p50, p90, p99 = np.percentile(samples_ms, [50, 90, 99], method="linear")
    except TypeError:  # numpy < 1.22 (old board images) names the same option `interpolation`
        p50, p90, p99 = np.percentile(samples_ms, [50, 90, 99], interpolation="linear")
    return LatencyStats(p50=float(p50), p90=float(p90), p99=float(p99), mean=float(samples_ms.mean()),
                        std=float(samples_ms.std()), min=float(samples_ms.min()),
                        max=float(samples_ms.max()), iterations=int(samples_ms.size))


@dataclass
class TimingResult:
    """Steady-state stats plus the one-off costs, which are kept out of the percentiles."""

    stats: LatencyStats
    batch: int
    throughput_ips: float  # items per second = batch / mean latency
    session_create_ms: float | None
    first_run_ms: float
    providers: list[str] = field(default_factory=list)

    def to_row(self, **extra: Any) -> dict[str, Any]:
        return {**extra, "batch": self.batch, **self.stats.to_dict(), "throughput_ips": self.throughput_ips,
                "session_create_ms": self.session_create_ms, "first_run_ms": self.first_run_ms,
                "providers": list(self.providers)}


class _TimedRunner:
    """One session + one feed; collects steady-state samples in seconds."""

    def __init__(self, session: Any, feed: dict[str, np.ndarray], clock: Clock,
                 session_create_ms: float | None = None) -> None:
        self.session, self.feed, self.clock = session, feed, clock
        self.session_create_ms = session_create_ms
        self.batch = int(np.asarray(next(iter(feed.values()))).shape[0]) if feed else 1
        self.first_run_ms = 0.0
        self.samples: list[float] = []

    def _run_once(self) -> float:
        start = self.clock()
        self.session.run(None, self.feed)
        return self.clock() - start

    def warm(self, warmup: int) -> None:
        # The first run pays for lazy allocations and kernel selection: reported apart, never a sample.
        self.first_run_ms = self._run_once() * 1e3
        for _ in range(max(warmup - 1, 0)):
            self.session.run(None, self.feed)

    def measure(self, count: int) -> None:
        for _ in range(count):
            self.samples.append(self._run_once())

    def result(self) -> TimingResult:
        stats = summarize(self.samples)
        throughput = self.batch * 1e3 / stats.mean if stats.mean > 0 else float("inf")
        providers = list(self.session.get_providers()) if hasattr(self.session, "get_providers") else []
        return TimingResult(stats, self.batch, throughput, self.session_create_ms, self.first_run_ms, providers)


def time_session(session: Any, inputs: np.ndarray | Mapping[str, np.ndarray], warmup: int,
                 iterations: int | None = None, time_budget_s: float | None = None,
                 clock: Clock = time.perf_counter, session_create_ms: float | None = None) -> TimingResult:
    """Time `session.run` on `inputs`: 1 first run (reported apart), warmup-1 more, then the samples.

    Stops at `iterations` samples, or once the samples add up to `time_budget_s`, whichever comes first
    (at least one sample; 100 when neither is given).
    """
    if iterations is not None and iterations < 1:
        raise RuntimeInputError(f"iterations must be >= 1, got {iterations}")
    if iterations is None and time_budget_s is None:
        iterations = DEFAULT_ITERATIONS
    runner = _TimedRunner(session, check_input(session, inputs), clock, session_create_ms)
    runner.warm(warmup)
    spent = 0.0
    while iterations is None or len(runner.samples) < iterations:
        if time_budget_s is not None and runner.samples and spent >= time_budget_s:
            break
        runner.measure(1)
        spent += runner.samples[-1]
    return runner.result()


SessionFactory = Callable[[str, int, "Sequence[str] | None"], Any]


def _providers_for(label: str, providers: Sequence[str] | Mapping[str, Sequence[str] | None] | None):
    if isinstance(providers, Mapping):
        return providers.get(label)
    return providers


def interleaved_benchmark(models: Mapping[str, str | os.PathLike],
                          inputs_by_batch: Mapping[int, np.ndarray | Mapping[str, np.ndarray]],
                          threads_list: Sequence[int], warmup: int, iterations: int, chunk: int = 10,
                          clock: Clock = time.perf_counter,
                          providers: Sequence[str] | Mapping[str, Sequence[str] | None] | None = None,
                          session_factory: SessionFactory | None = None,
                          keep_samples: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Benchmark several models side by side so machine noise (thermal, neighbours) hits all alike.

    For each (threads, batch): open one session per model, warm each, then run round-robin chunks
    (A x chunk, B x chunk, ...) until every model has `iterations` samples. `providers` is one list for
    all models or a dict label -> list. A model whose fixed batch cannot take a batch size gets no row
    for it. Returns label -> rows with threads, batch, p50..max, iterations, throughput_ips,
    session_create_ms, first_run_ms, providers; with `keep_samples` also samples_ms (the raw steady-state
    latencies in ms, in measurement order, for distribution plots).

    With several models, sessions park their intra-op workers after each run: ORT's idle workers otherwise
    spin on for ~60 ms and, on a 2-core machine, stall the next model's 2-thread runs by a scheduler slice
    (p90 ~10 ms for a 1.3 ms model). Spinning inside a run is unchanged, so the rows match a lone session.
    """
    if iterations < 1 or chunk < 1:
        raise RuntimeInputError(f"iterations and chunk must be >= 1, got {iterations} and {chunk}")
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in models}
    if session_factory is None:
        session_factory = functools.partial(open_session, stop_spinning_after_run=len(models) > 1)
    for threads in threads_list:
        for batch, inputs in inputs_by_batch.items():
            runners: dict[str, _TimedRunner] = {}
            for label, path in models.items():
                start = clock()
                session = session_factory(str(path), threads, _providers_for(label, providers))
                create_ms = (clock() - start) * 1e3
                try:
                    feed = check_input(session, inputs)
                except RuntimeInputError as exc:
                    logger.info("skipping %s at batch %d: %s", label, batch, exc)
                    continue
                runners[label] = _TimedRunner(session, feed, clock, create_ms)
            for runner in runners.values():
                runner.warm(warmup)
            while any(len(r.samples) < iterations for r in runners.values()):
                for runner in runners.values():
                    runner.measure(min(chunk, iterations - len(runner.samples)))
            for label, runner in runners.items():
                row = runner.result().to_row(threads=threads)
                if keep_samples:
                    row["samples_ms"] = [s * 1e3 for s in runner.samples]
                rows[label].append(row)
            runners.clear()  # release the sessions before the next configuration allocates its own
    return rows
