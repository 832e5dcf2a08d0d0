"""The one training loop, shared by teacher training, distillation and pruning recovery.

The objective (plain CE, KD, KD + hint) is passed in; everything else — batching, augmentation, optimizer,
schedule, AMP, NaN guard, per-epoch validation, best-checkpoint selection — lives here once.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.data.bundle import DataBundle, Split
from edgekd.errors import InputError, StageFailed
from edgekd.train import distributed
from edgekd.train.batchnorm import batchnorm_buffers, restore_batchnorm_buffers
from edgekd.train.config import TrainConfig
from edgekd.train.freeze import BackboneFreeze
from edgekd.train.objectives import CrossEntropyObjective, Objective

SHIFT_PIXELS = 2
MODE_GAP = 0.2  # eval-mode accuracy this far below batch-statistics accuracy: the BatchNorm statistics are wrong


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when present, else CPU (then torch uses every core the process may run on)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device: '{name}' requested but CUDA is not available (use device: auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("device: 'mps' requested but it is not available")
    if name == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores))
    return torch.device(name)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@dataclass
class Batches:
    """Index-based batching over an in-memory split (no DataLoader overhead for tensors already in memory).

    `rank`/`world_size` shard the epoch's permutation through DistributedSampler under torchrun.
    """

    split: Split
    data: DataBundle
    batch_size: int
    device: torch.device
    shuffle: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    _images: torch.Tensor | None = None
    _labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # On a GPU the whole uint8 split fits easily: copy it once, not every batch.
        self._images = self.split.images.to(self.device)
        self._labels = self.split.labels.to(self.device)

    def indices(self, epoch: int) -> torch.Tensor:
        count = len(self.split)
        if self.world_size > 1:
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(range(count), self.world_size, self.rank, shuffle=self.shuffle, seed=self.seed)
            sampler.set_epoch(epoch)
            return torch.tensor(list(iter(sampler)), dtype=torch.long)
        if not self.shuffle:
            return torch.arange(count)
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        return torch.randperm(count, generator=generator)

    def __len__(self) -> int:
        per_rank = math.ceil(len(self.split) / self.world_size)
        return math.ceil(per_rank / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self.indices(epoch)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            device_index = index.to(self.device)
            yield self.data.normalize(self._images[device_index]), self._labels[device_index], index


def augment(inputs: torch.Tensor, data: DataBundle, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (padding with the normalized value of a black pixel), plus
    horizontal flips for natural images. Cheap tensor ops on the batch, on its device."""
    n, c, h, w = inputs.shape
    pad = SHIFT_PIXELS
    background = torch.tensor([-m / s for m, s in zip(data.meta.mean, data.meta.std)], device=inputs.device)
    canvas = background.view(1, c, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    canvas[:, :, pad:pad + h, pad:pad + w] = inputs
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    out = torch.empty_like(inputs)
    for dy, dx in {tuple(o) for o in offsets.tolist()}:
        chosen = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().squeeze(1).to(inputs.device)
        out[chosen] = canvas[chosen, :, dy:dy + h, dx:dx + w]
    if data.meta.natural_images:
        flip = (torch.rand(n, generator=generator) < 0.5).to(inputs.device)
        out[flip] = out[flip].flip(-1)
    return out


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "onecycle" and total_steps > 1:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=max(cfg.warmup_fraction, 1e-3)
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    wall_s: float = 0.0
    mode_check: dict[str, Any] = field(default_factory=dict)
    """Eval-mode vs batch-statistics accuracy of the selected weights on the validation split (see check_modes)."""


def standard_error(accuracy_value: float, samples: int) -> float:
    """Binomial standard error of an accuracy measured on `samples` images."""
    return math.sqrt(max(accuracy_value * (1 - accuracy_value), 0.0) / max(samples, 1))


def recalibrate(model: nn.Module, data: DataBundle, batches: int, batch_size: int, device: torch.device,
                seed: int) -> dict[str, Any]:
    """BatchNorm statistics re-estimated over `batches` un-augmented training batches (a seeded sample; under
    torchrun each rank uses its own shard)."""
    from edgekd.train.batchnorm import recalibrate_batchnorm

    rank, world_size = (distributed.rank(), distributed.world_size()) if distributed.is_distributed() else (0, 1)
    sample = Batches(data.train, data, batch_size, device, shuffle=True, seed=seed + 1, rank=rank, world_size=world_size)
    return recalibrate_batchnorm(model, (inputs for inputs, _, _ in sample.epoch(0)), batches)


def check_modes(model: nn.Module, data: DataBundle, device: torch.device, eval_accuracy: float, batch_size: int,
                what: str, knob: str) -> dict[str, Any]:
    """The guard against a model that trained well but infers at chance: compare its eval-mode validation
    accuracy with what the same weights score with per-batch BatchNorm statistics, and say so loudly when
    eval mode is at chance level or far below."""
    from edgekd.runtime.evaluate import near_chance_accuracy
    from edgekd.train.batchnorm import batch_statistics_accuracy

    chance = 1.0 / data.meta.num_classes
    batch_stats = batch_statistics_accuracy(
        model, ((x, y) for x, y, _ in Batches(data.val, data, batch_size, device, shuffle=True, seed=0).epoch(0)))
    floor = near_chance_accuracy(data.meta.num_classes)
    at_chance = eval_accuracy < floor
    # far below, or at chance while the same weights do better than chance with batch statistics
    diverged = batch_stats is not None and (batch_stats - eval_accuracy > MODE_GAP or (at_chance and batch_stats >= floor))
    check = {"eval_accuracy": round(eval_accuracy, 6), "batch_stats_accuracy": None if batch_stats is None
             else round(batch_stats, 6), "chance": round(chance, 6), "at_chance": at_chance, "diverged": diverged}
    if at_chance or diverged:
        cause = ("BatchNorm running statistics do not match the weights (they moved faster than the moving "
                 f"average followed); raise {knob} (BatchNorm recalibration), lower the learning rate or train longer"
                 if diverged else "it learned nothing usable: check the data, labels, learning rate and epochs")
        against = f", against {batch_stats:.4f} with batch statistics" if batch_stats is not None else ""
        check["message"] = (f"{what}: eval-mode validation accuracy {eval_accuracy:.4f} is "
                            f"{'at chance level' if at_chance else 'far below what its weights can do'}{against} "
                            f"(chance {chance:.4f}): {cause}")
        logging.getLogger("edgekd").warning("  %s\n  WARNING %s\n  %s", "!" * 78, check["message"], "!" * 78)
    return check


@torch.inference_mode()
def predict(model: nn.Module, split: Split, data: DataBundle, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Logits for a whole split (float32, on CPU), model in eval mode."""
    was_training = model.training
    model.eval()
    outputs = [model(x).float().cpu() for x, _, _ in Batches(split, data, batch_size, device).epoch(0)]
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels.cpu()).float().mean()) if len(labels) else 0.0


def agreement(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    return float((logits.argmax(1) == reference_logits.argmax(1)).float().mean()) if len(logits) else 0.0


def fit(
    model: nn.Module,
    data: DataBundle,
    cfg: TrainConfig,
    *,
    device: torch.device,
    seed: int,
    objective: Objective | None = None,
    desc: str = "train",
    batch_size: int | None = None,
    eval_batch_size: int = 512,
    reference_val_logits: torch.Tensor | None = None,
    log: Callable[[str], None] = print,
    config_key: str = "",
) -> FitResult:
    """Train `model` in place; at the end it holds the weights of the latest epoch whose validation accuracy is
    within one standard error of the best (the one-standard-error rule: an earlier epoch must be better by
    more than the validation split can resolve to be preferred over a more trained one).

    After each epoch the BatchNorm statistics are re-estimated (`cfg.bn_recalibration_batches`) before
    validation, so the epoch chosen is chosen on what the exported model will do; at the end, `mode_check`
    compares eval-mode with batch-statistics accuracy (`config_key` names the config section in the warning).
    `reference_val_logits` (the teacher's on the validation split) adds top-1 agreement to each epoch's row.
    Under torchrun each rank trains on its DistributedSampler shard of every epoch through DDP; the training
    loss parts are all-reduced, and every rank validates on the whole (small) validation split, so all ranks
    select the same best epoch.
    """
    from tqdm.auto import tqdm  # a widget in notebooks, a text bar on a terminal (stderr), nothing when not a TTY

    objective = objective or CrossEntropyObjective(cfg.label_smoothing)
    seed_everything(seed)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        teacher = getattr(objective, "teacher", None)  # a frozen KD teacher sees the same channels_last inputs:
        if isinstance(teacher, nn.Module):  # in the same layout its convolutions skip a reorder (~1.3x on CPU)
            teacher.to(memory_format=torch.channels_last)
    rank, world_size = (distributed.rank(), distributed.world_size()) if distributed.is_distributed() else (0, 1)
    trained = distributed.wrap_model(model, device)
    train_batches = Batches(data.train, data, batch_size or 128, device, shuffle=True, seed=seed, rank=rank, world_size=world_size)
    params = [p for p in model.parameters() if p.requires_grad] + objective.extra_parameters()
    optimizer = _optimizer(params, cfg)  # built here, after any pruning: never holds stale parameters
    scheduler = _scheduler(optimizer, cfg, cfg.epochs * len(train_batches))
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    augment_generator = torch.Generator().manual_seed(seed + 7)
    freeze = BackboneFreeze(model, cfg.freeze_backbone_epochs)
    result = FitResult()
    best_state = copy.deepcopy(model.state_dict())
    best_seen = 0.0
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        trained.train()
        frozen = freeze.start_epoch(epoch)
        epoch_started = time.perf_counter()
        sums: dict[str, float] = {}
        seen = 0
        progress = tqdm(train_batches.epoch(epoch), total=len(train_batches), desc=f"{desc} {epoch}/{cfg.epochs}",
                        leave=False, disable=None if rank == 0 else True)
        for step, (inputs, labels, indices) in enumerate(progress, start=1):
            augmented = cfg.augment
            if augmented:
                inputs = augment(inputs, data, augment_generator)
            if cfg.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                loss, parts = objective(trained, inputs, labels, indices, augmented)
            if not torch.isfinite(loss):
                raise StageFailed(f"{desc}: loss became {float(loss.detach())} at epoch {epoch}, step {step} (lower the learning rate?)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            freeze.drop_backbone_grads()
            distributed.average_gradients(objective.extra_parameters())  # DDP syncs only the model's own
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            count = len(labels)
            seen += count
            for name, value in {"loss": loss, **parts}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * count
        sums = distributed.all_reduce_sums({**sums, "_seen": float(seen)})
        seen = int(sums.pop("_seen"))
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        if frozen:
            row["backbone_frozen"] = True
        row.update({f"train_{k}": round(v / max(seen, 1), 6) for k, v in sums.items()})
        val_logits = predict(model, data.val, data, device, eval_batch_size)
        if cfg.bn_recalibration_batches:
            recal_started = time.perf_counter()
            moving_average = batchnorm_buffers(model)
            recalibrated = recalibrate(model, data, cfg.bn_recalibration_batches, batch_size or 128, device, seed)
            if recalibrated["batches"]:
                recal_logits = predict(model, data.val, data, device, eval_batch_size)
                # Keep the statistics that validate better: recalibrated ones rescue a collapsed eval mode; late
                # in a long schedule the moving average can be as good, and is then kept as it was.
                kept = accuracy(recal_logits, data.val.labels) >= accuracy(val_logits, data.val.labels)
                if kept:
                    val_logits = recal_logits
                else:
                    restore_batchnorm_buffers(model, moving_average)
                row["bn_recalibrated"] = {"batches": recalibrated["batches"], "samples": recalibrated["samples"],
                                          "kept": kept}
                row["bn_recalibration_s"] = round(time.perf_counter() - recal_started, 3)
        row["val_accuracy"] = round(accuracy(val_logits, data.val.labels), 6)
        row["val_loss"] = round(float(F.cross_entropy(val_logits, data.val.labels)), 6)
        if reference_val_logits is not None:
            row["val_agreement"] = round(agreement(val_logits, reference_val_logits), 6)
        row["time_s"] = round(time.perf_counter() - epoch_started, 3)
        result.history.append(row)
        best_seen = max(best_seen, row["val_accuracy"])
        if epoch == 1 or row["val_accuracy"] >= best_seen - standard_error(best_seen, len(data.val)):
            result.best_val_accuracy = row["val_accuracy"]
            result.best_epoch = epoch
            best_state = copy.deepcopy(model.state_dict())
        parts_text = " ".join(f"{k.removeprefix('train_')}={v:.4f}" for k, v in row.items() if k.startswith("train_"))
        agreement_text = f" agree={row['val_agreement']:.4f}" if "val_agreement" in row else ""
        log(f"  {desc} epoch {epoch}/{cfg.epochs}: {parts_text} val_acc={row['val_accuracy']:.4f}{agreement_text} ({row['time_s']:.1f} s)")
    model.load_state_dict(best_state)
    model.eval()
    knob = f"{config_key}.bn_recalibration_batches" if config_key else "bn_recalibration_batches"
    if not result.history:  # no epoch ran: validate the weights as they are
        result.best_val_accuracy = round(accuracy(predict(model, data.val, data, device, eval_batch_size), data.val.labels), 6)
    result.mode_check = check_modes(model, data, device, result.best_val_accuracy, eval_batch_size, desc, knob)
    result.wall_s = round(time.perf_counter() - started, 3)
    return result
