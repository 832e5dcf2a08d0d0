"""Meeting a pruning target: the channel ratio searched on counted MACs / params or on measured latency, the
iterative steps toward it, and the rounding (`round_to: auto`) chosen by measurement.

torch-pruning only takes ratios, so every target is met by one bracketing search over the ratio
(`_search_ratio`); a MACs or params target measures each trial's copy by counting, a latency target by timing
it (a function passed in: ONNX Runtime in the stage, a deterministic stand-in in tests).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from edgekd.errors import InputError
from edgekd.stages.prune.pruning import (EmptyLayer, PruneResult, PruneSettings, PruneTarget, StepResult,
                                         layer_channels, measure, prune_channels, pruned_copy, resolve_ignored)

SEARCH_TOLERANCE = 0.02  # relative error at which a MACs / params search stops early
MAX_TRIALS = 12
LATENCY_TOLERANCE = 0.05  # a trial within 5 % of its goal stops the search (the target is met within 10 %)
LATENCY_TRIALS = 8
ROUND_TO_CANDIDATES = (1, 4, 8, 16)
ROUND_TO_TIE = 0.02  # MACs-per-ms rates this close are a tie (timing noise): the coarser rounding is kept

LatencyFunction = Callable[[nn.Module], float]
"""A pruned copy -> its latency as a fraction of the unpruned model's (measured, or injected in tests)."""


@dataclass
class _Trial:
    """One ratio tried: the copy and its measured value, or the layer the ratio would empty."""

    number: int
    ratio: float
    result: StepResult | None = None
    value: float = 0.0
    empty: EmptyLayer | None = None


def _resolution(model: nn.Module) -> float:
    """Below this ratio step no layer's channel count can change: a finer bracket is wasted trials."""
    return 0.25 / max(layer_channels(model).values() or [1])


def _search_ratio(
    model: nn.Module, example_inputs: torch.Tensor, settings: PruneSettings, ignored: list[str],
    grads: dict[str, torch.Tensor] | None, goal: float, value_of: Callable[[nn.Module, int, int], float], *,
    first_ratio: float, start_value: float, tolerance: float, max_trials: int,
) -> list[_Trial]:
    """Try channel ratios until a copy's value (`value_of(copy, macs, params)`, falling as the ratio rises) is
    within `tolerance` of `goal`, the bracket is finer than a channel, or `max_trials` are spent.

    The bracket starts at [0, 1] with `start_value` at 0; after `first_ratio`, secant steps on sqrt(value)
    (close to linear in the ratio, since conv cost scales with (1 - ratio)^2) stay inside it. A ratio that
    empties a layer bounds it from above. Returns every trial, in order.
    """
    cache: dict[tuple, torch.Tensor] = {}
    lo, lo_value = 0.0, start_value
    hi, hi_value = 1.0, None  # hi_value None: hi is a ratio that empties a layer (or the limit 1)
    resolution = _resolution(model)
    trials: list[_Trial] = []
    ratio = first_ratio
    for number in range(1, max_trials + 1):
        try:
            pruned = pruned_copy(model, example_inputs, ratio, settings, ignored, grads, cache)
        except EmptyLayer as exc:
            trials.append(_Trial(number, ratio, empty=exc))
            hi, hi_value = ratio, None
        else:
            macs, params = measure(pruned, example_inputs)
            value = float(value_of(pruned, macs, params))
            trials.append(_Trial(number, ratio, StepResult(pruned, ratio, macs, params, number), value))
            if abs(value - goal) <= tolerance * goal:
                break
            if value > goal:
                lo, lo_value = ratio, value
            else:
                hi, hi_value = ratio, value
        if hi - lo < resolution:
            break
        ratio = _next_ratio(lo, lo_value, hi, hi_value, goal)
    return trials


def _next_ratio(lo: float, lo_value: float, hi: float, hi_value: float | None, fraction: float) -> float:
    if hi_value is not None:  # secant on sqrt(measure), which is close to linear in the ratio
        a, b, t = math.sqrt(lo_value), math.sqrt(hi_value), math.sqrt(fraction)
        guess = lo + (hi - lo) * (a - t) / (a - b) if a != b else (lo + hi) / 2
    elif lo > 0 and 0 < lo_value < 1:  # only a lower bound: extrapolate value = (1 - ratio)^p
        power = math.log(lo_value) / math.log(1 - lo)
        guess = 1 - fraction ** (1 / power)
    else:
        guess = (lo + hi) / 2
    margin = (hi - lo) * 0.05  # stay strictly inside the bracket so every trial narrows it
    return min(max(guess, lo + margin), hi - margin)


# --------------------------------------------------------------------------------------------------
# MACs / params targets


def prune_to(
    model: nn.Module, example_inputs: torch.Tensor, kind: Literal["macs", "params"], goal: float,
    settings: PruneSettings, ignored: list[str], grads: dict[str, torch.Tensor] | None = None,
    *, label: str | None = None,
) -> StepResult:
    """Search the channel ratio whose pruned copy has `goal` MACs (or params), absolute; `label` names the
    setting in error messages. The first guess is 1 - sqrt(fraction); ratios that empty a layer bound the
    search from above. Returns the closest copy found.
    """
    base_macs, base_params = measure(model, example_inputs)
    current = base_macs if kind == "macs" else base_params
    fraction = goal / current
    if fraction >= 1 - 1e-9:
        return StepResult(copy.deepcopy(model), 0.0, base_macs, base_params, 0)
    trials = _search_ratio(
        model, example_inputs, settings, ignored, grads, fraction,
        lambda _copy, macs, params: (macs if kind == "macs" else params) / current,
        first_ratio=1 - math.sqrt(fraction), start_value=1.0, tolerance=SEARCH_TOLERANCE, max_trials=MAX_TRIALS,
    )
    measured = [t.result for t in trials if t.result is not None]
    empty = next((t.empty for t in reversed(trials) if t.empty is not None), None)
    best = min(measured, key=lambda r: abs(_amount(r, kind) - goal)) if measured else None
    if best is not None:
        best.trials = trials[-1].number
    reached = best is not None and abs(_amount(best, kind) - goal) <= 0.05 * goal
    label = f"{label or 'prune target'} ({goal:,.0f} {kind})"
    if not reached and empty is not None and (best is None or _amount(best, kind) > goal):
        smallest = f"; keeping every layer it gets down to about {_amount(best, kind):,}" if best else ""
        raise InputError(
            f"{label} would leave layer '{empty.layer}' ({empty.channels} channels) with no channels{smallest} "
            f"(raise the target, or add layers to prune.ignore)"
        )
    if best is None or _amount(best, kind) >= current:
        raise InputError(f"{label}: nothing could be pruned (every layer ignored, or the importance scores none)")
    return best


def _amount(result: StepResult, kind: str) -> int:
    return result.macs if kind == "macs" else result.params


def step_goals(target: PruneTarget, steps: int, base_macs: int, base_params: int) -> list[float]:
    """Cumulative goal after each step: kept channel fraction (ratio), or absolute MACs / params."""
    if target.kind == "ratio":
        return [1 - target.value * k / steps for k in range(1, steps + 1)]
    base = base_macs if target.kind == "macs" else base_params
    final = target.value * base if target.value <= 1 else target.value
    if final > base:
        raise InputError(f"prune.target_{target.kind}: {target.value:,.0f} is more than the model has ({base:,})")
    return [base - (base - final) * k / steps for k in range(1, steps + 1)]


def _step_row(index: int, result: StepResult, pruned: nn.Module, base_macs: int, base_params: int,
              base_channels: int) -> dict[str, Any]:
    """What every pruning step records: the ratio searched and the pruned copy's size against the original."""
    return {
        "step": index, "channel_ratio": round(result.channel_ratio, 6), "search_trials": result.trials,
        "macs": result.macs, "params": result.params, "macs_fraction": round(result.macs / base_macs, 6),
        "params_fraction": round(result.params / base_params, 6),
        "channels_fraction": round(sum(layer_channels(pruned).values()) / base_channels, 6),
    }


def prune_iteratively(
    model: nn.Module,
    example_inputs: torch.Tensor,
    target: PruneTarget,
    settings: PruneSettings,
    *,
    steps: int = 1,
    ignored: list[str] | None = None,
    gradients: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
    after_step: Callable[[nn.Module, dict[str, Any]], None] | None = None,
) -> PruneResult:
    """Prune in `steps` steps toward the target, calling `after_step(model, row)` (recovery) after each.

    Each step builds a fresh pruner on the current (recovered) model: importance is re-estimated on the
    fine-tuned weights, and nothing refers to parameters pruning replaced. The input model is not modified.
    """
    ignored = ignored if ignored is not None else resolve_ignored(model, settings.ignore)
    base_macs, base_params = measure(model, example_inputs)
    base_channels = sum(layer_channels(model).values())
    goals = step_goals(target, steps, base_macs, base_params)
    current, kept_before = model, 1.0
    rows: list[dict[str, Any]] = []
    for index, goal in enumerate(goals, start=1):
        grads = gradients(current) if gradients is not None else None
        label = f"prune.{target.kind if target.kind == 'ratio' else 'target_' + target.kind}: {target.value:g}"
        label += f" (step {index}/{steps})" if steps > 1 else ""
        if target.kind == "ratio":
            # the ratio is cumulative against the original; convert to this step's share of what is left
            step_ratio = 1 - goal / kept_before
            result = prune_channels(current, example_inputs, step_ratio, settings, ignored, grads, label=label)
            kept_before = goal
        else:
            result = prune_to(current, example_inputs, target.kind, goal, settings, ignored, grads, label=label)
        current = result.model
        row = _step_row(index, result, current, base_macs, base_params, base_channels)
        if after_step is not None:
            after_step(current, row)
        rows.append(row)
    return PruneResult(current, rows)


# --------------------------------------------------------------------------------------------------
# Latency targets: the same search on measured latency instead of counted MACs


@dataclass
class LatencyStep(StepResult):
    """A step of latency-target pruning: the copy chosen, its measured latency fraction, every trial."""

    latency_fraction: float = 1.0
    trace: list[dict[str, Any]] = field(default_factory=list)


def latency_step_goals(final_fraction: float, steps: int) -> list[float]:
    """Cumulative latency fraction after each step, evenly spaced from 1 to the final one."""
    if not 0 < final_fraction < 1:
        raise ValueError(f"latency fraction must be in (0, 1), got {final_fraction}")
    return [1 - (1 - final_fraction) * k / steps for k in range(1, steps + 1)]


def prune_to_latency(
    model: nn.Module, example_inputs: torch.Tensor, goal: float, latency: LatencyFunction,
    settings: PruneSettings, ignored: list[str], grads: dict[str, torch.Tensor] | None = None,
    *, start: float = 1.0, base_macs: int | None = None, label: str = "prune target",
    tolerance: float = LATENCY_TOLERANCE, max_trials: int = LATENCY_TRIALS,
) -> LatencyStep:
    """Search the channel ratio whose pruned copy of `model` runs at `goal` x the unpruned latency.

    `latency(copy)` gives the measured fraction (against the *original* model, so iterative steps aim at
    cumulative goals); small models' latency falls slower than their MACs, hence the search on it. Returns the
    closest copy measured (the least pruned of those equally close within the tolerance). `start` is `model`'s
    own fraction (1 for the original, less after earlier steps), the bracket's lower end; `base_macs` (the
    original's) gives each trial's MACs fraction in the trace.
    """
    base_macs = base_macs or measure(model, example_inputs)[0]
    resolution = _resolution(model)
    first = min(max(1 - math.sqrt(goal / start), resolution), 0.95) if start > goal else resolution
    trials = _search_ratio(model, example_inputs, settings, ignored, grads, goal,
                           lambda pruned, _macs, _params: latency(pruned),
                           first_ratio=first, start_value=start, tolerance=tolerance, max_trials=max_trials)
    trace = [{"trial": t.number, "channel_ratio": round(t.ratio, 6), "error": f"empties layer {t.empty.layer}"}
             if t.empty is not None else
             {"trial": t.number, "channel_ratio": round(t.ratio, 6),
              "macs_fraction": round(t.result.macs / base_macs, 6), "latency_fraction": round(t.value, 6)}
             for t in trials]
    measured = [LatencyStep(t.result.model, t.ratio, t.result.macs, t.result.params, t.number, t.value)
                for t in trials if t.result is not None]
    if not measured:
        empty = next((t.empty for t in reversed(trials) if t.empty is not None), None)
        raise InputError(f"{label}: every channel ratio tried would leave layer '{empty.layer if empty else '?'}' "
                         "with no channels (raise the target, or add layers to prune.ignore)")
    # the closest copy; among copies as close within the tolerance (timing noise), the least pruned: when a
    # target cannot be reached (an overhead-bound model), deeper pruning that buys nothing is not taken
    closest = min(abs(m.latency_fraction - goal) for m in measured)
    best = min((m for m in measured if abs(m.latency_fraction - goal) <= closest + tolerance * goal),
               key=lambda m: m.channel_ratio)
    best.trials, best.trace = trials[-1].number, trace
    return best


def prune_iteratively_to_latency(
    model: nn.Module, example_inputs: torch.Tensor, final_fraction: float, latency: LatencyFunction,
    settings: PruneSettings, *, steps: int = 1, ignored: list[str] | None = None, label: str = "prune target",
    gradients: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
    after_step: Callable[[nn.Module, dict[str, Any]], None] | None = None,
) -> PruneResult:
    """`steps` latency-target steps toward `final_fraction` of the unpruned latency, recovery after each.

    One row per step: the channel ratio, MACs and params fractions, the measured latency fraction, and the
    trials of its search (MACs fraction vs latency fraction of each copy timed).
    """
    ignored = ignored if ignored is not None else resolve_ignored(model, settings.ignore)
    base_macs, base_params = measure(model, example_inputs)
    base_channels = sum(layer_channels(model).values())
    current, rows, reached = model, [], 1.0
    for index, goal in enumerate(latency_step_goals(final_fraction, steps), start=1):
        grads = gradients(current) if gradients is not None else None
        step_label = label + (f" (step {index}/{steps})" if steps > 1 else "")
        result = prune_to_latency(current, example_inputs, goal, latency, settings, ignored, grads,
                                  start=reached, base_macs=base_macs, label=step_label)
        current, reached = result.model, result.latency_fraction  # the next step's bracket starts here
        row = _step_row(index, result, current, base_macs, base_params, base_channels)
        row.update(latency_goal=round(goal, 6), latency_fraction=round(result.latency_fraction, 6),
                   trials=result.trace)
        if after_step is not None:
            after_step(current, row)
        rows.append(row)
    return PruneResult(current, rows)


# --------------------------------------------------------------------------------------------------
# round_to: auto


def round_to_candidates(
    model: nn.Module, example_inputs: torch.Tensor, ratio: float, settings: PruneSettings, ignored: list[str],
    candidates: Iterable[int] = ROUND_TO_CANDIDATES,
) -> dict[int, nn.Module]:
    """round_to -> the copy pruned at `ratio` with it (1 = no rounding); a rounding that empties a layer, or
    gives the same channel counts as a smaller one, is left out."""
    copies: dict[int, nn.Module] = {}
    seen: set[tuple] = set()
    for step in candidates:
        try:
            pruned = pruned_copy(model, example_inputs, ratio, replace_round_to(settings, step), ignored, None)
        except EmptyLayer:
            continue
        shape = tuple(sorted(layer_channels(pruned).items()))
        if shape not in seen:
            seen.add(shape)
            copies[step] = pruned
    return copies


def pick_round_to(rows: list[dict[str, Any]]) -> int:
    """The rounding whose copy turns the most MACs into each millisecond (MACs / p50): at equal latency it
    keeps the most capacity. Rates within 2 % of the best are a tie, won by the largest round_to: equal at this
    ratio, and its channel counts stay vector-aligned at the other ratios the search goes on to try (a finer
    rounding can tie where its counts happen to be aligned, e.g. 28/56/112, and lose badly where they are not).
    Rows: {round_to, macs, p50_ms}."""
    rate = {r["round_to"]: r["macs"] / max(r["p50_ms"], 1e-9) for r in rows}
    best = max(rate.values())
    return max(k for k, v in rate.items() if v >= best * (1 - ROUND_TO_TIE))


def replace_round_to(settings: PruneSettings, round_to: int | None) -> PruneSettings:
    """The same settings with another rounding (None or 1: none)."""
    return replace(settings, round_to=None if round_to in (None, 1) else int(round_to))
