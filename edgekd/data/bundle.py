"""Datasets: bundled (mnist5k, digits), synthetic, cifar10 and image files (imagefolder, filelist), split
deterministically from the seed into train / val / test. The test split is never used for training,
calibration or model selection.

Bundled datasets are small: decoded once into uint8 tensors (N, C, H, W) and batched by index. Image files
stay on disk: a split holds their paths and labels only, and a DataLoader's workers decode each batch
(`edgekd.data.loading`), so memory does not grow with the dataset. Both kinds go through the same interface
(`DataBundle.batches`, `numpy_batches`, `sample`): there is one training loop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edgekd.data.config import DataConfig
from edgekd.data.images import EvalTransform, preprocess_record
from edgekd.errors import InputError

if TYPE_CHECKING:
    from edgekd.data.loading import BatchSource
    from edgekd.data.files import Listed
    from edgekd.data.sources import Loaded

log = logging.getLogger("edgekd")
STATS_SAMPLES = 512  # training images the mean/std of an image-file dataset are measured on

# Normalization is computed on the training split; a few datasets use the statistics everyone quotes.
_KNOWN_STATS = {
    "mnist5k": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


@dataclass
class Split:
    """One split held in memory: uint8 images (N, C, H, W) and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class FileSplit:
    """One split of image files: paths and int64 labels only; decoded batch by batch by the loader."""

    files: list[str]
    labels: torch.Tensor
    name: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DataMeta:
    dataset: str
    num_classes: int
    channels: int
    height: int
    width: int
    mean: list[float]
    std: list[float]
    labels: list[str]
    natural_images: bool = False  # horizontal flips are a valid augmentation (not for digits)
    split_sizes: dict[str, int] = field(default_factory=dict)
    resize: int | None = None  # shorter side before the crop; None: squashed to height x width
    crop: tuple[int, int] | None = None
    streamed: bool = False  # image files decoded by the loader (not held in memory)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def color(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def eval_transform(self) -> EvalTransform:
        return EvalTransform(self.color, self.height, self.width, self.resize, self.crop)

    def preprocess(self) -> dict:
        """What an app needs to turn an image file into the model's input (preprocess.json, ONNX metadata):
        the preprocessing contract, format edgekd-preprocess/2."""
        return preprocess_record(color=self.color, height=self.height, width=self.width, resize=self.resize,
                                 crop=self.crop, mean=self.mean, std=self.std)


@dataclass
class DataBundle:
    train: Split | FileSplit
    val: Split | FileSplit
    test: Split | FileSplit
    meta: DataMeta
    config: DataConfig | None = None
    skipped: dict[str, set[str]] = field(default_factory=dict)
    """on_bad_image: skip -> the unreadable files met so far, per split name."""
    _sources: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalized float32, on the images' device."""
        mean = torch.tensor(self.meta.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.meta.std, device=images.device).view(1, -1, 1, 1)
        return (images.float().div_(255.0) - mean) / std

    def batches(self, split: Split | FileSplit, batch_size: int, device: torch.device, *, shuffle: bool = False,
                seed: int = 0, rank: int = 0, world_size: int = 1, augment: bool = False) -> BatchSource:
        """Batches of (normalized inputs on `device`, labels on `device`, sample indices) over a split.

        In-memory splits are batched by index; file splits by a DataLoader whose worker processes are kept
        for the next epochs (one per distinct batching, reused by later calls). `augment`: the training
        augmentation (seeded per sample for files, by one generator per call for in-memory data).
        """
        from edgekd.data import loading

        if isinstance(split, Split):
            return loading.InMemoryBatches(split, self, batch_size, device, shuffle=shuffle, seed=seed, rank=rank,
                                           world_size=world_size, augment=augment)
        key = (split.name, id(split), batch_size, str(device), shuffle, seed, rank, world_size, augment)
        source = self._sources.get(key)
        if source is None:
            self._evict_sources()
            source = self._sources[key] = loading.StreamBatches(
                split, self, batch_size, device, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                augment=augment)
        return source

    def _evict_sources(self, keep: int = 6) -> None:
        """At most `keep` loaders (each with its idle worker processes) stay alive."""
        while len(self._sources) >= keep:
            self._sources.pop(next(iter(self._sources))).close()

    def close(self) -> None:
        """Stop every loader's worker processes."""
        for source in self._sources.values():
            source.close()
        self._sources.clear()

    def subset(self, split: str, limit: int | None, seed: int = 0) -> Split | FileSplit:
        """The split, or a seeded sample of `limit` of its samples (kept in order) when it is larger."""
        part = getattr(self, split)
        if limit is None or len(part) <= limit:
            return part
        keep = torch.from_numpy(np.sort(np.random.default_rng(seed + 3).permutation(len(part))[:limit]))
        if isinstance(part, Split):
            return Split(part.images[keep], part.labels[keep], part.name)
        return FileSplit([part.files[i] for i in keep.tolist()], part.labels[keep], part.name)

    def numpy_batches(self, split: str, batch_size: int, limit: int | None = None, seed: int = 0,
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """A split (or a seeded sample of `limit` samples) as (float32 NCHW normalized inputs, int64 labels)
        numpy batches on the CPU, in order; memory bounded by one batch."""
        part = self.subset(split, limit, seed)
        for inputs, labels, _ in self.batches(part, batch_size, torch.device("cpu")).epoch(0):
            yield inputs.numpy(), labels.numpy().astype(np.int64)

    def normalized(self, split: str, limit: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A split (or a seeded sample of `limit` samples) as one pair of numpy arrays; for small splits."""
        parts = list(self.numpy_batches(split, 512, limit, seed))
        if not parts:
            return np.zeros((0, *self.meta.input_shape), np.float32), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def sample(self, split: Split | FileSplit, indices: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalized float32 inputs (CPU) of the given samples, un-augmented (calibration, probes)."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        if isinstance(split, Split):
            return self.normalize(split.images[index])
        from edgekd.data.loading import load_files

        return self.normalize(load_files(self, split, index.tolist()))

    def note_skipped(self, split: str, files: list[str]) -> None:
        """on_bad_image: skip: remember (and log once) each unreadable file."""
        seen = self.skipped.setdefault(split, set())
        for message in files:
            if message not in seen:
                seen.add(message)
                log.warning("  skipped an unreadable image (data.on_bad_image: skip): %s", message)

    def skipped_summary(self) -> dict[str, int]:
        return {name: len(files) for name, files in sorted(self.skipped.items()) if files}


def _split_indices(n: int, cfg: DataConfig, seed: int, with_test: bool = True) -> tuple[np.ndarray, ...]:
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * cfg.test_fraction)) if with_test else 0
    n_val = int(round(n * cfg.val_fraction))
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


def _check_classes(labels: np.ndarray, loaded: Loaded) -> int:
    """The model's output count: one per class name (labels.json lists exactly these), whatever data.limit keeps."""
    classes = np.unique(labels)
    if len(classes) < 2:
        raise InputError(f"{loaded.source}: needs at least 2 classes (found {len(classes)})")
    if int(labels.max()) >= len(loaded.class_names):
        raise InputError(f"{loaded.source}: label {int(labels.max())} but only {len(loaded.class_names)} classes")
    return len(loaded.class_names)


def _stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    pixels = images.float().div(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    std = pixels.std(dim=1).clamp_min(1e-3)
    return [round(v, 4) for v in pixels.mean(dim=1).tolist()], [round(v, 4) for v in std.tolist()]


def _limit(images: np.ndarray, labels: np.ndarray, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if limit is None or limit >= len(labels):
        return images, labels
    keep = np.sort(np.random.default_rng(seed + 1).permutation(len(labels))[:limit])
    return images[keep], labels[keep]


def load_data(cfg: DataConfig, seed: int = 0, defaults: Mapping[str, Any] | None = None) -> DataBundle:
    """Load, split and describe the configured dataset.

    `defaults` ({resize, crop, mean, std}, e.g. the pretrained weights' own transforms) fill what the config
    leaves unset for image files; bundled datasets keep their fixed size and statistics.
    """
    from edgekd.data import files, sources

    if cfg.dataset in ("imagefolder", "filelist"):
        return _load_files(cfg, seed, files.list_files(cfg), defaults)
    loaded = sources.load_source(cfg, seed)
    images, labels = _limit(loaded.images, loaded.labels, cfg.limit, seed)
    num_classes = _check_classes(labels, loaded)
    if loaded.separate_test is not None:
        test_images, test_labels = _limit(*loaded.separate_test, cfg.limit, seed)
        train_idx, val_idx, _ = _split_indices(len(labels), cfg, seed, with_test=False)
        test = Split(torch.from_numpy(test_images), torch.from_numpy(test_labels), "test")
    else:
        train_idx, val_idx, test_idx = _split_indices(len(labels), cfg, seed)
        test = Split(torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx]), "test")
    if loaded.separate_val is not None:
        train_idx = np.concatenate([train_idx, val_idx])
        val = Split(torch.from_numpy(loaded.separate_val[0]), torch.from_numpy(loaded.separate_val[1]), "val")
    else:
        val = Split(torch.from_numpy(images[val_idx]), torch.from_numpy(labels[val_idx]), "val")
    train = Split(torch.from_numpy(images[np.sort(train_idx)]), torch.from_numpy(labels[np.sort(train_idx)]), "train")
    _check_not_empty(loaded.source, len(labels), train, val, test)
    mean, std = _KNOWN_STATS.get(cfg.dataset) or _stats(train.images)
    _, channels, height, width = train.images.shape
    meta = DataMeta(
        dataset=cfg.dataset,
        num_classes=num_classes,
        channels=int(channels),
        height=int(height),
        width=int(width),
        mean=list(mean),
        std=list(std),
        labels=list(loaded.class_names),
        natural_images=loaded.natural_images,
        split_sizes={"train": len(train), "val": len(val), "test": len(test)},
    )
    return DataBundle(train=train, val=val, test=test, meta=meta, config=cfg)


def _check_not_empty(source: str, total: int, *parts: Split | FileSplit) -> None:
    for part in parts:
        if len(part) == 0:
            raise InputError(f"{source}: the {part.name} split is empty ({total} samples); use more data")


def _pick(files: list[str], labels: np.ndarray, index: np.ndarray, name: str) -> FileSplit:
    return FileSplit([files[i] for i in index], torch.from_numpy(labels[index]), name)


def _load_files(cfg: DataConfig, seed: int, listed: Listed, defaults: Mapping[str, Any] | None) -> DataBundle:
    """Image files: paths and labels split like the in-memory datasets; statistics measured on a sample."""
    from edgekd.data.images import bands_to_color, open_image
    from edgekd.data.transforms import resolve_geometry, resolve_statistics

    def limited(files: list[str], labels: np.ndarray) -> tuple[list[str], np.ndarray]:
        if cfg.limit is None or cfg.limit >= len(labels):
            return files, labels
        keep = np.sort(np.random.default_rng(seed + 1).permutation(len(labels))[:cfg.limit])
        return [files[i] for i in keep], labels[keep]

    files, labels = limited(listed.files, listed.labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise InputError(f"{listed.source}: needs at least 2 classes (found {len(classes)})")
    train_idx, val_idx, test_idx = _split_indices(len(labels), cfg, seed, with_test=listed.separate_test is None)
    if listed.separate_test is not None:
        test = FileSplit(*_as_split(*limited(*listed.separate_test)), "test")
    else:
        test = _pick(files, labels, np.sort(test_idx), "test")
    if listed.separate_val is not None:
        train_idx = np.concatenate([train_idx, val_idx])
        val = FileSplit(*_as_split(*listed.separate_val), "val")
    else:
        val = _pick(files, labels, np.sort(val_idx), "val")
    train = _pick(files, labels, np.sort(train_idx), "train")
    _check_not_empty(listed.source, len(labels), train, val, test)
    geometry = resolve_geometry(cfg, defaults)
    if cfg.channels is not None:
        color = "L" if cfg.channels == 1 else "RGB"
    else:
        with open_image(train.files[0]) as first:
            color = bands_to_color(len(first.getbands()))
    channels = 1 if color == "L" else 3
    meta = DataMeta(
        dataset=cfg.dataset, num_classes=len(listed.class_names), channels=channels, height=geometry.height,
        width=geometry.width, mean=[0.0] * channels, std=[1.0] * channels, labels=list(listed.class_names),
        natural_images=listed.natural_images, split_sizes={"train": len(train), "val": len(val), "test": len(test)},
        resize=geometry.resize, crop=geometry.crop, streamed=True)
    bundle = DataBundle(train=train, val=val, test=test, meta=meta, config=cfg)
    statistics = resolve_statistics(cfg, defaults, channels)
    if statistics is None:
        statistics = _file_stats(bundle, seed)
    meta.mean, meta.std = statistics
    return bundle


def _as_split(files: list[str], labels: np.ndarray) -> tuple[list[str], torch.Tensor]:
    return list(files), torch.from_numpy(np.asarray(labels, dtype=np.int64))


def _file_stats(bundle: DataBundle, seed: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the eval-transformed pixels of a seeded sample of training images (sums in
    float64, so memory stays one image batch)."""
    train = bundle.train
    count = min(len(train), STATS_SAMPLES)
    index = np.sort(np.random.default_rng(seed + 2).permutation(len(train))[:count])
    sample = FileSplit([train.files[i] for i in index], train.labels[index], "train")
    pixels = 0
    channels = bundle.meta.channels
    sums = np.zeros(channels)
    squares = np.zeros(channels)
    from edgekd.data.loading import StreamBatches

    source = StreamBatches(sample, bundle, 64, torch.device("cpu"), raw=True)
    try:
        for images, _, _ in source.epoch(0):
            values = images.double().div(255.0).transpose(0, 1).reshape(channels, -1)
            sums += values.sum(dim=1).numpy()
            squares += (values * values).sum(dim=1).numpy()
            pixels += values.shape[1]
    finally:
        source.close()
    if pixels == 0:
        raise InputError(f"{bundle.config.root if bundle.config else 'data'}: no readable training image")
    mean = sums / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean * mean, 0.0) * pixels / max(pixels - 1, 1)).clip(1e-3)
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]
