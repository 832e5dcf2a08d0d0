"""Batches for the training loop and every other consumer of the data, behind one interface (`BatchSource`):

- `InMemoryBatches`: bundled datasets already decoded into a uint8 tensor, batched by index (no DataLoader:
  for tensors in memory it would only add overhead).
- `StreamBatches`: image files decoded by a torch DataLoader's worker processes (persistent, prefetching,
  pinned memory on CUDA), sharded by DistributedSampler under torchrun, each rank reading only its shard.

Both yield (normalized float32 inputs on the device, labels on the device, sample indices on the CPU). Runs
are deterministic: the order of an epoch comes from (seed, epoch), and the random augmentation of an image
file from (seed, epoch, sample index), whatever the number of workers or which worker decodes it.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from edgekd.data.images import BadImage, EvalTransform, decode, to_chw

# The splits and the bundle (edgekd.data.bundle, which imports this module) are typed by what is used of them:
DataBundle = Split = FileSplit = Any
SHIFT_PIXELS = 2
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class BatchSource(Protocol):
    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[Batch]: ...

    def close(self) -> None: ...


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), shared among the ranks of one node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def resolve_workers(setting: int | str) -> int:
    return usable_cores() if setting == "auto" else int(setting)


def epoch_order(count: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The sample indices of one epoch (this rank's DistributedSampler shard under torchrun)."""
    if world_size > 1:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(count), world_size, rank, shuffle=shuffle, seed=seed)
        sampler.set_epoch(epoch)
        return torch.tensor(list(iter(sampler)), dtype=torch.long)
    if not shuffle:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(count, generator=generator)


def augment(inputs: torch.Tensor, data: DataBundle, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (padding with the normalized value of a black pixel), plus
    horizontal flips for natural images. Cheap tensor ops on the batch, on its device (bundled datasets and
    legacy squashed image folders)."""
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


@dataclass
class InMemoryBatches:
    """Index-based batching over an in-memory split; `rank`/`world_size` shard each epoch's permutation
    through DistributedSampler under torchrun. `augment`: shifts (+ flips) from one generator (seed + 7)."""

    split: Split
    data: DataBundle
    batch_size: int
    device: torch.device
    shuffle: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    augment: bool = False

    def __post_init__(self) -> None:
        # On a GPU the whole uint8 split fits easily: copy it once, not every batch.
        self._images = self.split.images.to(self.device)
        self._labels = self.split.labels.to(self.device)
        self._generator = torch.Generator().manual_seed(self.seed + 7)

    def indices(self, epoch: int) -> torch.Tensor:
        return epoch_order(len(self.split), shuffle=self.shuffle, seed=self.seed, epoch=epoch, rank=self.rank,
                           world_size=self.world_size)

    def __len__(self) -> int:
        per_rank = math.ceil(len(self.split) / self.world_size)
        return math.ceil(per_rank / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        order = self.indices(epoch)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            device_index = index.to(self.device)
            inputs = self.data.normalize(self._images[device_index])
            if self.augment:
                inputs = augment(inputs, self.data, self._generator)
            yield inputs, self._labels[device_index], index

    def close(self) -> None:
        pass


class EpochSampler(Sampler):
    """Yields (sample index, epoch) pairs in `epoch_order`: the epoch travels with each index to the workers,
    which seed the sample's augmentation from it (persistent workers never see a set_epoch call)."""

    def __init__(self, count: int, *, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        self.count, self.shuffle, self.seed, self.rank, self.world_size = count, shuffle, seed, rank, world_size
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = epoch_order(self.count, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch, rank=self.rank,
                            world_size=self.world_size)
        return ((int(i), self.epoch) for i in order)

    def __len__(self) -> int:
        return math.ceil(self.count / self.world_size)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63 - 1)


class ImageFiles(Dataset):
    """Decodes one image file per item in a worker: (uint8 CHW array or None, label, index, error or "")."""

    def __init__(self, files: list[str], labels: np.ndarray, transform: EvalTransform,
                 train_transform: Callable[[Any], Any] | None, seed: int) -> None:
        # one numpy array of bytes, not a list of str: forked workers reading a million Python objects would
        # touch (and so copy) every page holding their reference counts
        self.files = np.asarray([os.fsencode(f) for f in files])
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform, self.train_transform, self.seed = transform, train_transform, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray | None, int, int, str]:
        index, epoch = key
        label = int(self.labels[index])
        try:
            image = decode(os.fsdecode(self.files[index]), self.transform.color)
            if self.train_transform is None:
                image = self.transform.apply(image)
            else:  # torchvision's random transforms draw from torch's global generator: seed it per sample
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed(self.seed, epoch, index))
                    image = self.train_transform(image)
            return to_chw(image), label, index, ""
        except BadImage as exc:
            return None, label, index, str(exc)


def collate(items: list[tuple[np.ndarray | None, int, int, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    good = [item for item in items if item[0] is not None]
    bad = [item[3] for item in items if item[0] is None]
    if not good:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), bad
    images = torch.from_numpy(np.stack([item[0] for item in good]))
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    indices = torch.tensor([item[2] for item in good], dtype=torch.long)
    return images, labels, indices, bad


def _context() -> Any:
    # fork starts workers in milliseconds (no re-import of torch); they never touch CUDA
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


class StreamBatches:
    """A DataLoader over image files; its worker processes persist across epochs (and across the calls that
    reuse this source). `raw`: yield the uint8 images on the CPU, unnormalized (statistics)."""

    def __init__(self, split: FileSplit, data: DataBundle, batch_size: int, device: torch.device, *,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1, augment: bool = False,
                 raw: bool = False) -> None:
        from edgekd.data.config import DataConfig
        from edgekd.data.transforms import Geometry, train_transform

        self.split, self.data, self.device, self.raw, self.seed = split, data, device, raw, seed
        self.batch_size, self.world_size = batch_size, world_size
        cfg = data.config or DataConfig(dataset="imagefolder", root=".")
        transform = data.meta.eval_transform()
        pil_augment = None
        if augment:
            geometry = Geometry(data.meta.resize, data.meta.crop, data.meta.height, data.meta.width)
            pil_augment = train_transform(geometry, cfg.augment)
        self.tensor_augment = augment and pil_augment is None  # legacy squashed sizes: shifts + flips
        self.skip_bad = cfg.on_bad_image == "skip"
        self.sampler = EpochSampler(len(split), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
        self.workers = min(resolve_workers(cfg.num_workers), max(1, len(self)))
        dataset = ImageFiles(split.files, split.labels.numpy(), transform, pil_augment, seed)
        extra: dict[str, Any] = {}
        if self.workers > 0:
            extra = {"persistent_workers": True, "prefetch_factor": cfg.prefetch_factor,
                     "multiprocessing_context": _context()}
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=self.workers,
                                 collate_fn=collate, pin_memory=device.type == "cuda", **extra)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        self.sampler.epoch = epoch
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch + 7) if self.tensor_augment else None
        for images, labels, indices, bad in self.loader:
            if bad:
                if not self.skip_bad:
                    raise BadImage(bad[0])
                self.data.note_skipped(self.split.name, bad)
            if len(labels) == 0:
                continue
            if self.raw:
                yield images, labels, indices
                continue
            non_blocking = self.device.type == "cuda"
            inputs = self.data.normalize(images.to(self.device, non_blocking=non_blocking))
            if generator is not None:
                inputs = augment(inputs, self.data, generator)
            yield inputs, labels.to(self.device, non_blocking=non_blocking), indices

    def close(self) -> None:
        """Stops the persistent workers (a DataLoader's iterator owns them)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


def load_files(data: DataBundle, split: FileSplit, indices: list[int]) -> torch.Tensor:
    """uint8 (N, C, H, W) of the given samples of a file split, eval transform (unreadable ones skipped or
    raised as configured)."""
    subset = type(split)([split.files[i] for i in indices], split.labels[torch.as_tensor(indices, dtype=torch.long)],
                         split.name)
    source = StreamBatches(subset, data, 64, torch.device("cpu"), raw=True)
    try:
        parts = [images for images, _, _ in source.epoch(0)]
    finally:
        source.close()
    if not parts:
        return torch.zeros((0, *data.meta.input_shape), dtype=torch.uint8)
    return torch.cat(parts)
