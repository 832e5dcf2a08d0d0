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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.data.bundle import DataBundle, FileSplit, Split
from edgekd.data.loading import augment  # noqa: F401 - the bundled datasets' tensor augmentation, re-exported
from edgekd.errors import InputError, StageFailed
from edgekd.train import distributed
from edgekd.train.batchnorm import batchnorm_buffers, restore_batchnorm_buffers
from edgekd.train.config import TrainConfig
from edgekd.train.freeze import BackboneFreeze
from edgekd.train.objectives import CrossEntropyObjective, Objective

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
    loader: dict[str, Any] = field(default_factory=dict)
    """Data loader wait vs step time over the training epochs (see loader_summary)."""


LOADER_BOTTLENECK = 0.10  # waiting for batches more than this share of the step time: the loader limits training


def loader_summary(wait_s: float, step_s: float, data: DataBundle, images: int) -> dict[str, Any]:
    """How much of the training time went to waiting for the next batch, and which knob to turn when the
    loader is the bottleneck."""
    fraction = wait_s / step_s if step_s > 0 else 0.0
    summary: dict[str, Any] = {"wait_fraction": round(fraction, 4), "wait_s": round(wait_s, 3),
                               "step_s": round(step_s, 3), "images_per_s": round(images / step_s, 1) if step_s else None,
                               "streamed": data.meta.streamed,
                               # in-memory batching is index arithmetic: only the file loader has knobs to turn
                               "bottleneck": data.meta.streamed and fraction > LOADER_BOTTLENECK,
                               "advice": None}
    if data.config is not None and data.meta.streamed:
        from edgekd.data.loading import resolve_workers

        summary["num_workers"] = resolve_workers(data.config.num_workers)
    if summary["bottleneck"]:
        summary["advice"] = (f"the data loader is the bottleneck ({fraction:.0%} of the step time waiting for "
                             f"images): raise data.num_workers (now {summary.get('num_workers')}), store the images "
                             "pre-resized near data.resize (decoding and resizing large photos costs most), or raise "
                             "data.prefetch_factor")
    return summary


def standard_error(accuracy_value: float, samples: int) -> float:
    """Binomial standard error of an accuracy measured on `samples` images."""
    return math.sqrt(max(accuracy_value * (1 - accuracy_value), 0.0) / max(samples, 1))


def recalibrate(model: nn.Module, data: DataBundle, batches: int, batch_size: int, device: torch.device,
                seed: int) -> dict[str, Any]:
    """BatchNorm statistics re-estimated over `batches` un-augmented training batches (a seeded sample; under
    torchrun each rank uses its own shard)."""
    from edgekd.train.batchnorm import recalibrate_batchnorm

    rank, world_size = (distributed.rank(), distributed.world_size()) if distributed.is_distributed() else (0, 1)
    sample = data.batches(data.train, batch_size, device, shuffle=True, seed=seed + 1, rank=rank, world_size=world_size)
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
        model, ((x, y) for x, y, _ in data.batches(data.val, batch_size, device, shuffle=True, seed=0).epoch(0)))
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
def predict(model: nn.Module, split: Split | FileSplit, data: DataBundle, device: torch.device,
            batch_size: int = 512) -> torch.Tensor:
    """Logits for a whole split (float32, on CPU, one row per sample in order), model in eval mode. The rows of
    images skipped as unreadable (data.on_bad_image: skip) are NaN, and left out by accuracy/agreement."""
    was_training = model.training
    model.eval()
    outputs, positions = [], []
    for x, _, index in data.batches(split, batch_size, device).epoch(0):
        outputs.append(model(x).float().cpu())
        positions.append(index)
    model.train(was_training)
    if not outputs:
        return torch.full((len(split), data.meta.num_classes), float("nan"))
    logits = torch.cat(outputs)
    if len(logits) == len(split):
        return logits
    full = torch.full((len(split), logits.shape[1]), float("nan"))
    full[torch.cat(positions)] = logits
    return full


def _kept(logits: torch.Tensor) -> torch.Tensor | None:
    """Rows of samples that were evaluated (None: all of them)."""
    skipped = torch.isnan(logits).all(1) if logits.dim() == 2 and len(logits) else None
    return None if skipped is None or not bool(skipped.any()) else ~skipped


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    kept = _kept(logits)
    if kept is not None:
        logits, labels = logits[kept], labels.cpu()[kept]
    return float((logits.argmax(1) == labels.cpu()).float().mean()) if len(labels) else 0.0


def agreement(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    kept = _kept(logits)
    if kept is not None:
        logits, reference_logits = logits[kept], reference_logits[kept]
    return float((logits.argmax(1) == reference_logits.argmax(1)).float().mean()) if len(logits) else 0.0


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    kept = _kept(logits)
    if kept is not None:
        logits, labels = logits[kept], labels[kept]
    return float(F.cross_entropy(logits, labels))


def show_progress() -> bool | None:
    """tqdm's `disable`: None (a bar when stderr is a terminal) unless the console shows warnings only (-q)."""
    handlers = [h for h in logging.getLogger().handlers if type(h).__name__ == "StderrHandler"]
    return True if handlers and all(h.level > logging.INFO for h in handlers) else None


def mix_batch(inputs: torch.Tensor, labels: torch.Tensor, data: DataBundle) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup / CutMix (data.augment.mixup_alpha / cutmix_alpha) of a training batch: soft labels."""
    settings = data.config.augment if data.config is not None else None
    if settings is None or not (settings.mixup_alpha or settings.cutmix_alpha) or len(labels) < 2:
        return inputs, labels
    from torchvision.transforms import v2

    mixers = []
    if settings.mixup_alpha:
        mixers.append(v2.MixUp(alpha=settings.mixup_alpha, num_classes=data.meta.num_classes))
    if settings.cutmix_alpha:
        mixers.append(v2.CutMix(alpha=settings.cutmix_alpha, num_classes=data.meta.num_classes))
    mixer = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
    return mixer(inputs, labels)


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
    train_batches = data.batches(data.train, batch_size or 128, device, shuffle=True, seed=seed, rank=rank,
                                 world_size=world_size, augment=cfg.augment)
    params = [p for p in model.parameters() if p.requires_grad] + objective.extra_parameters()
    optimizer = _optimizer(params, cfg)  # built here, after any pruning: never holds stale parameters
    scheduler = _scheduler(optimizer, cfg, cfg.epochs * len(train_batches))
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    freeze = BackboneFreeze(model, cfg.freeze_backbone_epochs)
    result = FitResult()
    wait_total = step_total = 0.0
    images_total = 0
    best_state = copy.deepcopy(model.state_dict())
    best_seen = 0.0
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        trained.train()
        frozen = freeze.start_epoch(epoch)
        epoch_started = time.perf_counter()
        sums: dict[str, float] = {}
        seen = 0
        progress = tqdm(total=math.ceil(len(data.train) / world_size), desc=f"{desc} {epoch}/{cfg.epochs}",
                        unit="img", unit_scale=True, leave=False, disable=show_progress() if rank == 0 else True)
        wait_s = 0.0
        batches = iter(train_batches.epoch(epoch))
        step = 0
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)  # the time spent here is the loader's (decoding, or index batching)
            wait_s += time.perf_counter() - waited
            if batch is None:
                break
            inputs, labels, indices = batch
            step += 1
            augmented = cfg.augment
            if augmented:
                inputs, labels = mix_batch(inputs, labels, data)
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
            progress.update(count)
            if step % 10 == 0:
                progress.set_postfix_str(f"wait {wait_s / max(time.perf_counter() - epoch_started, 1e-9):.0%}")
        progress.close()
        step_s = time.perf_counter() - epoch_started
        wait_total, step_total, images_total = wait_total + wait_s, step_total + step_s, images_total + seen
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
        row["val_loss"] = round(cross_entropy(val_logits, data.val.labels), 6)
        if reference_val_logits is not None:
            row["val_agreement"] = round(agreement(val_logits, reference_val_logits), 6)
        row["loader_wait_s"] = round(wait_s, 3)
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
    if step_total > 0:
        result.loader = loader_summary(wait_total, step_total, data, images_total)
        log(f"  {desc}: data loader wait {result.loader['wait_fraction']:.1%} of the step time, "
            f"{result.loader['images_per_s']} images/s")
        if result.loader["advice"]:
            logging.getLogger("edgekd").warning("  %s: %s", desc, result.loader["advice"])
    result.wall_s = round(time.perf_counter() - started, 3)
    return result
