"""Structured channel pruning with torch-pruning (DepGraph): importance, targets, iterative steps.

Torch-level and runner-free, so it is testable on its own; `edgekd.stages.prune` adds data, recovery and I/O.

Every pruning attempt works on a deep copy of the model: a MACs/params target is met by searching the channel
ratio (torch-pruning only takes ratios), and a failed attempt (a layer left with no channels) must not damage
the caller's model. Coupled layers (residual adds, depthwise and grouped convolutions, the BatchNorms that
follow a conv) are pruned together by torch-pruning's dependency graph, so the result always runs.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.errors import InputError

TargetKind = Literal["ratio", "macs", "params", "latency_ms", "speedup"]
IMPORTANCES = ("l1", "l2", "taylor", "bn_scale")
SEARCH_TOLERANCE = 0.02  # relative error at which the ratio search stops early
MAX_TRIALS = 12


@dataclass(frozen=True)
class PruneTarget:
    """ratio: fraction of channels removed per layer (local) or overall (global).
    macs / params: what to keep, a fraction of the original when <= 1, else an absolute count.
    latency_ms / speedup: measured p50 to reach, absolute or as a speed-up over the unpruned model."""

    kind: TargetKind
    value: float

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}


@dataclass(frozen=True)
class PruneSettings:
    importance: str = "l2"
    global_pruning: bool = False
    round_to: int | None = None
    ignore: tuple[str, ...] = ()
    """Module names whose output channels are kept, besides the classifier head (always kept)."""


@dataclass
class StepResult:
    """One pruning step: the pruned copy and what it measures."""

    model: nn.Module
    channel_ratio: float
    macs: int
    params: int
    trials: int = 1


@dataclass
class PruneResult:
    """The final pruned model and one row per step (channel ratio, MACs, params, fractions, what after_step adds)."""

    model: nn.Module
    steps: list[dict[str, Any]] = field(default_factory=list)


class _EmptyLayer(Exception):
    """A pruning attempt would leave `layer` (which had `channels`) with no channels."""

    def __init__(self, layer: str, channels: int) -> None:
        super().__init__(layer)
        self.layer, self.channels = layer, channels


def target_from_config(cfg: Any) -> PruneTarget:
    """The one target a PruneConfig sets (config validation guarantees exactly one)."""
    if cfg.target_macs is not None:
        return PruneTarget("macs", float(cfg.target_macs))
    if cfg.target_params is not None:
        return PruneTarget("params", float(cfg.target_params))
    if getattr(cfg, "target_latency_ms", None) is not None:
        return PruneTarget("latency_ms", float(cfg.target_latency_ms))
    if getattr(cfg, "target_speedup", None) is not None:
        return PruneTarget("speedup", float(cfg.target_speedup))
    return PruneTarget("ratio", float(cfg.ratio if cfg.ratio is not None else 0.3))


def measure(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """(MACs, params) from torch-pruning's counter (a forward pass on a copy; the model is untouched)."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv / Linear layer, by module name."""
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            out[name] = module.out_channels
        elif isinstance(module, nn.Linear):
            out[name] = module.out_features
    return out


def resolve_ignored(model: nn.Module, names: Iterable[str], what: str = "model") -> list[str]:
    """The classifier head plus the user's names; an unknown name is an InputError naming examples."""
    from edgekd.models import classifier_name

    modules = dict(model.named_modules())
    for name in names:
        if not name or name not in modules:
            examples = [child for child, _ in model.named_children()][:4]
            raise InputError(f"prune.ignore: no module '{name}' in the {what} (e.g. {', '.join(examples)}, ...)")
    head = classifier_name(model)
    return list(dict.fromkeys([*([head] if head else []), *names]))


def make_importance(name: str) -> Any:
    """torch-pruning importance estimator for a config name."""
    import torch_pruning as tp

    makers = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": tp.importance.GroupTaylorImportance,  # reads .grad: see taylor_gradients
        "bn_scale": tp.importance.BNScaleImportance,
    }
    if name not in makers:
        raise InputError(f"prune.importance: unknown '{name}' (choose from {', '.join(IMPORTANCES)})")
    return makers[name]()


def taylor_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Cross-entropy gradients summed over a few batches, by parameter name (Taylor importance reads them).

    Eval mode: gradients flow the same, and BatchNorm running statistics are not disturbed by the probe.
    """
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    for inputs, labels in batches:
        F.cross_entropy(model(inputs), labels).backward()
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return grads


class _CachedImportance:
    """Importance scores shared by all pruning attempts on copies of one model.

    A group's scores depend only on the (identical) weights, not on the ratio tried, so a ratio search
    computes them once; groups are keyed by their root layer's name, which is the same in every copy.
    """

    def __init__(self, inner: Any, names: dict[int, str], cache: dict[tuple, torch.Tensor]) -> None:
        self.inner, self.names, self.cache = inner, names, cache

    def __call__(self, group: Any) -> torch.Tensor | None:
        dep, idxs = group[0]
        key = (self.names.get(id(dep.target.module)), getattr(dep.handler, "__name__", str(dep.handler)), len(idxs))
        if key not in self.cache:
            self.cache[key] = self.inner(group)
        scores = self.cache[key]
        return None if scores is None else scores.clone()


@contextlib.contextmanager
def _naming_the_failing_layer(model: nn.Module, what: str) -> Iterator[None]:
    """Turn an exception raised inside `model`'s forward pass (torch-pruning's tracing, or a pruned model whose
    layers no longer fit each other) into an InputError naming the innermost layer that was running."""
    running: list[str] = []

    def enter(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any) -> None:
            running.append(name)
        return hook

    def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:  # returns None: the output is kept
        if running:
            running.pop()

    modules = [(name, module) for name, module in model.named_modules() if name]
    hooks = [module.register_forward_pre_hook(enter(name)) for name, module in modules]
    hooks += [module.register_forward_hook(leave) for _, module in modules]
    try:
        yield
    except (InputError, _EmptyLayer):
        raise
    except Exception as exc:  # noqa: BLE001 - torch-pruning raises anything from deep inside a model
        layer = running[-1] if running else None
        kind = type(model.get_submodule(layer)).__name__ if layer else type(model).__name__
        where = f"layer '{layer}' ({kind})" if layer else f"the model ({kind})"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(f"prune: {what} {where}: {type(exc).__name__}: {first}; keep the channels it depends "
                         "on: add the layer before it (or the block holding it) to prune.ignore") from None
    finally:
        for hook in hooks:
            hook.remove()


def _prune_copy(
    model: nn.Module, example_inputs: torch.Tensor, ratio: float, settings: PruneSettings,
    ignored: list[str], grads: dict[str, torch.Tensor] | None, cache: dict[tuple, torch.Tensor] | None = None,
) -> nn.Module:
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    if grads is not None:  # deepcopy drops .grad; Taylor importance needs it on the copy
        for name, param in pruned.named_parameters():
            param.grad = grads[name].clone() if name in grads else torch.zeros_like(param)
    modules = dict(pruned.named_modules())
    names = {id(module): name for name, module in modules.items()}
    before = layer_channels(pruned)
    if ratio > 0:
        importance = _CachedImportance(make_importance(settings.importance), names, {} if cache is None else cache)
        with _naming_the_failing_layer(pruned, "torch-pruning cannot trace"):
            pruner = tp.pruner.BasePruner(
                pruned, example_inputs, importance=importance,
                global_pruning=settings.global_pruning, pruning_ratio=ratio, round_to=settings.round_to,
                ignored_layers=[modules[name] for name in ignored],
            )
        # torch-pruning silently skips a group it would empty; a skipped layer would break the target, so
        # intercept its check (this pruner's graph only) and report the layer instead
        check = pruner.DG.check_pruning_group
        refused: list[nn.Module] = []

        def checked(group: Any) -> bool:
            if check(group):
                return True
            refused.append(group[0].dep.target.module)
            return False

        pruner.DG.check_pruning_group = checked
        pruner.step()
        if refused:
            name = names.get(id(refused[0]), "?")
            raise _EmptyLayer(name, before.get(name, 0))
        with _naming_the_failing_layer(pruned, "after pruning, torch-pruning left a layer that does not run:"), \
                torch.no_grad():  # a layer torch-pruning does not know (custom parameters) fails here, by name
            pruned.eval()(example_inputs)
    pruned.zero_grad(set_to_none=True)
    pruned.train(model.training)  # building the pruner switches the copy to eval mode
    return pruned


def prune_channels(
    model: nn.Module, example_inputs: torch.Tensor, ratio: float, settings: PruneSettings,
    ignored: list[str], grads: dict[str, torch.Tensor] | None = None, *, label: str | None = None,
) -> StepResult:
    """Remove `ratio` of the channels (per layer, or overall with global ranking); returns a pruned copy.
    `label` names the setting in error messages (default `prune.ratio: <ratio>`)."""
    label = label or f"prune.ratio: {ratio:g}"
    if not 0 < ratio < 1:
        raise InputError(f"{label}: must be in (0, 1)")
    try:
        pruned = _prune_copy(model, example_inputs, ratio, settings, ignored, grads)
    except _EmptyLayer as exc:
        raise InputError(
            f"{label} would leave layer '{exc.layer}' ({exc.channels} channels) with no channels "
            f"(lower the ratio, or add the layer to prune.ignore)"
        ) from None
    if _count(pruned) >= _count(model):
        raise InputError(f"{label}: nothing could be pruned (every layer ignored, or the importance scores none)")
    macs, params = measure(pruned, example_inputs)
    return StepResult(pruned, ratio, macs, params)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_to(
    model: nn.Module, example_inputs: torch.Tensor, kind: Literal["macs", "params"], goal: float,
    settings: PruneSettings, ignored: list[str], grads: dict[str, torch.Tensor] | None = None,
    *, label: str | None = None,
) -> StepResult:
    """Search the channel ratio whose pruned copy has `goal` MACs (or params), absolute; `label` names the
    setting in error messages.

    Conv cost scales roughly with (1 - ratio)^2 (input and output channels both shrink), so the first guess
    is 1 - sqrt(fraction); then secant steps on sqrt(measure) inside a shrinking bracket. Ratios that empty
    a layer bound the bracket from above. Returns the closest copy found.
    """
    base_macs, base_params = measure(model, example_inputs)
    current = base_macs if kind == "macs" else base_params
    cache: dict[tuple, torch.Tensor] = {}
    fraction = goal / current
    if fraction >= 1 - 1e-9:
        return StepResult(copy.deepcopy(model), 0.0, base_macs, base_params, 0)
    lo, lo_value = 0.0, 1.0
    hi, hi_value = 1.0, None  # hi_value None: hi is a ratio that empties a layer (or the limit 1)
    best: StepResult | None = None
    empty: _EmptyLayer | None = None
    # below this ratio step no layer's channel count can change: a finer bracket is wasted trials
    resolution = 0.25 / max(layer_channels(model).values() or [1])
    ratio = 1 - math.sqrt(fraction)
    for trial in range(1, MAX_TRIALS + 1):
        try:
            pruned = _prune_copy(model, example_inputs, ratio, settings, ignored, grads, cache)
        except _EmptyLayer as exc:
            empty, hi, hi_value = exc, ratio, None
        else:
            macs, params = measure(pruned, example_inputs)
            value = (macs if kind == "macs" else params) / current
            candidate = StepResult(pruned, ratio, macs, params, trial)
            if best is None or abs(_amount(candidate, kind) - goal) < abs(_amount(best, kind) - goal):
                best = candidate
            if abs(value - fraction) <= SEARCH_TOLERANCE * fraction:
                break
            if value > fraction:
                lo, lo_value = ratio, value
            else:
                hi, hi_value = ratio, value
        if hi - lo < resolution:
            break
        ratio = _next_ratio(lo, lo_value, hi, hi_value, fraction)
    if best is not None:
        best.trials = trial
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


def step_goals(target: PruneTarget, steps: int, base_macs: int, base_params: int) -> list[float]:
    """Cumulative goal after each step: kept channel fraction (ratio), or absolute MACs / params."""
    if target.kind == "ratio":
        return [1 - target.value * k / steps for k in range(1, steps + 1)]
    base = base_macs if target.kind == "macs" else base_params
    final = target.value * base if target.value <= 1 else target.value
    if final > base:
        raise InputError(f"prune.target_{target.kind}: {target.value:,.0f} is more than the model has ({base:,})")
    return [base - (base - final) * k / steps for k in range(1, steps + 1)]


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
        row = {
            "step": index, "channel_ratio": round(result.channel_ratio, 6), "search_trials": result.trials,
            "macs": result.macs, "params": result.params, "macs_fraction": round(result.macs / base_macs, 6),
            "params_fraction": round(result.params / base_params, 6),
            "channels_fraction": round(sum(layer_channels(current).values()) / base_channels, 6),
        }
        if after_step is not None:
            after_step(current, row)
        rows.append(row)
    return PruneResult(current, rows)


# --------------------------------------------------------------------------------------------------
# Latency targets: the channel ratio searched on measured latency instead of counted MACs

LATENCY_TOLERANCE = 0.05  # a trial within 5 % of its goal stops the search (the target is met within 10 %)
LATENCY_TRIALS = 8
ROUND_TO_CANDIDATES = (1, 4, 8, 16)

LatencyFunction = Callable[[nn.Module], float]
"""A pruned copy -> its latency as a fraction of the unpruned model's (measured, or injected in tests)."""


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
    cumulative goals). The first guess treats latency like MACs (fraction ~ (1 - ratio)^2); then secant steps
    inside a shrinking bracket, as for MACs targets, since small models' latency falls slower than their MACs.
    Stops within `tolerance` of the goal, when the bracket is finer than a channel, or after `max_trials`;
    returns the closest copy measured (the least pruned of those equally close within the tolerance). `start` is `model`'s own fraction (1 for the original, less after
    earlier steps), the bracket's lower end; `base_macs` (the original's) gives each trial's MACs fraction.
    """
    base_macs = base_macs or measure(model, example_inputs)[0]
    cache: dict[tuple, torch.Tensor] = {}
    lo, lo_value, hi, hi_value = 0.0, start, 1.0, None
    measured: list[LatencyStep] = []
    empty: _EmptyLayer | None = None
    trace: list[dict[str, Any]] = []
    resolution = 0.25 / max(layer_channels(model).values() or [1])
    ratio = min(max(1 - math.sqrt(goal / lo_value), resolution), 0.95) if lo_value > goal else resolution
    for trial in range(1, max_trials + 1):
        try:
            pruned = _prune_copy(model, example_inputs, ratio, settings, ignored, grads, cache)
        except _EmptyLayer as exc:
            empty, hi, hi_value = exc, ratio, None
            trace.append({"trial": trial, "channel_ratio": round(ratio, 6), "error": f"empties layer {exc.layer}"})
        else:
            macs, params = measure(pruned, example_inputs)
            value = float(latency(pruned))
            trace.append({"trial": trial, "channel_ratio": round(ratio, 6), "macs_fraction": round(macs / base_macs, 6),
                          "latency_fraction": round(value, 6)})
            measured.append(LatencyStep(pruned, ratio, macs, params, trial, value))
            if abs(value - goal) <= tolerance * goal:
                break
            if value > goal:
                lo, lo_value = ratio, value
            else:
                hi, hi_value = ratio, value
        if hi - lo < resolution:
            break
        ratio = _next_ratio(lo, lo_value, hi, hi_value, goal)
    if not measured:
        raise InputError(f"{label}: every channel ratio tried would leave layer '{empty.layer if empty else '?'}' "
                         "with no channels (raise the target, or add layers to prune.ignore)")
    # the closest copy; among copies as close within the tolerance (timing noise), the least pruned: when a
    # target cannot be reached (an overhead-bound model), deeper pruning that buys nothing is not taken
    closest = min(abs(m.latency_fraction - goal) for m in measured)
    best = min((m for m in measured if abs(m.latency_fraction - goal) <= closest + tolerance * goal),
               key=lambda m: m.channel_ratio)
    best.trials, best.trace = trial, trace
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
        row = {
            "step": index, "channel_ratio": round(result.channel_ratio, 6), "search_trials": result.trials,
            "macs": result.macs, "params": result.params, "macs_fraction": round(result.macs / base_macs, 6),
            "params_fraction": round(result.params / base_params, 6),
            "channels_fraction": round(sum(layer_channels(current).values()) / base_channels, 6),
            "latency_goal": round(goal, 6), "latency_fraction": round(result.latency_fraction, 6),
            "trials": result.trace,
        }
        if after_step is not None:
            after_step(current, row)
        rows.append(row)
    return PruneResult(current, rows)


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
            pruned = _prune_copy(model, example_inputs, ratio, replace_round_to(settings, step), ignored, None)
        except _EmptyLayer:
            continue
        shape = tuple(sorted(layer_channels(pruned).items()))
        if shape not in seen:
            seen.add(shape)
            copies[step] = pruned
    return copies


ROUND_TO_TIE = 0.02  # MACs-per-ms rates this close are a tie (timing noise): the coarser rounding is kept


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
    from dataclasses import replace

    return replace(settings, round_to=None if round_to in (None, 1) else int(round_to))
