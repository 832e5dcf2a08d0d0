"""BatchNorm running statistics that match the weights, and a check that they do.

Short schedules, fine-tuning and pruning recovery move weights faster than BatchNorm's moving average
(momentum 0.1) follows, so the running mean/var an exported model uses describe activations of earlier
weights: train-mode accuracy (batch statistics) is fine while eval-mode accuracy collapses, sometimes to one
class for every input. `recalibrate_batchnorm` re-estimates the statistics with the final weights;
`batch_statistics_accuracy` measures what the model would score with correct statistics, for the guard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from edgekd.train import distributed

_BatchNorm = nn.modules.batchnorm._BatchNorm


def tracked_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


@contextlib.contextmanager
def _batchnorm_in_train_mode(model: nn.Module, momentum: float | None) -> Iterator[list[_BatchNorm]]:
    """Every module in eval mode (dropout off) except BatchNorm; flags and momenta restored afterwards."""
    layers = tracked_batchnorms(model)
    modes = {module: module.training for module in model.modules()}
    momenta = [layer.momentum for layer in layers]
    model.eval()
    for layer in layers:
        layer.train()
        layer.momentum = momentum
    try:
        yield layers
    finally:
        for layer, value in zip(layers, momenta):
            layer.momentum = value
        for module, training in modes.items():
            module.train(training)


def batchnorm_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Copies of every tracked BatchNorm's running statistics (to put back with restore_batchnorm_buffers)."""
    return [t.clone() for layer in tracked_batchnorms(model)
            for t in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]


@torch.no_grad()
def restore_batchnorm_buffers(model: nn.Module, saved: list[torch.Tensor]) -> None:
    targets = [t for layer in tracked_batchnorms(model)
               for t in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]
    for target, value in zip(targets, saved):
        target.copy_(value)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], max_batches: int) -> dict[str, Any]:
    """Reset every BatchNorm's running statistics and re-estimate them as the plain average over up to
    `max_batches` input batches (momentum None: each batch counts equally), forward only.

    Under torchrun every rank averages over its own batches and the per-layer results are averaged across
    ranks (equal batch counts: the shards have equal length), so all ranks hold the same statistics.
    Returns {"layers", "batches", "samples"}; a model without BatchNorm is left untouched.
    """
    layers = tracked_batchnorms(model)
    if not layers or max_batches <= 0:
        return {"layers": len(layers), "batches": 0, "samples": 0}
    saved = [(layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone())
             for layer in layers]
    used = samples = 0
    with _batchnorm_in_train_mode(model, momentum=None):
        for layer in layers:
            layer.reset_running_stats()
        for inputs in batches:
            if used == max_batches:
                break
            if len(inputs) < 2:  # one sample gives no variance (and fails on 1x1 maps)
                continue
            model(inputs)
            used += 1
            samples += len(inputs)
    if used == 0:  # nothing to estimate from: keep what the model had
        for layer, (mean, var, count) in zip(layers, saved):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            layer.num_batches_tracked.copy_(count)
        return {"layers": len(layers), "batches": 0, "samples": 0}
    distributed.average_tensors([t for layer in layers for t in (layer.running_mean, layer.running_var)])
    return {"layers": len(layers), "batches": used, "samples": samples}


@torch.no_grad()
def batch_statistics_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """Accuracy with BatchNorm normalising each batch by its own statistics (train-mode BN, dropout off),
    running statistics untouched: what the weights can do when the statistics are right. None without BN."""
    layers = tracked_batchnorms(model)
    if not layers:
        return None
    saved = [layer.num_batches_tracked.clone() for layer in layers]
    correct = total = 0
    with _batchnorm_in_train_mode(model, momentum=0.0):  # momentum 0: the running statistics stay as they are
        for inputs, labels in batches:
            if len(inputs) < 2:
                continue
            correct += int((model(inputs).argmax(1) == labels).sum())
            total += len(labels)
    for layer, count in zip(layers, saved):
        layer.num_batches_tracked.copy_(count)
    return correct / total if total else None
