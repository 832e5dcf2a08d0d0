"""Structured channel pruning with torch-pruning (DepGraph): settings, importance, one pruned copy at a ratio.

Torch-level and runner-free, so it is testable on its own; `search.py` finds the ratio that meets a MACs,
params or latency target, and `edgekd.stages.prune` adds data, recovery and I/O.

Every pruning attempt works on a deep copy of the model: a target is met by trying several channel ratios
(torch-pruning only takes ratios), and a failed attempt (a layer left with no channels) must not damage
the caller's model. Coupled layers (residual adds, depthwise and grouped convolutions, the BatchNorms that
follow a conv) are pruned together by torch-pruning's dependency graph, so the result always runs.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.errors import InputError

TargetKind = Literal["ratio", "macs", "params", "latency_ms", "speedup"]
IMPORTANCES = ("l1", "l2", "taylor", "bn_scale")


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


class EmptyLayer(Exception):
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
    except (InputError, EmptyLayer):
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


def pruned_copy(
    model: nn.Module, example_inputs: torch.Tensor, ratio: float, settings: PruneSettings,
    ignored: list[str], grads: dict[str, torch.Tensor] | None, cache: dict[tuple, torch.Tensor] | None = None,
) -> nn.Module:
    """A copy of `model` with `ratio` of its channels removed; raises EmptyLayer when a layer would keep none.

    `grads` (Taylor importance) are put on the copy; `cache` shares importance scores between the copies a
    ratio search makes of one model.
    """
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
            raise EmptyLayer(name, before.get(name, 0))
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
        pruned = pruned_copy(model, example_inputs, ratio, settings, ignored, grads)
    except EmptyLayer as exc:
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
